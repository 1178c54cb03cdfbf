"""The ``stair-search`` command line: the one place that composes the library (``stair_search``), the bulk
indexing jobs (``indexer``) and the HTTP service (``server``). Every other module of ``stair_search`` imports
neither of those packages (tests/test_architecture.py checks it); they build on the library, not the reverse.
"""

from stair_search.cli.commands import app, main

__all__ = ["app", "main"]
