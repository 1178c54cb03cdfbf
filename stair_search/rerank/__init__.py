"""Training-free rerankers over the stored features of the top candidates (never the image files).

Each module holds the method's formula as pure numpy functions (testable by hand against the paper) and a
small class that adapts it to a query: ``phrases(text)`` names the texts it needs embedded (the router
embeds all of them in one encoder call and caches them) and ``score(inputs)`` returns one score per
candidate. :func:`make_reranker` builds one by name; the names are :data:`RERANKERS`.
"""

from __future__ import annotations

from typing import Any

RERANKERS = ("bsap", "ssp", "comclip", "s3")
NEEDS_LOCAL = ("ssp", "comclip")  # read the candidates' stored local (patch) features


def make_reranker(name: str, **knobs: Any):
    """The reranker called ``name`` with its knobs (see each module's class for what they mean)."""
    if name == "bsap":
        from stair_search.rerank.bsap import BSAP as cls
    elif name == "ssp":
        from stair_search.rerank.ssp import SSP as cls
    elif name == "comclip":
        from stair_search.rerank.comclip import ComCLIP as cls
    elif name == "s3":
        from stair_search.rerank.s3 import S3 as cls
    else:
        raise ValueError(f"unknown reranker {name!r}; choose from {', '.join(RERANKERS)}")
    return cls(**knobs)


def check_names(names) -> list[str]:
    """``names`` as a list, refusing unknown ones with the list of valid names (before any work is done)."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in RERANKERS]
    if unknown:
        raise ValueError(f"unknown reranker(s) {unknown}; choose from {', '.join(RERANKERS)}")
    return list(dict.fromkeys(names))


def check_local_features(names, calibration: dict[str, Any] | None) -> None:
    """Refuse, in one line, rerankers that read local features on an index whose documents have none (built from
    embeddings computed elsewhere: the manifest's ``calibration`` says ``local_features: false``)."""
    if calibration is None or calibration.get("local_features", True):
        return
    refused = [n for n in ([names] if isinstance(names, str) else names) if n in NEEDS_LOCAL]
    if refused:
        raise ValueError(f"reranker(s) {', '.join(refused)} read local image features, and this index was built "
                         f"from embeddings without them; use bsap or s3, or index the images")
