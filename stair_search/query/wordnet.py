"""WordNet synonyms, offline, from Debian's ``wordnet-base`` files read with nltk's WordNet reader.

Why the extra folder: nltk's reader wants a ``lexnames`` file that the Debian package does not ship (its
content is fixed: the 45 lexicographer file names of WordNet 3.0, listed in ``lexnames(5WN)``), and nltk only
reads files that really lie inside a folder on its data path (it refuses symlinks and hard links out of it).
So, once, a folder under the stair-search data directory gets copies of the Debian files (~28 MB) plus a
written ``lexnames``, and joins ``nltk.data.path``. Nothing is downloaded.
``STAIR_WORDNET`` points at another WordNet 3.0 ``dict`` folder. Without WordNet files a look-up raises
:class:`WordNetMissing` naming the fix: S^3 without synonyms would quietly be the plain dense score.
"""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from functools import lru_cache
from pathlib import Path

from stair_search.atomic import atomic_path, atomic_write
from stair_search.paths import wordnet_dir

DEBIAN_WORDNET = Path("/usr/share/wordnet")
FILES = ("data.adj", "data.adv", "data.noun", "data.verb", "index.adj", "index.adv", "index.noun", "index.verb",
         "adj.exc", "adv.exc", "noun.exc", "verb.exc", "cntlist.rev", "index.sense")
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
_CATEGORY = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
_lock = threading.Lock()


def source_dir() -> Path:
    return Path(os.environ.get("STAIR_WORDNET", DEBIAN_WORDNET))


def available() -> bool:
    return (source_dir() / "data.noun").is_file()


class WordNetMissing(RuntimeError):
    """S^3 was asked for WordNet synonyms and no WordNet files are installed: refused, not silently skipped."""


def reader():
    """The shared WordNetCorpusReader of the installed WordNet files; WordNetMissing (naming the fix) if none."""
    if not available():
        raise WordNetMissing(f"S^3 needs WordNet and there is none in {source_dir()}: install Debian's wordnet-base "
                             f"(apt-get install wordnet-base; `make demo` does it as root) or point STAIR_WORDNET at a "
                             f"WordNet 3.0 dict folder")
    return _reader(source_dir())


@lru_cache(maxsize=2)
def _reader(source: Path):
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    folder = _prepare_folder(source)
    if str(folder) not in nltk.data.path:
        nltk.data.path.append(str(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": we do not use them
        return _offline_reader_class(WordNetCorpusReader)(str(folder), None)


def _offline_reader_class(base: type) -> type:
    """nltk's reader, minus the WordNet-3.0 sense map it builds for multilingual (OMW) data: that map needs nltk's
    own downloaded ``wordnet`` corpus, and synonym look-ups never use it."""

    class OfflineWordNetReader(base):
        def map_wn(self, version: str = "wordnet") -> None:
            return None

    return OfflineWordNetReader


def _prepare_folder(source: Path) -> Path:
    folder = wordnet_dir()
    with _lock:
        folder.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            if (source / name).exists() and not (folder / name).exists():
                _copy(source / name, folder / name)
        lexnames = folder / "lexnames"
        if not lexnames.exists():
            lines = [f"{i:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}" for i, name in enumerate(LEXNAMES)]
            atomic_write(lexnames, "\n".join(lines) + "\n")
    return folder


def _copy(source: Path, dest: Path) -> None:
    """Copy through a temporary name, so a reader never sees half a file."""
    with atomic_path(dest) as tmp:
        shutil.copyfile(source, tmp)


def synonyms(term: str, limit: int = 8, senses: int = 3, pos: str | None = None) -> list[str]:
    """Up to ``limit`` WordNet synonyms of ``term`` (lemmas of its first ``senses`` synsets, most frequent
    sense first), without ``term`` itself; [] when WordNet does not know the term. WordNetMissing without
    WordNet files (S^3 must not silently become the plain dense score)."""
    reader()  # WordNet files removed since a look-up was cached: still refused
    return list(_synonyms(term, limit, senses, pos))


@lru_cache(maxsize=65_536)
def _synonyms(term: str, limit: int, senses: int, pos: str | None) -> tuple[str, ...]:
    """Cached: a query asks for the same words several times (variants, sparse expansion), and so do users."""
    if not term.strip():
        return ()
    wn = reader()
    key = "_".join(term.lower().split())
    found: list[str] = []
    for synset in wn.synsets(key, pos=pos)[:senses]:
        for lemma in synset.lemma_names():
            name = lemma.replace("_", " ").lower()
            if name != term.lower() and name not in found:
                found.append(name)
    return tuple(found[:limit])
