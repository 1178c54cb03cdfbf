"""stair-search: sparse (STAIR, Lucene impact) + dense (FAISS) image search.

Heavy pieces (torch models, the JVM, FAISS) are imported where they are used, so ``import stair_search``
and the CLI's ``--help`` stay fast.
"""

__version__ = "0.1.0"
# The model every command uses unless told otherwise (here, not in models/, so that the CLI can name it
# without importing torch).
DEFAULT_MODEL = "stair-lite-4"
