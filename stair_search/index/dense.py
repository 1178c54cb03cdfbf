"""Dense (CLIP embedding) index: a thin, validated wrapper around a FAISS inner-product index.

Why it looks the way it does:
- Vectors are L2-normalised, so inner product == cosine similarity and scores from different shards are
  comparable when the search merges them. Rows that are not unit length are normalised on the way in
  (a copy is made only then), so the invariant holds whatever the caller passes.
- Three index kinds cover the size range of a shard: exact ``flat`` for small collections, ``hnsw`` when the
  float vectors plus graph still fit in memory, ``ivfpq`` (compressed codes) when they do not.
  :func:`choose_spec` picks one; :class:`DenseSpec` records what was built so a reload can restore it.
- FAISS is imported lazily (inside functions), so ``import stair_search`` and sparse-only work never need it,
  and nothing here touches FAISS' global state (thread count) unless :func:`set_num_threads` is called.
- Missing results are padded with row -1 and score -inf (FAISS itself pads with -3.4e38), so callers can
  ask for any k and filter with ``rows >= 0``.
- A shard with deleted rows is searched through :meth:`DenseShard.without`, an in-memory copy that no longer
  holds them: flat and IVF-PQ scan every row they hold, so 30% deleted rows made every query 1.4x slower than
  in the compacted shard, and FAISS' own ``IDSelector`` filtering runs outside the vectorised scan (2x slower
  still, measured). HNSW cannot drop nodes from its graph; its search cost barely depends on its size.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from stair_search.atomic import atomic_path

KINDS = ("flat", "hnsw", "ivfpq")
FAISS_MISSING = "FAISS is not installed: pip install 'stair-search[cpu]' (or [gpu] for faiss-gpu)"
FLAT_LIMIT = 100_000  # below this many vectors exact search is fast enough and needs no tuning
TRAIN_SAMPLE = 100_000  # IVF-PQ trains on at most this many vectors (more only if nlist needs them)
MIN_POINTS_PER_CENTROID = 39  # FAISS warns below this: k-means centroids become unreliable
HNSW_DEFAULTS = {"M": 32, "ef_construction": 200, "ef_search": 128}
IVFPQ_NBITS = 8
IVFPQ_NPROBE = 16
# The PQ's sub-quantiser k-means (m of them, 2**nbits codewords in dim/m dimensions): FAISS trains each on up to
# 256 points per codeword for 25 iterations, 2-3 minutes of a core for m=128 at any shard size; 64 points and 10
# iterations take a quarter of that with the same recall@10 (0.874 against 0.868, 20k clustered 512-d vectors).
PQ_POINTS_PER_CODEWORD = 64
PQ_ITERATIONS = 10
GPU_MAX_K = 2048  # FAISS GPU k-selection limit
UNIT_TOLERANCE = 1e-4  # rows whose norm is this close to 1 are taken as already normalised
FALLBACK_TOO_FEW = "too few vectors"


@dataclass
class DenseSpec:
    """What kind of FAISS index to build and its parameters; stored in the manifest next to the index.

    params: hnsw -> M, ef_construction, ef_search; ivfpq -> nlist, m (sub-quantisers), nbits, nprobe.
    A flat index built in place of IVF-PQ (too few vectors to train) has params["fallback"] set.
    """

    kind: str
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown dense index kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if not isinstance(self.params, dict):
            raise ValueError(f"DenseSpec.params must be a dict, got {type(self.params).__name__}")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, data: dict) -> DenseSpec:
        if not isinstance(data, dict) or "kind" not in data:
            raise ValueError(f"a dense spec needs a 'kind' key, got {data!r}")
        return cls(kind=data["kind"], params=dict(data.get("params") or {}))


def choose_spec(n: int, dim: int, memory_budget_bytes: int | None = None) -> DenseSpec:
    """Pick the index kind for ``n`` vectors of dimension ``dim``.

    - ``n < 100_000``: flat. Exact search over 100k x 512 floats takes a few ms per query on a CPU, so an
      approximate index would only cost recall and build time.
    - Larger: HNSW (M=32, efConstruction=200, efSearch=128) when its memory, estimated as the float vectors
      plus the level-0 graph (``n*dim*4 + n*M*2*4`` bytes), fits ``memory_budget_bytes`` (None = no budget).
      HNSW gives the best recall/latency trade-off when memory is not the constraint.
    - Otherwise IVF-PQ, which stores ``m`` bytes per vector instead of ``4*dim``:
      ``nlist`` = 4*sqrt(n) rounded to a power of two, lowered so the training sample (at most 100k vectors)
      has >= 39 points per list (FAISS' k-means minimum); ``m`` = the largest divisor of dim <= dim//4
      (4 dimensions per 8-bit sub-quantiser keeps recall usable); nbits=8; nprobe=16.
      IVF-PQ is returned even if it does not fit the budget either: it is the smallest option there is.
    """
    if n < 0 or dim < 1:
        raise ValueError(f"need n >= 0 and dim >= 1, got n={n}, dim={dim}")
    if n < FLAT_LIMIT:
        return DenseSpec("flat", {})
    hnsw_bytes = n * dim * 4 + n * HNSW_DEFAULTS["M"] * 2 * 4
    if memory_budget_bytes is None or hnsw_bytes <= memory_budget_bytes:
        return DenseSpec("hnsw", dict(HNSW_DEFAULTS))
    return DenseSpec("ivfpq", _ivfpq_defaults(n, dim))


def set_num_threads(n: int) -> None:
    """Set FAISS' OpenMP thread count (process-wide). Only called when the user asks for it."""
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    _faiss().omp_set_num_threads(int(n))


class DenseShard:
    """Inner-product FAISS index over L2-normalised float32 vectors. Row i = the i-th vector added."""

    spec: DenseSpec

    def __init__(self, index: Any, spec: DenseSpec, *, gpu_resources: Any = None, read_only: bool = False):
        """Wrap an already built FAISS index; use :meth:`build` or :meth:`load` rather than this."""
        self._index = index
        self.spec = spec
        self._gpu_resources = gpu_resources  # must outlive the GPU index, so it lives on the instance
        self._read_only = read_only  # a memory-mapped index: FAISS aborts the process on writes to it
        self._rows: np.ndarray | None = None  # a flat copy made by ``without``: the row each position holds

    # ----------------------------------------------------------------- construction
    @classmethod
    def build(cls, vectors: np.ndarray, spec: DenseSpec | None = None, use_gpu: bool | None = None) -> DenseShard:
        """Build an index over ``vectors`` (N, D). ``spec`` None -> :func:`choose_spec` (N, D).

        Missing parameters are filled with the :func:`choose_spec` defaults and recorded in ``self.spec``
        (the caller's spec is not modified). IVF-PQ with too few vectors to train becomes flat, with
        ``params["fallback"] = "too few vectors"``. On a GPU, flat and IVF-PQ are trained, filled and searched
        there; HNSW always runs on the CPU because FAISS has no GPU HNSW.
        """
        faiss = _faiss()
        x = _as_matrix(vectors, "vectors")
        n, dim = x.shape
        spec = _resolve_spec(choose_spec(n, dim) if spec is None else spec, n, dim)
        want_gpu = _want_gpu(faiss, use_gpu)
        index = faiss.index_factory(dim, _factory_string(spec), faiss.METRIC_INNER_PRODUCT)
        if spec.kind == "hnsw":
            index.hnsw.efConstruction = int(spec.params["ef_construction"])  # must be set before add
        if spec.kind == "ivfpq":
            pq = faiss.downcast_index(faiss.extract_index_ivf(index)).pq
            pq.cp.max_points_per_centroid, pq.cp.niter = PQ_POINTS_PER_CODEWORD, PQ_ITERATIONS
        index, resources = _maybe_to_gpu(faiss, index, spec.kind, want_gpu)
        if spec.kind == "ivfpq":
            index.train(_train_sample(x, spec.params))
        if n:
            index.add(x)
        self = cls(index, spec, gpu_resources=resources)
        self._apply_search_params()
        return self

    @classmethod
    def load(cls, path: str | Path, spec: DenseSpec, use_gpu: bool | None = None, mmap: bool = False) -> DenseShard:
        """Read an index written by :meth:`save` and re-apply ``spec``'s search parameters.

        ``mmap=True`` maps the vectors / codes from the file instead of reading them into memory
        (IO_FLAG_MMAP_IFC; a FAISS too old to have it reads the file normally). A mapped index is read-only,
        so :meth:`add` refuses instead of letting FAISS abort the process. ``spec.kind`` must match the file.
        """
        faiss = _faiss()
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"dense index file not found: {path}")
        if not path.is_file():
            raise ValueError(f"{path} is not a file, so not a FAISS index")
        flags = _mmap_flags(faiss) if mmap else 0
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{path} is not a readable FAISS index ({reason})") from exc
        kind = _kind_of(faiss, index)
        if kind != spec.kind:
            raise ValueError(f"{path} holds a {kind} index but its spec says {spec.kind!r}")
        want_gpu = _want_gpu(faiss, use_gpu)
        index, resources = _maybe_to_gpu(faiss, index, kind, want_gpu)
        on_gpu = resources is not None
        self = cls(index, copy.deepcopy(spec), gpu_resources=resources,
                   read_only=bool(flags) and not on_gpu)
        self._apply_search_params()
        return self

    # ----------------------------------------------------------------- use
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows per query: (scores (Q, k) float32, rows (Q, k) int64), best first.

        ``queries`` may be (Q, D) or a single (D,) vector. Slots without a result (k > ntotal, or an
        approximate index that found fewer) hold row -1 and score -inf.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = _as_matrix(queries, "queries", dim=self.dim, allow_1d=True)
        k = int(k)
        scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
        rows = np.full((q.shape[0], k), -1, dtype=np.int64)
        kk = min(k, self.ntotal)
        if kk == 0 or q.shape[0] == 0:
            return scores, rows
        if self._on_gpu and kk > GPU_MAX_K:
            raise ValueError(f"k={kk} exceeds the FAISS GPU limit of {GPU_MAX_K}; load with use_gpu=False")
        found_scores, found_rows = self._index.search(q, kk)
        found_scores[found_rows < 0] = -np.inf
        if self._rows is not None:
            found_rows = np.where(found_rows >= 0, self._rows[np.maximum(found_rows, 0)], -1)
        scores[:, :kk] = found_scores
        rows[:, :kk] = found_rows
        return scores, rows

    def reconstruct(self, rows: np.ndarray) -> np.ndarray:
        """(n, dim) float32 stored vectors of ``rows`` (exact for flat / HNSW, the PQ approximation for IVF-PQ).

        IVF-PQ needs a direct map (row -> list, offset) before it can reconstruct; it is built once, in memory."""
        faiss = _faiss()
        rows = self._positions(np.asarray(rows, dtype=np.int64).reshape(-1))
        raw = self._cpu_index()
        ivf = faiss.try_extract_index_ivf(raw) if self.spec.kind == "ivfpq" else None
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
            ivf.make_direct_map()
        if not len(rows):
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(raw.reconstruct_batch(rows), dtype=np.float32).reshape(len(rows), -1)

    def without(self, rows: np.ndarray) -> DenseShard | None:
        """A copy in memory that no longer holds ``rows``, for searching a shard whose ``rows`` are deleted:
        its searches scan only the others and never return ``rows``; its rows keep their numbers (search and
        :meth:`reconstruct` speak this index's row numbers; reconstructing a dropped row is an error).
        None where rows cannot be dropped: HNSW (FAISS cannot remove nodes from its graph) and an index on a GPU.
        Flat: the kept vectors are copied out; IVF-PQ: a clone's inverted lists lose them."""
        if self.spec.kind == "hnsw" or self._on_gpu:
            return None
        faiss = _faiss()
        dropped = np.unique(np.asarray(rows, dtype=np.int64).reshape(-1))
        if self.spec.kind == "flat":
            kept = self._rows_kept(dropped)
            copy_index = faiss.IndexFlatIP(self.dim)
            if len(kept):
                copy_index.add(np.asarray(self._index.reconstruct_batch(self._positions(kept)), np.float32))
            out = DenseShard(copy_index, copy.deepcopy(self.spec))
            out._rows = kept
            return out
        clone = faiss.clone_index(self._index)
        ivf = faiss.extract_index_ivf(clone)
        ivf.set_direct_map_type(faiss.DirectMap.NoMap)  # FAISS removes nothing from an index with an array map
        if len(dropped):
            clone.remove_ids(faiss.IDSelectorBatch(dropped))
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # ``reconstruct``: its ids are no longer 0..n-1
        out = DenseShard(clone, copy.deepcopy(self.spec))
        out._apply_search_params()
        return out

    def _rows_kept(self, dropped: np.ndarray) -> np.ndarray:
        held = self._rows if self._rows is not None else np.arange(self.ntotal, dtype=np.int64)
        return np.setdiff1d(held, dropped, assume_unique=True)

    def _positions(self, rows: np.ndarray) -> np.ndarray:
        """Where ``rows`` are stored: themselves, except in a flat copy made by :meth:`without`."""
        if self._rows is None:
            return rows
        at = np.minimum(np.searchsorted(self._rows, rows), max(len(self._rows) - 1, 0))
        if len(rows) and (not len(self._rows) or np.any(self._rows[at] != rows)):
            missing = rows[(self._rows[at] != rows) if len(self._rows) else slice(None)]
            raise ValueError(f"rows {missing[:5].tolist()} are not held by this copy (DenseShard.without dropped "
                             f"them); read them from the index it was made from")
        return at

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the speed/recall knobs at query time and record them in ``spec.params``.

        A knob that does not apply to this index kind (nprobe on HNSW, either on flat) is ignored, so
        callers can pass both without knowing the kind.
        """
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | np.integer)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if nprobe is not None and self.spec.kind == "ivfpq":
            self.spec.params["nprobe"] = int(nprobe)
        if ef_search is not None and self.spec.kind == "hnsw":
            self.spec.params["ef_search"] = int(ef_search)
        self._apply_search_params()

    def add(self, vectors: np.ndarray) -> None:
        """Append rows; the first new vector gets row ``ntotal`` (before the call)."""
        if self._read_only:
            raise RuntimeError("this dense index was loaded with mmap=True and is read-only; "
                               "load it with mmap=False to add vectors")
        x = _as_matrix(vectors, "vectors", dim=self.dim)
        if x.shape[0]:
            self._index.add(x)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> None:
        """Write the (CPU) index to ``path`` atomically: a crash leaves the old file or none, never half."""
        if self._rows is not None:
            raise ValueError(f"this is a copy made by DenseShard.without (its rows renumbered in FAISS); save the "
                             f"index it was made from, not it, to {path}")
        with atomic_path(path) as tmp:
            _faiss().write_index(self._cpu_index(), str(tmp))

    def nbytes(self) -> int:
        """Size of the serialised index in bytes (what :meth:`save` writes)."""
        return int(_faiss().serialize_index(self._cpu_index()).nbytes)

    def __repr__(self) -> str:
        where = "gpu" if self._on_gpu else "cpu"
        return f"DenseShard(kind={self.spec.kind!r}, ntotal={self.ntotal}, dim={self.dim}, {where})"

    # ----------------------------------------------------------------- internals
    @property
    def _on_gpu(self) -> bool:
        return self._gpu_resources is not None

    def _cpu_index(self) -> Any:
        return _faiss().index_gpu_to_cpu(self._index) if self._on_gpu else self._index

    def _apply_search_params(self) -> None:
        """Push spec.params' query-time knobs into the FAISS index (CPU or GPU)."""
        faiss = _faiss()
        if self.spec.kind == "ivfpq" and "nprobe" in self.spec.params:
            space = faiss.GpuParameterSpace() if self._on_gpu else faiss.ParameterSpace()
            space.set_index_parameter(self._index, "nprobe", int(self.spec.params["nprobe"]))
        elif self.spec.kind == "hnsw" and "ef_search" in self.spec.params:
            faiss.downcast_index(self._index).hnsw.efSearch = int(self.spec.params["ef_search"])


