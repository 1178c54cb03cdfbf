"""Bulk indexing jobs: sources -> decode -> encode -> shard writers -> published index."""

from indexer.run import run

__all__ = ["run"]
