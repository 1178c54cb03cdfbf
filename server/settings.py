"""Server settings: every limit the service enforces, in one place, so the CLI, tests and docs agree."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    """Caps on what one request may ask of the server.

    Why these exist: a search service is exposed to whatever clients send. Without caps a single request can
    make the process decode a gigapixel image, hold a huge body in memory or ask for every document at once.
    """

    # A camera's photo as it is (a 24-megapixel JPEG at quality 95 is 10-15 MB) is a query image, reduced as it
    # is decoded; its base64 in JSON is 4/3 of it.
    max_body_bytes: int = 34 * 1024 * 1024  # whole request body (JSON with base64, or multipart): 413 above
    max_image_bytes: int = 24 * 1024 * 1024  # one encoded image after base64 decoding: 413 above
    max_image_pixels: int = 16_000_000  # width x height of a query image (checked before decoding): 413 above
    max_source_pixels: int = 64_000_000  # a stored image opened for a thumbnail
    search_timeout_s: float = 20.0  # a search or classify that takes longer answers 504
    max_in_flight: int = 64  # searches queued or running at once; more answer 503 instead of piling up

    def __post_init__(self) -> None:
        """A zero or negative cap would refuse every request (or none); say which setting is wrong at start-up."""
        bad = {name: value for name, value in vars(self).items() if not value > 0}
        if bad:
            raise ValueError(f"server limits must be positive, got {bad}; leave a limit out to use its default")
        if self.max_image_bytes > self.max_body_bytes:
            raise ValueError(f"max_image_bytes ({self.max_image_bytes}) is over max_body_bytes ({self.max_body_bytes}):"
                             f" such an image could never arrive; raise max_body_bytes too")


@dataclass(frozen=True)
class ServerSettings:
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None  # when set, every API route needs the header X-API-Key (health probes do not)
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API from other sites
    search_threads: int = 8  # worker threads running searches; their encodes are batched into shared forwards
    encode_batching: bool = True  # concurrent searches' encodes gathered into one forward (server/batching.py)
    batch_wait_s: float = 0.002  # under load, how long a forward waits for more searches' queries
    query_weights: str = "auto"  # sparse-route text queries: auto (idf for grounded models) | model | idf
    reload_interval_s: float = 2.0  # how often the registry looks for a newly published index; 0 = never
    thumbnail_size: int = 128  # default longest side of a thumbnail, in pixels
    # Query images by URL ("image_url"): off unless hosts are listed. Only http(s) URLs of exactly these host
    # names are fetched, redirects are not followed, and the download has the image byte cap and this timeout.
    image_url_hosts: tuple[str, ...] = ()
    image_url_timeout_s: float = 5.0
