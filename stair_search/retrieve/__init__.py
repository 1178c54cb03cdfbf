"""Answering a search: the typed request, its plan, the router that executes it over the shards, and fusion.

``SearchRequest`` (request.py) -> ``Plan`` (plan.py: validate, decide routes; pure) -> ``QueryRouter.search``
(router.py: encode once, one first-stage query to every shard, fuse, rerank, describe).
"""

from stair_search.retrieve.plan import Plan, plan_query, plan_vectors
from stair_search.retrieve.request import FUSIONS, MODES, SearchRequest
from stair_search.retrieve.router import QueryRouter, SearchHit, SearchResponse, open_router

__all__ = ["FUSIONS", "MODES", "Plan", "QueryRouter", "SearchHit", "SearchRequest", "SearchResponse", "open_router",
           "plan_query", "plan_vectors"]
