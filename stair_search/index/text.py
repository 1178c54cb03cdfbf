"""The keyword route over text fields: each shard's captions (and chosen metadata fields) in a BM25 Lucene index.

Why a third route: users search the words they wrote ("Lesotho", "name badge"), which neither the model's
sparse vector nor its embedding is guaranteed to carry. The text goes through Anserini's default analyzer
(lower case, stop words, Porter stemming) into ``shards/<name>/text/``, written and searched through Anserini
like the impact index, with document vectors stored so that a hit can say which of the query's words it
matched. A shard none of whose documents has text gets no text index, and an index built before this route
has none at all: its searches simply have no ``text`` route.

The read side calls Anserini's Java classes from Pyserini's jar directly (the analyzer Pyserini's
``get_lucene_analyzer()`` builds, ``AnalyzerUtils.analyze``, ``IndexReaderUtils.getDocumentVector``), as
``lucene.py`` does for searching: importing Pyserini's Python packages for these three calls cost a query
process seconds of imports (pandas, Pyserini's prebuilt-index tables), and the same calls give the same words.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stair_search.index.jvm import JAVA_CALLS, java_class
from stair_search.index.lucene import BM25Searcher, lucene_errors

TEXT_DIR = "text"
STEMMER = "porter"  # Anserini's default English analyzer, as Pyserini's get_lucene_analyzer() builds it
DEFAULT_TEXT_FIELDS = ("caption",)  # what a new index's text route holds unless the job names metadata fields
MAX_TEXT_CHARS = 20_000  # per document: a caption, not a book


def document_text(caption: str, metadata: Mapping[str, Any] | None, fields: Sequence[str]) -> str:
    """What the text route indexes for one document: ``caption`` if named, then the named metadata fields
    (text, numbers, or lists of them), one per line."""
    parts = [caption] if "caption" in fields and caption else []
    for name in fields:
        value = (metadata or {}).get(name) if name != "caption" else None
        values = value if isinstance(value, list) else [value]
        parts.extend(str(v) for v in values if isinstance(v, str | int | float) and not isinstance(v, bool))
    return "\n".join(parts)[:MAX_TEXT_CHARS]


def build_text_index(folder: Path, texts: Sequence[str], threads: int = 1) -> bool:
    """BM25 index of the non-empty ``texts`` (Lucene ids = their rows); False (nothing written) if all are
    empty."""
    rows = [row for row, text in enumerate(texts) if text.strip()]
    if not rows:
        return False
    with tempfile.TemporaryDirectory(prefix="stair-text-") as tmp:
        with open(Path(tmp) / "docs.jsonl", "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps({"id": str(row), "contents": texts[row]}, ensure_ascii=False) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        java_class("io.anserini.index.IndexCollection").main([
            "-collection", "JsonCollection", "-input", tmp, "-index", str(folder),
            "-generator", "DefaultLuceneDocumentGenerator", "-threads", str(max(1, threads)),
            "-storePositions", "-storeDocvectors", "-quiet",
        ])
    if not any(folder.glob("segments_*")):
        raise RuntimeError(f"Anserini wrote no Lucene text index at {folder}; see the Java log above.")
    return True


class TextShard:
    """Read side of one shard's text index: BM25 search and matched words (a filtered search asks it for more
    until enough allowed rows come back: ``shard.LocalShard._among``)."""

    def __init__(self, folder: Path, count: int):
        self.folder, self.count = Path(folder), count
        self._searcher = self._reader = self._analyzer = self._analyze = self._vector = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.count

    def open(self) -> None:
        """Open the searcher, the reader and the analyzer (once; every call opens them when needed)."""
        if self._searcher is None:
            with self._lock, JAVA_CALLS:
                if self._searcher is None:
                    with lucene_errors(self.folder):
                        self._reader = java_class("io.anserini.index.IndexReaderUtils").getReader(str(self.folder))
                    self._analyzer = java_class("io.anserini.analysis.DefaultEnglishAnalyzer").newStemmingInstance(
                        STEMMER)
                    self._analyze = java_class("io.anserini.analysis.AnalyzerUtils").analyze
                    self._vector = java_class("io.anserini.index.IndexReaderUtils").getDocumentVector
                    self._searcher = BM25Searcher(self.folder)

    def search(self, text: str, k: int) -> list[tuple[int, float]]:
        """(row, BM25 score) best first; nothing for a query without an indexable word."""
        if not self.terms(text):
            return []
        self.open()
        with JAVA_CALLS:
            return self._searcher.search(text, k)

    def terms(self, text: str) -> list[str]:
        """The query's words as the index holds them (analyzed: lower case, no stop words, stemmed)."""
        self.open()
        with JAVA_CALLS:
            return list(dict.fromkeys(self._analyze(self._analyzer, text or "").toArray()))

    def matched(self, row: int, text: str) -> dict[str, int]:
        """The query's analyzed words that document ``row`` holds, with their counts in it."""
        terms = self.terms(text)
        with JAVA_CALLS:
            vector = self._document_vector(row)
            counts = {term: vector.get(term) for term in terms} if vector is not None else {}
        return {term: int(count) for term, count in counts.items() if count is not None}

    def _document_vector(self, row: int):
        """Document ``row``'s {word: count} Java map; None for a row the index does not hold, or (as Pyserini's
        reader answers) for a document whose vector Lucene cannot give."""
        from jnius import JavaException  # the JVM is up: open() started it

        try:
            return self._vector(self._reader, str(row))
        except JavaException:
            return None

    def close(self) -> None:
        with self._lock, JAVA_CALLS:
            if self._searcher is not None:
                self._searcher.close()
                self._reader.close()
                self._analyzer.close()
            self._searcher = self._reader = self._analyzer = self._analyze = self._vector = None