# --------------------------------------------------------------------- helpers
def _faiss() -> ModuleType:
    """Import FAISS on first use, with an install hint instead of a bare ModuleNotFoundError."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(FAISS_MISSING) from exc
    return faiss


def _as_matrix(data: Any, name: str, dim: int | None = None, allow_1d: bool = False) -> np.ndarray:
    """Validate ``data`` as finite real (N, D) numbers and return unit-length C-contiguous float32 rows."""
    try:
        arr = np.asarray(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be an (N, D) array of numbers: {exc}") from exc
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be real numbers castable to float32, got dtype {arr.dtype}")
    if allow_1d and arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} have dimension 0")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} have dimension {arr.shape[1]} but the index has dimension {dim}")
    with np.errstate(over="ignore"):  # float64 beyond float32 range becomes inf and is reported below
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise ValueError(f"{name} contain NaN or infinite values (first in row {int(np.argmax(bad))})")
    return _unit_rows(arr)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows; returns ``x`` itself (no copy) when every row is already unit length or zero."""
    norms = np.linalg.norm(x, axis=1)
    if np.all((np.abs(norms - 1.0) <= UNIT_TOLERANCE) | (norms == 0)):
        return x
    safe = np.where(norms > 0, norms, 1.0).astype(np.float32)
    return np.ascontiguousarray(x / safe[:, None], dtype=np.float32)


