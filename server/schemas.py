"""Request and response bodies of the HTTP API (pydantic), which also make up the OpenAPI schema at /docs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from stair_search.retrieve.request import SearchRequest as Query

MAX_K = 100
MAX_QUERY_CHARS = 1000
MAX_FILTERS = 16
MAX_LABELS = 100
MAX_LABEL_CHARS = 100

Mode = Literal["auto", "sparse", "dense", "hybrid", "text"]
Fusion = Literal["rrf", "convex"]
RerankerName = Literal["bsap", "ssp", "comclip", "s3"]
FilterValue = str | int | float | bool


class FilterRange(BaseModel):
    """Operators on one metadata field (all must hold): a range, equality, or any of a list."""

    model_config = ConfigDict(extra="forbid")

    eq: FilterValue | None = None
    any: list[FilterValue] | None = Field(None, max_length=1000)
    gt: float | str | None = None
    gte: float | str | None = None
    lt: float | str | None = None
    lte: float | str | None = None


class SearchRequest(BaseModel):
    """One search. Give ``query``, ``image`` or both (a text-refined image query).

    The HTTP form of the library's ``stair_search.retrieve.SearchRequest`` (:meth:`to_request` builds it)."""

    model_config = ConfigDict(extra="forbid")

    query: str | None = Field(None, max_length=MAX_QUERY_CHARS, description="Text query.")
    image: str | None = Field(None, description="Query image as base64 or a data: URL (or use a multipart upload).")
    image_url: str | None = Field(None, max_length=2048, description="Query image by http(s) URL: off unless the "
                                  "server allows the URL's host (serve --allow-image-url-host).")
    index: str | None = Field(None, description="Index name; default: the first index the server was started with.")
    k: int = Field(10, ge=1, le=MAX_K)
    mode: Mode = "auto"
    fusion: Fusion = "rrf"
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Convex fusion: weight of the sparse route.")
    rerank: list[RerankerName] = Field(default_factory=list, max_length=4)
    feedback: int | None = Field(None, ge=0, le=100, description="Pseudo-relevance feedback: the dense query moves "
                                 "toward this many top hits and the dense route runs again (null: auto's choice, "
                                 "the model's feedback_docs; 0: off). Text and image queries only.")
    explain: bool = Field(True, description="Return the matched word-pieces of each hit.")
    partial: bool = Field(False, description="On a cluster: when every copy of a shard is down, answer from the "
                          "others and name it in missing_shards (else the search answers 503 naming it).")
    offset: int = Field(0, ge=0, le=1000, description="Skip this many hits (paging; ranks continue from it).")
    like: str | None = Field(None, max_length=MAX_QUERY_CHARS,
                             description="More like this: the id of a stored document, whose dense and sparse "
                                         "vectors are the query (the document itself is left out).")
    vector: list[float] | None = Field(None, max_length=8192,
                                       description="A dense query embedding (the index's embedding width).")
    sparse: dict[str, float] | None = Field(None, max_length=1024,
                                            description="A sparse query: {word-piece: weight >= 0} in the index's "
                                                        "vocabulary.")
    filters: dict[str, FilterValue | list[FilterValue] | FilterRange] = Field(
        default_factory=dict, max_length=MAX_FILTERS,
        description='Metadata filters, all of which must hold: a value (equality; membership for a list field), '
                    'a list (any of), or operators ({"gte": 2020, "lt": 2024}; eq, any, gt, gte, lt, lte). '
                    'Applied before ranking, so a rare filter still returns k hits; an unknown field is a 422.')

    @field_validator("query")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("rerank")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _needs_query_or_image(self, info: ValidationInfo) -> SearchRequest:
        uploaded = _uploaded(info)
        encoded = self.query is not None or bool(self.image) or uploaded or self.image_url is not None
        given = [name for name, present in (("a query or image", encoded), ("'like'", self.like is not None),
                                            ("'vector'/'sparse'", self.by_vectors))
                 if present]
        if not given:
            raise ValueError("give a text 'query', an 'image' (or both), 'like' (a document id), or a 'vector' "
                             "and/or 'sparse' query")
        if len(given) > 1:
            raise ValueError(f"give one kind of query, not {' and '.join(given)}")
        if self.feedback and not encoded:
            raise ValueError("'feedback' refines the dense route of a text or image query; 'like', 'vector' and "
                             "'sparse' queries take none")
        if sum([bool(self.image), uploaded, self.image_url is not None]) > 1:
            raise ValueError("give the image once: as base64 'image', as a multipart upload or as 'image_url'")
        return self

    @property
    def by_vectors(self) -> bool:
        return self.vector is not None or self.sparse is not None

    def to_request(self, image: Any = None) -> Query:
        """The library's request for this body (``image``: the decoded query image, from whichever field)."""
        filters = {name: condition.model_dump(exclude_none=True) if isinstance(condition, FilterRange) else condition
                   for name, condition in self.filters.items()}
        common = {"mode": self.mode, "k": self.k, "fusion": self.fusion, "alpha": self.alpha, "explain": self.explain,
                  "filters": filters or None, "offset": self.offset, "partial": self.partial}
        if self.like is not None:
            return Query(like=self.like, **common)
        if self.by_vectors:
            return Query(dense=self.vector, sparse=self.sparse, **common)
        return Query(text=self.query, image=image, rerank=self.rerank, feedback=self.feedback, **common)


