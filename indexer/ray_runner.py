"""The Ray runner: the same chunks as the local runner, decoded and encoded by actors on a Ray cluster.

The encoder is put in Ray's object store once; a pool of actors (one per GPU when the cluster has GPUs,
else one per ``CPU_ACTOR_CPUS`` CPUs) each hold the model, and each batch of items goes to the next actor,
which decodes the bytes (the same :func:`indexer.decode.decode` as the local workers: reduced to the model's
need, EXIF fields read as the job asked) and encodes them.
Results are taken back in source order and pass through the shared :class:`ChunkBuilder`, so the job spools,
journals, resumes and writes shards exactly as with ``--runner local``: same ids, same vectors.

Why long-lived actors with a bounded queue of batches rather than one Ray Data pipeline per window: the job
must spool every encoded batch, in source order, before it counts as done (that is what makes ``kill -9``
safe), and a Ray dataset per window would start its actor pool, and load the model, again for every window.
At most ``IN_FLIGHT_PER_ACTOR`` batches per actor are queued, so a huge source never sits in memory.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from indexer.decode import DecodeLimits, decode
from indexer.journal import Chunk
from indexer.pipeline import ChunkBuilder, NumberedItem
from indexer.sources import Item
from stair_search.encode import EncodedBatch, Encoder

IN_FLIGHT_PER_ACTOR = 2  # batches queued per actor: it never waits for work, and memory stays bounded
CPU_ACTOR_CPUS = 2  # CPUs an encoder actor asks for on a cluster without GPUs (its torch threads)


class EncodeActor:
    """Decodes and encodes one batch of rows; holds the model (moved to the actor's GPU when it has one)."""

    def __init__(self, encoder_ref: list, limits: DecodeLimits, torch_threads: int | None = None):
        import ray

        self.encoder: Encoder = ray.get(encoder_ref[0])  # wrapped in a list: Ray would resolve a bare ref
        if torch_threads:
            torch.set_num_threads(torch_threads)
        if torch.cuda.is_available():
            self.encoder.model.to("cuda")
            self.encoder.device = torch.device("cuda")
        self.limits = limits

    def __call__(self, batch: dict[str, list]) -> list[dict[str, Any]]:
        """One result row per item: its size and skip reason, and its vectors when it could be decoded."""
        decoded = [decode(Item(id="", source=source, path=path, data=data), position,
                          self.encoder.model.preprocess, self.limits)
                   for position, source, path, data in zip(batch["position"], batch["source"], batch["path"],
                                                           batch["data"], strict=True)]
        rows = [{"position": d.position, "skip_reason": d.skip_reason, "width": d.width, "height": d.height,
                 "metadata": d.metadata} for d in decoded]
        good = [i for i, d in enumerate(decoded) if d.pixels is not None]
        if good:
            encoded = self.encoder.encode_pixels(torch.stack([decoded[i].pixels for i in good]))
            for j, i in enumerate(good):
                rows[i].update(dense=encoded.dense[j], sparse=encoded.sparse[j], local=encoded.local[j],
                               local_positions=encoded.local_positions[j])
        return rows


def _stack_rows(rows: list[dict[str, Any]]) -> EncodedBatch:
    """Per-item results of the actors -> one EncodedBatch (the ChunkBuilder's ``encode`` for this runner)."""
    return EncodedBatch(dense=np.stack([r["dense"] for r in rows]), sparse=[r["sparse"] for r in rows],
                        local=np.stack([r["local"] for r in rows]),
                        local_positions=np.stack([r["local_positions"] for r in rows]))


def require_ray() -> None:
    """A one-line install hint when Ray is missing; a job checks this before it writes anything."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ModuleNotFoundError("--runner ray needs Ray: pip install 'ray>=2.9' (in a checkout of stair-search: "
                                  "pip install -e '.[ray]'), or use --runner local.") from None


def connect(address: str | None) -> list[dict[str, float]]:
    """Join the cluster at ``address`` (None: the running one, or a new local instance); each alive node's
    resources (an actor has to fit on one node)."""
    require_ray()
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def start_actors(encoder: Encoder, nodes: list[dict[str, float]], limits: DecodeLimits) -> list[Any]:
    """One actor per GPU, or CPU actors of up to ``CPU_ACTOR_CPUS`` each, as many as the nodes hold (at least
    one). Sized per node: on a cluster of one-CPU nodes, a two-CPU actor would never be placed."""
    import ray

    encoder_ref = [ray.put(encoder)]
    gpus = sum(int(node.get("GPU", 0)) for node in nodes)
    node_cpus = [int(node.get("CPU", 0)) for node in nodes] or [1]
    if gpus:
        per_gpu = min(CPU_ACTOR_CPUS, max(1, min(c // max(1, int(n.get("GPU", 0)))
                                                for c, n in zip(node_cpus, nodes, strict=True) if n.get("GPU"))))
        remote = ray.remote(num_gpus=1, num_cpus=per_gpu)(EncodeActor)
        return [remote.remote(encoder_ref, limits) for _ in range(gpus)]
    per_actor = max(1, min(CPU_ACTOR_CPUS, max(node_cpus)))
    remote = ray.remote(num_cpus=per_actor)(EncodeActor)
    count = max(1, sum(cpus // per_actor for cpus in node_cpus))
    return [remote.remote(encoder_ref, limits, per_actor) for _ in range(count)]


def ray_chunks(items: Iterable[NumberedItem], encoder: Encoder, builder_args: dict[str, Any],
               ray_address: str | None, limits: DecodeLimits) -> Iterator[Chunk]:
    """Decode + encode every item on Ray, yielding chunks in source order (like ``local_chunks``)."""
    import ray

    actors = start_actors(encoder, connect(ray_address), limits)
    builder = ChunkBuilder(encode=_stack_rows, **builder_args)
    in_flight: deque = deque()
    end = None
    try:
        for batch_number, batch in enumerate(_batches(items, builder.batch_size)):
            rows = _rows_to_encode(batch)
            ref = actors[batch_number % len(actors)].__call__.remote(rows) if rows["position"] else None
            in_flight.append((batch, ref))
            if len(in_flight) >= IN_FLIGHT_PER_ACTOR * len(actors):
                yield from _take(builder, *in_flight.popleft())
            end = batch[-1][0] + 1
        while in_flight:
            yield from _take(builder, *in_flight.popleft())
        if end is not None and (chunk := builder.flush(end)) is not None:
            yield chunk
    finally:
        for actor in actors:
            ray.kill(actor)


def _batches(items: Iterable[NumberedItem], size: int) -> Iterator[list[NumberedItem]]:
    items = iter(items)
    while batch := list(itertools.islice(items, size)):
        yield batch


def _rows_to_encode(batch: list[NumberedItem]) -> dict[str, list]:
    """What an actor needs to read each item that is not skipped already (no id, caption or metadata)."""
    todo = [(position, item) for position, item, reason in batch if reason is None]
    return {"position": [p for p, _ in todo], "source": [i.source for _, i in todo],
            "path": [i.path for _, i in todo], "data": [i.data for _, i in todo]}


def _take(builder: ChunkBuilder, batch: list[NumberedItem], ref: Any) -> Iterator[Chunk]:
    """Feed one batch's results to the builder in source order; the chunks it completes."""
    import ray

    results = {row["position"]: row for row in ray.get(ref)} if ref is not None else {}
    for position, item, reason in batch:
        row = results.get(position, {})
        chunk = builder.add(position, item, reason or row.get("skip_reason"), row.get("width", 0),
                            row.get("height", 0), row, row.get("metadata"))
        if chunk is not None:
            yield chunk