def _pow2_round(x: float) -> int:
    return 1 << max(0, round(math.log2(x))) if x >= 1 else 1


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _ivfpq_defaults(n: int, dim: int) -> dict:
    """nlist ~ 4*sqrt(n) (power of 2, >= 39 training points per list), m | dim with m <= dim//4."""
    cap = _pow2_floor(min(n, TRAIN_SAMPLE) // MIN_POINTS_PER_CENTROID)
    nlist = max(1, min(_pow2_round(4 * math.sqrt(max(n, 1))), cap))
    m = max(d for d in range(1, max(1, dim // 4) + 1) if dim % d == 0)
    return {"nlist": nlist, "m": m, "nbits": IVFPQ_NBITS, "nprobe": min(IVFPQ_NPROBE, nlist)}


def _positive_int(params: dict, key: str) -> int:
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"dense spec parameter {key} must be a positive integer, got {value!r}")
    return int(value)


def _resolve_spec(spec: DenseSpec, n: int, dim: int) -> DenseSpec:
    """A complete copy of ``spec`` for (n, dim): defaults filled in, values checked, IVF-PQ fallback applied."""
    if spec.kind == "flat":
        return DenseSpec("flat", dict(spec.params))
    if spec.kind == "hnsw":
        params = {**HNSW_DEFAULTS, **spec.params}
        for key in HNSW_DEFAULTS:
            params[key] = _positive_int(params, key)
        return DenseSpec("hnsw", params)
    params = {**_ivfpq_defaults(n, dim), **spec.params}
    for key in ("nlist", "m", "nbits", "nprobe"):
        params[key] = _positive_int(params, key)
    if dim % params["m"]:
        raise ValueError(f"IVF-PQ needs m to divide the dimension: m={params['m']}, dim={dim}")
    if params["nbits"] > 16:
        raise ValueError(f"IVF-PQ nbits must be <= 16, got {params['nbits']}")
    if n < MIN_POINTS_PER_CENTROID * max(params["nlist"], 2 ** params["nbits"]):
        return DenseSpec("flat", {"fallback": FALLBACK_TOO_FEW, "requested": {"kind": "ivfpq", "params": params}})
    return DenseSpec("ivfpq", params)


def _factory_string(spec: DenseSpec) -> str:
    if spec.kind == "flat":
        return "Flat"
    if spec.kind == "hnsw":
        return f"HNSW{spec.params['M']}"
    p = spec.params
    # "np": no polysemous training. The factory enables it for IVF-PQ, but it only serves Hamming-filtered
    # search, which is never used here, and it made training ~10x slower (minutes for m=64).
    return f"IVF{p['nlist']},PQ{p['m']}x{p['nbits']}np"


def _train_sample(x: np.ndarray, params: dict, seed: int = 0) -> np.ndarray:
    """Rows to train IVF-PQ on: all of them, or a seeded random subset large enough for nlist and the PQ."""
    size = max(TRAIN_SAMPLE, MIN_POINTS_PER_CENTROID * max(params["nlist"], 2 ** params["nbits"]))
    if x.shape[0] <= size:
        return x
    chosen = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=size, replace=False))
    return np.ascontiguousarray(x[chosen])


def _kind_of(faiss: ModuleType, index: Any) -> str:
    """Which of our kinds a (CPU) FAISS index is; ValueError for anything else."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVFPQ):
        return "ivfpq"
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    raise ValueError(f"unsupported FAISS index type {type(index).__name__}")


def _mmap_flags(faiss: ModuleType) -> int:
    """IO_FLAG_MMAP_IFC maps the codes of all three kinds (flat/HNSW storage, IVF array lists) read-only.

    Not IO_FLAG_MMAP: for IVF it swaps in OnDiskInvertedLists, and write_index then writes a file that
    points at the original instead of holding the lists. FAISS without MMAP_IFC (< 1.10) reads normally.
    """
    return int(getattr(faiss, "IO_FLAG_MMAP_IFC", 0))


def _gpu_available(faiss: ModuleType) -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _want_gpu(faiss: ModuleType, use_gpu: bool | None) -> bool:
    if use_gpu is None:
        return _gpu_available(faiss)
    if use_gpu and not _gpu_available(faiss):
        raise RuntimeError("use_gpu=True but this FAISS has no GPU support or sees no GPU "
                           "(pip install 'stair-search[gpu]')")
    return bool(use_gpu)


def _maybe_to_gpu(faiss: ModuleType, index: Any, kind: str, want_gpu: bool) -> tuple[Any, Any]:
    """(index on GPU 0, its resources) when wanted and possible, else (index, None).

    FAISS has no GPU HNSW, so HNSW stays on the CPU. IVF-PQ uses float16 lookup tables, which the GPU needs
    for many sub-quantisers; configurations the GPU still rejects run on the CPU with a warning.
    """
    if not want_gpu or kind == "hnsw":
        return index, None
    resources = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = kind == "ivfpq"
    try:
        return faiss.index_cpu_to_gpu(resources, 0, index, options), resources
    except RuntimeError as exc:
        warnings.warn(f"FAISS cannot run this {kind} index on the GPU, using the CPU: {exc}", stacklevel=3)
        return index, None