def _uploaded(info: ValidationInfo) -> bool:
    """Whether the image came as a multipart file (the request parser says so through the context)."""
    return bool(info.context and info.context.get("uploaded_image"))


class MatchedToken(BaseModel):
    token: str
    query: float = Field(description="Weight of the word-piece in the query.")
    document: float = Field(description="Weight of the word-piece in the document.")
    word: bool = Field(True, description="A content word (false for punctuation and grammar words such as 'and', "
                                         "which the page leaves out of its explanation chips).")
    of: str | None = Field(None, description="The longer query word this word-piece was searched for, when the "
                                             "vocabulary splits that word ('ham' for 'hamster'): the match is of "
                                             "the piece, not of the whole word.")


class Hit(BaseModel):
    rank: int
    id: str
    score: float
    parts: dict[str, float] = Field(description="Score of each route / reranker.")
    caption: str
    metadata: dict[str, Any]
    source: str = Field(description="Where the document was indexed from: a file path (``file.tar#member`` in a "
                                    "tar shard) or an http(s) URL.")
    thumbnail: str = Field(description="URL of the thumbnail: made by this server from a local stored source, or "
                                       "the source URL itself for a URL-sourced document (the browser loads it; "
                                       "the server never fetches it).")
    document: str = Field(description="URL of the stored document.")
    matched: list[MatchedToken] = Field(default_factory=list)
    text_matched: dict[str, int] = Field(default_factory=dict, description="Text route: the query's words (as "
                                         "indexed: lower case, stemmed) found in the hit's caption / text fields, "
                                         "with their counts.")


class SearchResult(BaseModel):
    index: str
    version: int = Field(description="Increases each time the server swaps in a newly published index.")
    mode: str
    fusion: str | None
    decision: dict[str, Any] | None = Field(None, description="What mode=auto chose and why (when the router says).")
    took_ms: float
    query_tokens: dict[str, float] = Field(description="The query's largest word-piece weights.")
    hits: list[Hit]
    missing_shards: list[str] = Field(default_factory=list, description="Shards left out of a partial answer "
                                      "(\"partial\": true, on a cluster where every copy of them is down).")


MAX_BATCH = 32


class BatchSearchRequest(BaseModel):
    """Several searches in one request, answered in order (images as base64 only)."""

    model_config = ConfigDict(extra="forbid")

    requests: list[SearchRequest] = Field(min_length=1, max_length=MAX_BATCH)


class BatchRequests(BaseModel):
    """A batch as it is parsed: the envelope checked, each search left raw, so that a search the schema refuses
    is that search's own 422 (:class:`BatchSearchRequest` is what the API documents)."""

    model_config = ConfigDict(extra="forbid")

    requests: list[Any] = Field(min_length=1, max_length=MAX_BATCH)


class BatchError(BaseModel):
    """A search of a batch that failed: the status and the body it would have had on its own."""

    status: int = Field(description="The HTTP status this search alone would have answered with.")
    detail: str
    errors: list[dict[str, Any]] | None = Field(None, description="Validation errors, as a 422 lists them.")
    missing_shards: list[str] | None = None


class BatchSearchResult(BaseModel):
    results: list[SearchResult | BatchError] = Field(description="One per search, in order: its result, or "
                                                     "its error (a failed search fails only itself).")


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, description="Image as base64 or a data: URL (or use a multipart upload).")
    labels: list[str] = Field(min_length=2, max_length=MAX_LABELS)
    index: str | None = None

    @field_validator("labels")
    @classmethod
    def _clean_labels(cls, value: list[str]) -> list[str]:
        labels = list(dict.fromkeys(label.strip() for label in value if label.strip()))
        too_long = [label[:20] for label in labels if len(label) > MAX_LABEL_CHARS]
        if too_long:
            raise ValueError(f"labels longer than {MAX_LABEL_CHARS} characters: {too_long}")
        if len(labels) < 2:
            raise ValueError("give at least two distinct, non-blank labels")
        return labels

    @model_validator(mode="after")
    def _needs_one_image(self, info: ValidationInfo) -> ClassifyRequest:
        if bool(self.image) == _uploaded(info):
            raise ValueError("give exactly one image: as base64 'image' or as a multipart upload")
        return self


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResult(BaseModel):
    index: str
    labels: list[LabelScore]


class Document(BaseModel):
    id: str
    index: str
    caption: str
    metadata: dict[str, Any]
    source: str = Field(description="Where the document was indexed from (a file path or an http(s) URL).")
    width: int
    height: int
    thumbnail: str


class IndexInfo(BaseModel):
    name: str
    documents: int
    shards: int
    model: str
    version: int
    opened: str
    created: str
    sparse: str = "heads"  # how its sparse vectors were made: heads (trained), concepts (training-free) or none


class ServiceInfo(BaseModel):
    indexes: list[IndexInfo]
    modes: list[str]
    rerankers: list[str]
    classify: bool
    max_k: int = MAX_K
    max_query_chars: int = MAX_QUERY_CHARS
    max_image_bytes: int
    auth: bool
