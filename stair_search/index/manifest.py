"""The index directory's ``manifest.json``: what the index holds and which model it was built with.

The layout of the directory is in index/layout.py. The manifest is written last and atomically, so a reader sees
either the previous complete index or the new one. A searcher refuses a model whose weights or vocabulary differ,
saying which. What the index needs of a model is a :class:`ModelRecord` (no torch, no weights): the encoder hands
one over (``Encoder.record``), and the writer and the manifest check take nothing else.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stair_search.atomic import atomic_write
from stair_search.index.files import DamagedIndexError
from stair_search.index.layout import MANIFEST, shard_dir
from stair_search.vocabulary import Vocabulary

FORMAT_VERSION = 1
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")


class IndexMismatchError(ValueError):
    """The model given to a searcher or writer is not the one the index was built with."""


@dataclass(frozen=True)
class ModelRecord:
    """What an index records and checks of the model its vectors come from."""

    name: str
    spec: str  # how to load the model again (a built-in name, a config JSON or a checkpoint)
    pretrained: str | None
    fingerprint: str  # hash of the weights (models/checkpoint.py)
    vocabulary_location: str  # where the word-piece vocabulary is read from (usually pkg://...)
    vocabulary: Vocabulary = field(repr=False, compare=False)
    embed_dim: int
    num_local: int
    sparse_source: str  # "heads", "heads+concepts", "concepts" or "none" (models/stair.py SPARSE_SOURCES)


@dataclass
class ShardInfo:
    name: str
    count: int
    dense: dict[str, Any]  # DenseSpec.to_dict() of this shard's FAISS index
    # Deleted documents stay in the shard's files (no rebuild); their rows are listed in this tombstone file
    # (relative to the shard directory). A new file name per change keeps the manifest swap atomic.
    deleted: str | None = None
    deleted_count: int = 0
    text: bool = False  # the shard has a text-route (BM25) index: some of its documents have text

    def path(self, index_dir: Path) -> Path:
        return shard_dir(index_dir, self.name)

    @property
    def live(self) -> int:
        """Documents a search can return: rows written minus rows deleted."""
        return self.count - self.deleted_count


@dataclass
class Manifest:
    model: dict[str, Any]  # {"name", "spec" (how to load it), "pretrained", "fingerprint"}
    vocabulary: str  # where the word-piece vocabulary is read from (usually pkg://...)
    vocabulary_sha256: str
    scale: float
    embed_dim: int
    num_local: int
    shards: list[ShardInfo] = field(default_factory=list)
    # How the sparse vectors were made (models/stair.py SPARSE_SOURCES): "heads" (trained STAIR heads; every
    # index built before this field existed), "heads+concepts" (both, summed), "concepts" (training-free,
    # models/concepts.py) or "none".
    sparse: str = "heads"
    # Keys of the indexing jobs that built this index (indexer/journal.py job_key): a finished job run again
    # finds its key here and stops, saying the index is complete.
    jobs: list[str] = field(default_factory=list)
    # What the text route (BM25, index/text.py) indexes: "caption" and metadata field names; None for an index
    # built without it (every index from before it existed).
    text_fields: list[str] | None = None
    # How the training-free concept vectors were calibrated: None (the model's reference photos, models/concepts.py)
    # or, for an index built from embeddings computed elsewhere (indexer/embeddings.py), {"calibrated_on":
    # "collection embeddings", "sample": N, "sample_sha256", "local_features": false}: its documents have none.
    # Left out of the file while None, so every other index reads as before.
    calibration: dict[str, Any] | None = None
    # When the writer merges shards by itself (index/merge.py MergePolicy.to_dict()); None: the defaults. Left
    # out of the file while None, so an index that never set it reads as before.
    merge_policy: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def count(self) -> int:
        """Live documents (deleted ones are not counted)."""
        return sum(s.live for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["count"] = self.count
        if data["merge_policy"] is None:
            del data["merge_policy"]
        if data["calibration"] is None:  # only an index built from embeddings records one
            del data["calibration"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        data.pop("count", None)
        data["shards"] = [ShardInfo(**s) for s in data.get("shards", [])]
        return cls(**data)

    def save(self, index_dir: Path) -> None:
        """Atomic write: a temp file in the same directory, then rename over the old manifest."""
        atomic_write(Path(index_dir) / MANIFEST, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, index_dir: Path) -> Manifest:
        """The manifest, validated as data (keys, types, ranges, shard and tombstone names that stay inside the
        index): anything else is a DamagedIndexError naming the file and the first problem."""
        path = Path(index_dir) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{index_dir} is not a stair-search index: no {MANIFEST} there. "
                                    f"Build one with: stair-search index SOURCE --out {index_dir}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            problem = _problem(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            problem = f"not JSON ({exc})"
        if problem is not None:
            raise DamagedIndexError(f"{path} is damaged: {problem}; restore it from a backup or rebuild the index")
        return cls.from_dict(data)

    @classmethod
    def new(cls, model: ModelRecord, scale: float, text_fields: list[str] | None) -> Manifest:
        """The manifest of a new, still empty index built with ``model``."""
        return cls(model={"name": model.name, "spec": model.spec, "pretrained": model.pretrained,
                          "fingerprint": model.fingerprint},
                   vocabulary=model.vocabulary_location, vocabulary_sha256=model.vocabulary.sha256, scale=scale,
                   embed_dim=model.embed_dim, num_local=model.num_local, sparse=model.sparse_source,
                   text_fields=text_fields)

    def check_model(self, model: ModelRecord) -> None:
        """Raise IndexMismatchError naming every difference between the index's model and ``model``."""
        name, fingerprint = model.name, model.fingerprint
        vocabulary_sha256, embed_dim = model.vocabulary.sha256, model.embed_dim
        problems = []
        if vocabulary_sha256 != self.vocabulary_sha256:
            problems.append(f"vocabulary sha256 {vocabulary_sha256[:12]} != index {self.vocabulary_sha256[:12]}")
        if embed_dim != self.embed_dim:
            problems.append(f"embedding width {embed_dim} != index {self.embed_dim}")
        if model.sparse_source != self.sparse:
            problems.append(f"sparse vectors from {model.sparse_source} != index {self.sparse}")
        if fingerprint != self.model["fingerprint"]:
            problems.append(f"model weights {name} ({fingerprint[:12]}) != index model "
                            f"{self.model['name']} ({self.model['fingerprint'][:12]})")
        if problems:
            raise IndexMismatchError(
                "The model does not match the index: " + "; ".join(problems)
                + f". Search with the model the index was built with ({self.model['spec']}) or rebuild the index."
            )


