"""stair-search: sparse (STAIR, Lucene impact) + dense (FAISS) image search.

Heavy pieces (torch models, the JVM, FAISS) are imported where they are used, so ``import stair_search``
and the CLI's ``--help`` stay fast.
"""

__version__ = "0.1.0"
