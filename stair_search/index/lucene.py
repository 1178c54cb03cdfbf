"""Anserini's Lucene searchers, called the way Pyserini's wrappers call them, without ``pyserini.search.lucene``.

The impact and BM25 searchers that answer sparse and text queries are Anserini's Java classes shipped in the
Pyserini wheel (``io.anserini.search.SimpleImpactSearcher`` and ``SimpleSearcher``); Pyserini's Python classes
are thin wrappers over them. Importing the wrappers' package imports ``pyserini.encode``, which imports torch
and transformers (~0.6 GB and seconds per process): a cluster replica or a torch-free client that only
searches stored impacts would pay that for nothing. These two classes make the same Java calls with the same
arguments (a ``{term: Integer}`` map for impacts, the query string for BM25), so scores and order are Pyserini's.

One difference, on purpose: Pyserini's impact wrapper computes every term's idf when it opens (a pass over
the whole term dictionary) only to drop query terms absent from the index; an absent term matches nothing
in Lucene, so the pass is skipped and opening costs no work proportional to the index.
Callers hold ``jvm.JAVA_CALLS`` around every call, as for any Java object. A Lucene folder Java cannot read
is a DamagedIndexError naming it (one line), not Java's stack.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from stair_search.index.files import DamagedIndexError
from stair_search.index.jvm import java_class, start_jvm

Hit = tuple[int, float]  # (Lucene document id as the shard's row, score)


def _hits(found) -> list[Hit]:
    return [(int(hit.docid), float(hit.score)) for hit in found]


@contextmanager
def lucene_errors(folder: Path) -> Iterator[None]:
    """Java's error for a damaged Lucene folder (a truncated file, a missing segments file) as one
    DamagedIndexError naming the folder, instead of a page of Java stack."""
    start_jvm()  # before jnius is imported: importing it starts a JVM without Anserini's jar
    from jnius import JavaException

    try:
        yield
    except JavaException as exc:
        reason = " ".join(str(exc).split())[:300]
        raise DamagedIndexError(f"{folder}: Lucene cannot read this index ({reason}); restore the shard's files "
                                f"or rebuild the index") from None


class ImpactSearcher:
    """Impact (dot-product of quantised weights) search over a shard's Lucene folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        with lucene_errors(self.folder):
            self._object = java_class("io.anserini.search.SimpleImpactSearcher")(str(folder))
            self.num_docs = int(self._object.get_total_num_docs())
        # the classes every query builds, resolved once (not per query on the search path)
        self._map, self._integer = java_class("java.util.HashMap"), java_class("java.lang.Integer")
        self._list = java_class("java.util.ArrayList")

    def _query(self, impacts: Mapping[str, int]):
        query = self._map()
        for term, impact in impacts.items():
            query.put(term, self._integer(int(impact)))
        return query

    def search(self, impacts: Mapping[str, int], k: int) -> list[Hit]:
        with lucene_errors(self.folder):
            return _hits(self._object.search(self._query(impacts), int(k)))

    def batch_search(self, queries: Sequence[Mapping[str, int]], k: int, threads: int) -> list[list[Hit]]:
        """Several queries at once on Anserini's own thread pool; answers in the queries' order."""
        queries_list, ids = self._list(), self._list()
        for i, impacts in enumerate(queries):
            queries_list.add(self._query(impacts))
            ids.add(str(i))
        with lucene_errors(self.folder):
            found = self._object.batch_search(queries_list, ids, int(k), int(threads))
        return [_hits(found.get(str(i)) or []) for i in range(len(queries))]

    def close(self) -> None:
        self._object.close()


class BM25Searcher:
    """BM25 search (Anserini's defaults, as Pyserini's ``LuceneSearcher``) over an analysed text field."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        with lucene_errors(self.folder):
            self._object = java_class("io.anserini.search.SimpleSearcher")(str(folder))

    def search(self, text: str, k: int) -> list[Hit]:
        with lucene_errors(self.folder):
            return _hits(self._object.search(text, int(k)))

    def close(self) -> None:
        self._object.close()