_NUMBER = (int, float)
_NONE = type(None)
# key -> (accepted types, required); bool is refused where a number is asked (json true is not 1 here)
_MANIFEST_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    "model": ((dict,), True), "vocabulary": ((str,), True), "vocabulary_sha256": ((str,), True),
    "scale": (_NUMBER, True), "embed_dim": ((int,), True), "num_local": ((int,), True), "shards": ((list,), False),
    "sparse": ((str,), False), "jobs": ((list,), False), "text_fields": ((list, _NONE), False),
    "calibration": ((dict, _NONE), False),
    "merge_policy": ((dict, _NONE), False),
    "format_version": ((int,), False), "created": ((str,), False), "count": ((int,), False)}
_SHARD_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    "name": ((str,), True), "count": ((int,), True), "dense": ((dict,), True), "deleted": ((str, _NONE), False),
    "deleted_count": ((int,), False), "text": ((bool,), False)}
_MODEL_KEYS = ("name", "spec", "fingerprint")


def _problem(data: Any) -> str | None:
    """The first way ``data`` is not a manifest this version reads, or None."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    problem = _keys_problem(data, _MANIFEST_KEYS, "")
    if problem is None and data.get("format_version", 0) > FORMAT_VERSION:
        return f"format v{data['format_version']}; this stair-search reads up to v{FORMAT_VERSION} (upgrade it)"
    if problem is None and not all(isinstance(data["model"].get(key), str) for key in _MODEL_KEYS):
        problem = f"'model' must name its {', '.join(_MODEL_KEYS)} as text"
    if problem is None and not (data["scale"] > 0 and data["embed_dim"] > 0 and data["num_local"] >= 0):
        problem = "'scale' and 'embed_dim' must be positive, 'num_local' not negative"
    for position, shard in enumerate(data.get("shards", []) if problem is None else []):
        problem = _shard_problem(shard, f"shards[{position}]")
        if problem is not None:
            break
    return problem


def _shard_problem(shard: Any, where: str) -> str | None:
    if not isinstance(shard, dict):
        return f"{where} is a JSON {type(shard).__name__}, not an object"
    problem = _keys_problem(shard, _SHARD_KEYS, f"{where}.")
    if problem is not None:
        return problem
    if not 0 <= shard.get("deleted_count", 0) <= shard["count"]:
        return f"{where}: 'count' and 'deleted_count' must satisfy 0 <= deleted_count <= count"
    for what, name in (("shard", shard["name"]), ("tombstone", shard.get("deleted"))):
        if name is not None and not _plain_name(name):  # every path the manifest names stays inside the index
            return f"{where}: {what} name {name!r} is not a plain file name inside the index"
    return None


def _keys_problem(data: dict, keys: dict[str, tuple[tuple[type, ...], bool]], where: str) -> str | None:
    unknown = sorted(set(data) - set(keys))
    if unknown:
        return f"unknown key {where}{unknown[0]!r}"
    for key, (types, required) in keys.items():
        if key not in data:
            if required:
                return f"missing key {where}{key!r}"
            continue
        value = data[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join("null" if t is _NONE else t.__name__ for t in types)
            return f"{where}{key!r} must be {names}, not {type(value).__name__} {str(value)[:40]!r}"
    return None


def _plain_name(name: object) -> bool:
    """A shard folder or tombstone file name: one path component, no way out of its folder."""
    return isinstance(name, str) and bool(_PLAIN.fullmatch(name)) and ".." not in name
