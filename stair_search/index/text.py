"""The keyword route over text fields: each shard's captions (and chosen metadata fields) in a BM25 Lucene index.

Why a third route: users search the words they wrote ("Lesotho", "name badge"), which neither the model's
sparse vector nor its embedding is guaranteed to carry. The text goes through Anserini's default analyzer
(lower case, stop words, Porter stemming) into ``shards/<name>/text/``, written and searched through Pyserini
like the impact index, with document vectors stored so that a hit can say which of the query's words it
matched. A shard none of whose documents has text gets no text index, and an index built before this route
has none at all: its searches simply have no ``text`` route.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stair_search.index.jvm import JAVA_CALLS, import_pyserini, java_class
from stair_search.index.lucene import BM25Searcher, lucene_errors

TEXT_DIR = "text"
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
        self._searcher = self._reader = self._analyzer = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.count

    def open(self) -> None:
        """Open the searcher, the reader and the analyzer (once; every call opens them when needed)."""
        if self._searcher is None:
            with self._lock, JAVA_CALLS:
                if self._searcher is None:
                    index = import_pyserini("pyserini.index.lucene")
                    analysis = import_pyserini("pyserini.analysis")
                    with lucene_errors(self.folder):
                        self._reader = index.LuceneIndexReader(str(self.folder))
                    self._analyzer = analysis.Analyzer(analysis.get_lucene_analyzer())
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
            return list(dict.fromkeys(self._analyzer.analyze(text or "")))

    def matched(self, row: int, text: str) -> dict[str, int]:
        """The query's analyzed words that document ``row`` holds, with their counts in it."""
        self.open()
        with JAVA_CALLS:
            vector = self._reader.get_document_vector(str(row)) or {}
            return {term: int(vector[term]) for term in self.terms(text) if term in vector}

    def close(self) -> None:
        with self._lock, JAVA_CALLS:
            if self._searcher is not None:
                self._searcher.close()
            self._searcher = self._reader = self._analyzer = None
