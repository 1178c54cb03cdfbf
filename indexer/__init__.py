"""Bulk indexing jobs: sources -> decode -> encode -> shard writers -> published index.

``run(IndexJob(source, out, ...))``: the job is one validated dataclass (``job.py``), what ``stair-search index``
builds from its options too.
"""

from indexer.job import IndexJob, JobSummary, run

__all__ = ["IndexJob", "JobSummary", "run"]
