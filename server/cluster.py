"""Serving indexes on a Ray cluster with Ray Serve: every shard of every served index a deployment with
``replicas`` copies spread over the nodes, and the existing FastAPI app (``server/app.py``) the ingress deployment.

Why this split: the ingress does everything that needs the model (it plans the query and encodes it once,
fuses, reranks and describes the hits: the same ``QueryRouter`` as one process), while a shard replica holds one
shard's files and answers the narrow shard interface (``stair_search.index.shard``): a first-stage query, and
rows' fields, vectors, features and explanations. Shard replicas import neither torch nor a model. The ingress's
reader reaches each shard through a :class:`RemoteShard` (the ``ShardOpener`` it is built with), so the plan,
the fusion and every answer are those of in-process serving (tests/test_cluster.py compares them).

Serve applications: one per shard (``stair-search.<index>.<shard>``, deployment ``ShardServer``, no HTTP
route), and the ingress (``stair-search``, deployment ``Ingress`` at ``/``). The driver (:class:`ClusterServer`,
what ``stair-search serve --cluster`` runs) deploys the shards first, then the ingress, and watches the
manifests: an append deploys the new shards' applications (the ingress's registry swaps the new version in once
they answer, as it does in one process); a rebuilt index (a new manifest ``created``) updates each shard's
``user_config``, which Serve applies replica by replica (``reconfigure``); a delete needs no deployment at all:
the ingress sends the shard's manifest entry with every call, and a replica applies that entry's tombstone file
(read from the shared path) to the parts it holds. A replica keeps the previous generation open beside the new
one, so a request planned on either version is answered by that version.

Faults: a call that fails on a replica that died (or a node that left) is retried on another replica until
``shard_timeout_s`` has passed; then the shard is unavailable: the search answers 503 naming it, or, when the
request asks for a partial answer, leaves it out and names it. Serve starts a replacement replica by itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stair_search.index import LocalShard, Manifest, ShardInfo, ShardQuery, ShardUnavailable
from stair_search.index.shard import Answer
from stair_search.vocabulary import Vocabulary

log = logging.getLogger("stair_search.server")
APP = "stair-search"
# Ray's crash-signal handler and the JVM's SIGSEGV handling clash in workers that run Lucene (pyserini#1867,
# ray#36415): every replica runs with Ray's handler off.
# Sync replica methods run on a thread pool, so one replica answers several calls at once.
REPLICA_ENV = {"RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1", "RAY_SERVE_RUN_SYNC_IN_THREADPOOL": "1"}
SHARD_CALLS = frozenset({"search", "find", "documents", "vectors", "sparse_vectors", "features", "describe",
                         "metadata_fields", "live_rows", "ids", "term_statistics", "nonzeros"})
GENERATIONS_KEPT = 2  # a replica answers the current and the previous version of its shard
RETRY_PAUSE_S = 0.05
ATTEMPT_S = 1.0  # one try's wait: a call stuck on a replica that died is sent again, to another replica
UNHEALTHY = ("DEPLOY_FAILED", "UNHEALTHY")  # application states the driver deploys again


@dataclass(frozen=True)
class ClusterSettings:
    address: str = "local"  # "local": a new Ray instance here; "auto": the cluster this machine joined; an address
    replicas: int = 1  # copies of every shard, on different nodes when the cluster has enough of them
    ingress_replicas: int = 1
    copy_to: str | None = None  # copy each shard to this node-local folder first (None: read the shared path)
    shard_timeout_s: float = 10.0  # how long a shard call may wait for a ready replica before it is unavailable
    proxy_location: str = "HeadOnly"  # where Serve's HTTP proxy listens ("EveryNode" behind a load balancer)

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.ingress_replicas < 1:
            raise ValueError(f"replicas must be 1 or more, got {self.replicas} and {self.ingress_replicas}")
        if not self.shard_timeout_s > 0:
            raise ValueError(f"shard_timeout_s must be above 0, got {self.shard_timeout_s}")


class StaleShard(RuntimeError):
    """A replica asked for a version of its shard it does not hold (yet): the caller asks again."""


def shard_app(index: str, shard: str) -> str:
    return f"{APP}.{index}.{shard}"


def generation(manifest: Manifest, info: ShardInfo) -> dict[str, Any]:
    """What identifies a shard's immutable files: a rebuild (a new manifest) or another shard changes it; a
    delete (a new tombstone) does not."""
    return {"created": manifest.created, "name": info.name, "count": info.count, "dense": info.dense,
            "text": info.text}


# ------------------------------------------------------------------------------------------------ shard side


class ShardServer:
    """One shard in a Serve replica: its LocalShard (no torch, no model), answering one call at a time by name.

    ``user_config`` (``reconfigure``): {"index_dir", "vocabulary", "scale", "generation", "shard"}."""

    def __init__(self, copy_to: str | None = None):
        self.copy_to = copy_to
        self._shards: dict[str, LocalShard] = {}  # generation key -> the shard as first opened
        self._views: dict[tuple[str, str | None], LocalShard] = {}  # (generation, tombstone) -> shard with them
        self._vocabulary: Vocabulary | None = None
        self._lock = threading.Lock()
        self.config: dict[str, Any] = {}

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Open (or copy, then open) the shard this config names, and keep the previous generation open."""
        info = ShardInfo(**config["shard"])
        key = _key(config["generation"])
        if key not in self._shards:
            folder = Path(config["index_dir"])
            if self.copy_to:
                folder = self._local_copy(folder, info, key)
            if self.config.get("vocabulary") != config["vocabulary"] or self._vocabulary is None:
                self._vocabulary = Vocabulary.load(config["vocabulary"])
            shard = LocalShard(folder, info, self._vocabulary, config["scale"])
            shard.warm()
            with self._lock:
                self._shards[key] = shard
                for old in list(self._shards)[:-GENERATIONS_KEPT]:
                    self._drop(old)
        self.config = config

    def call(self, generation: dict[str, Any], shard: dict[str, Any], method: str, *args: Any) -> Any:
        """``method`` of the Shard interface on the shard as the caller's manifest describes it (``shard``: its
        entry, whose tombstone is applied)."""
        if method not in SHARD_CALLS:
            raise ValueError(f"not a shard call: {method!r}")
        return getattr(self._view(_key(generation), ShardInfo(**shard)), method)(*args)

    def status(self) -> dict[str, Any]:
        """What this replica holds: the generations open, the views (tombstones) made, and whether a model or
        torch was loaded here (never: only the ingress runs one; Lucene is searched without Pyserini's
        torch-importing search package, see stair_search/index/lucene.py)."""
        model = any(name in sys.modules for name in ("stair_search.encode", "stair_search.models", "open_clip"))
        return _where() | {"generations": list(self._shards), "views": len(self._views), "model": model,
                           "torch": "torch" in sys.modules}

    def check_health(self) -> None:
        """Serve's health check: the shard's files are still there (a replica that lost them is replaced)."""
        for shard in list(self._shards.values())[-1:]:
            if not shard.dir.is_dir():
                raise RuntimeError(f"shard folder {shard.dir} is gone")

    def _view(self, key: str, info: ShardInfo) -> LocalShard:
        with self._lock:
            view = self._views.get((key, info.deleted))
            if view is not None:
                return view
            base = self._shards.get(key)
            if base is None:
                raise StaleShard(f"{info.name}: version {key} is not open here")
            tombstones = Path(self.config["index_dir"]) / "shards" / info.name if self.copy_to else None
            try:
                view = base.with_deletes(info, tombstones)
            except FileNotFoundError as exc:  # a version two mutations old: its caller moves on to a newer one
                raise StaleShard(str(exc)) from None
            self._views[(key, info.deleted)] = view
            return view

    def _drop(self, key: str) -> None:
        shard = self._shards.pop(key)
        self._views = {k: v for k, v in self._views.items() if k[0] != key}
        shard.close()

    def _local_copy(self, index_dir: Path, info: ShardInfo, key: str) -> Path:
        """Copy the shard's folder to node-local disk (once per generation), before the replica reports ready."""
        target = Path(self.copy_to) / hashlib.sha256(key.encode()).hexdigest()[:16]  # the same on every replica
        shard_dir = info.path(target)
        if not shard_dir.is_dir():
            partial = shard_dir.with_name(shard_dir.name + f".copying-{os.getpid()}")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(info.path(index_dir), partial)
            try:
                os.replace(partial, shard_dir)
            except OSError:  # another replica on this node copied it first: use that copy
                shutil.rmtree(partial, ignore_errors=True)
                if not shard_dir.is_dir():
                    raise
        return target


def _key(generation: dict[str, Any]) -> str:
    return repr(sorted(generation.items()))


# ------------------------------------------------------------------------------------------------ ingress side


class RemoteShard:
    """The Shard interface over a shard's Serve deployment (what the ingress's reader holds)."""

    def __init__(self, handle: Any, manifest: Manifest, info: ShardInfo, timeout_s: float):
        self.handle, self.info, self.timeout_s = handle, info, timeout_s
        self._generation, self._entry = generation(manifest, info), asdict(info)
        self._fields: frozenset[str] | None = None

    def submit(self, query: ShardQuery) -> _RemoteAnswer:
        return _RemoteAnswer(self, self._send("search", query), query)

    def ready(self) -> bool:
        try:
            self._call("metadata_fields", timeout_s=min(2.0, self.timeout_s))
            return True
        except ShardUnavailable:
            return False

    def find(self, doc_id: str) -> int | None:
        return self._call("find", doc_id)

    def documents(self, rows, columns=None):
        return self._call("documents", list(rows), columns)

    def vectors(self, rows):
        return self._call("vectors", list(rows))

    def sparse_vectors(self, rows):
        return self._call("sparse_vectors", list(rows))

    def features(self, rows):
        return self._call("features", list(rows))

    def describe(self, rows, columns, sparse, text):
        return self._call("describe", list(rows), list(columns), None if sparse is None else dict(sparse), text)

    def metadata_fields(self) -> frozenset[str]:
        if self._fields is None:  # the shard's files do not change under one generation
            self._fields = self._call("metadata_fields")
        return self._fields

    def live_rows(self):
        return self._call("live_rows")

    def ids(self):
        return self._call("ids")

    def term_statistics(self):
        return self._call("term_statistics")

    def nonzeros(self):
        return self._call("nonzeros")

    def warm(self) -> None:
        self.metadata_fields()

    def close(self) -> None:
        """Nothing to release here: the replicas hold the files."""

    def _send(self, method: str, *args: Any) -> Any:
        return self.handle.call.remote(self._generation, self._entry, method, *args)

    def _call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        return self.wait(None, method, args, time.monotonic() + (timeout_s or self.timeout_s))

    def wait(self, sent: Any, method: str, args: tuple, deadline: float) -> Any:
        """The answer of a call (``sent``, or sent now), asked again on a stale or failed replica until
        ``deadline``; then ShardUnavailable."""
        from ray.exceptions import RayTaskError

        while True:
            response = sent if sent is not None else self._send(method, *args)
            sent = None
            try:
                attempt = min(deadline - time.monotonic(), max(ATTEMPT_S, self.timeout_s / 4))
                return response.result(timeout_s=max(0.05, attempt))
            except TimeoutError as exc:
                response.cancel()
                problem = exc
            except StaleShard:
                problem: BaseException = StaleShard(f"{self.info.name} is being updated")
            except RayTaskError as exc:  # the shard's own code failed: not a fault to retry
                raise exc.as_instanceof_cause() from None
            except Exception as exc:  # a replica that died, a node that left, no replica yet, a timeout
                problem = exc
            if time.monotonic() >= deadline:
                raise ShardUnavailable(self.info.name, f"{type(problem).__name__}: {problem}")
            time.sleep(RETRY_PAUSE_S)


@dataclass
class _RemoteAnswer:
    shard: RemoteShard
    sent: Any
    query: ShardQuery

    def result(self) -> Answer:
        return self.shard.wait(self.sent, "search", (self.query,), time.monotonic() + self.shard.timeout_s)


def remote_shards(index: str, timeout_s: float) -> Callable[[Path, Manifest, ShardInfo, Vocabulary], RemoteShard]:
    """The ``ShardOpener`` of an index whose shards are Serve deployments (``shard_app``)."""
    from ray import serve

    def open_shard(index_dir: Path, manifest: Manifest, info: ShardInfo, vocabulary: Vocabulary) -> RemoteShard:
        handle = serve.get_deployment_handle("ShardServer", app_name=shard_app(index, info.name))
        return RemoteShard(handle, manifest, info, timeout_s)

    return open_shard


class Ingress:
    """The ingress deployment: the service's FastAPI app, its reader's shards reached over Serve."""

    def __init__(self, indexes: Mapping[str, str], settings: Any, model: str | None, shard_timeout_s: float):
        self.indexes, self.settings, self.model, self.shard_timeout_s = dict(indexes), settings, model, shard_timeout_s

    def status(self) -> dict[str, Any]:
        """Where this ingress replica runs."""
        return _where()

    async def __serve_build_asgi_app__(self) -> Any:
        """Built off the replica's event loop: opening the registry asks the shards (blocking calls)."""
        return await asyncio.to_thread(self._build)

    def _build(self) -> Any:
        from server.app import create_app
        from server.registry import IndexRegistry

        settings = self.settings
        registry = IndexRegistry(self.indexes, model=self.model, batching=settings.encode_batching,
                                 batch_wait_s=settings.batch_wait_s, query_weights=settings.query_weights,
                                 shards=lambda name: remote_shards(name, self.shard_timeout_s))
        return create_app(registry, settings)


# ------------------------------------------------------------------------------------------------ driver


class ClusterServer:
    """Deploys the shards and the ingress on the Ray cluster this process is connected to, and keeps the shard
    deployments in step with the published manifests (``refresh``; ``watch`` runs it every interval)."""

    def __init__(self, indexes: Mapping[str, str | Path], settings: Any, cluster: ClusterSettings,
                 model: str | None = None):
        if not indexes:
            raise ValueError("give at least one index directory to serve")
        self.dirs = {name: Path(path).resolve() for name, path in indexes.items()}
        self.settings, self.cluster, self.model = settings, cluster, model
        self._deployed: dict[str, str] = {}  # shard application -> the generation key it serves
        self._signatures: dict[str, tuple] = {}

    def deploy(self) -> None:
        """Every shard's application (ready replicas before it returns), then the ingress at ``/``."""
        from ray import serve

        for name in self.dirs:
            self._deploy_index(name)
        ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress")
        app = ingress.options(num_replicas=self.cluster.ingress_replicas,
                              ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": REPLICA_ENV}}).bind(
            {name: str(path) for name, path in self.dirs.items()}, self.settings, self.model,
            self.cluster.shard_timeout_s)
        serve.run(app, name=APP, route_prefix="/")

    def refresh(self) -> list[str]:
        """Deploy what newly published manifests need (new shards, rebuilt shards) and any shard application that
        is gone (deleted by hand, or its replicas could not be placed); returns the indexes done."""
        from ray import serve

        applications = serve.status().applications
        for app in [app for app in self._deployed
                    if app not in applications or str(applications[app].status).split(".")[-1] in UNHEALTHY]:
            del self._deployed[app]  # deployed again below
        done = []
        for name, folder in self.dirs.items():
            try:
                signature = _signature(folder)
                gone = any(app not in self._deployed for app in self._expected(name))
                if gone or signature != self._signatures.get(name):
                    self._deploy_index(name)
                    done.append(name)
            except Exception as exc:  # a half-published index, a shard that cannot start yet: the next round
                log.warning("index %s: shards not deployed yet: %s", name, exc)
        return done

    def undeploy(self) -> None:
        """Delete this server's Serve applications: the ingress first, then every shard's."""
        from ray import serve

        for app in [APP, *self._deployed]:
            serve.delete(app)
        self._deployed.clear()

    def _expected(self, name: str) -> list[str]:
        return [shard_app(name, info.name) for info in Manifest.load(self.dirs[name]).shards]

    def watch(self, interval_s: float, stop: threading.Event) -> None:
        while not stop.wait(interval_s):
            self.refresh()

    def _deploy_index(self, name: str) -> None:
        from ray import serve

        folder = self.dirs[name]
        signature = _signature(folder)
        manifest = Manifest.load(folder)
        nodes = _alive_nodes()
        for info in manifest.shards:
            app, gen = shard_app(name, info.name), generation(manifest, info)
            if self._deployed.get(app) == _key(gen):
                continue  # the same files: a delete is applied per call, nothing to deploy
            config = {"index_dir": str(folder), "vocabulary": manifest.vocabulary, "scale": manifest.scale,
                      "generation": gen, "shard": asdict(info)}
            spread = {"max_replicas_per_node": 1} if nodes >= self.cluster.replicas > 1 else {}
            deployment = serve.deployment(ShardServer, name="ShardServer").options(
                num_replicas=self.cluster.replicas, user_config=config, health_check_period_s=5,
                ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": REPLICA_ENV}}, **spread)
            serve.run(deployment.bind(self.cluster.copy_to), name=app, route_prefix=None)
            self._deployed[app] = _key(gen)
        self._signatures[name] = signature


def _signature(folder: Path) -> tuple:
    stat = os.stat(folder / "manifest.json")
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _where() -> dict[str, Any]:
    """This replica's node, actor name and process."""
    import ray

    context = ray.get_runtime_context()
    return {"node": context.get_node_id(), "actor": context.get_actor_name(), "pid": os.getpid()}


def _alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def loopback_cluster(workers: int):
    """A head and ``workers`` worker nodes on this machine (``ray.cluster_utils.Cluster``: separate raylets, one
    CPU each), bound to 127.0.0.1, with this process connected: the cluster path tried on one machine. Run it in a
    network namespace of its own with only loopback up (``unshare -n``), so no traffic leaves the machine."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.update(REPLICA_ENV)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                             "include_dashboard": False})
    for _ in range(workers):
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    return cluster


def serve_on_cluster(indexes: Mapping[str, str | Path], settings: Any, cluster: ClusterSettings, host: str,
                     port: int, model: str | None = None, stop: threading.Event | None = None) -> ClusterServer:
    """Connect to (or start) the Ray cluster, start Serve's HTTP proxy on ``host:port``, deploy, and keep the
    deployments in step with the manifests until ``stop`` is set (None: return at once after deploying)."""
    import ray
    from ray import serve

    if not ray.is_initialized() and cluster.address == "local":
        ray.init(runtime_env={"env_vars": REPLICA_ENV}, include_dashboard=False, log_to_driver=False)
    elif not ray.is_initialized():
        ray.init(address=cluster.address, runtime_env={"env_vars": REPLICA_ENV}, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port, "location": cluster.proxy_location})
    server = ClusterServer(indexes, settings, cluster, model)
    server.deploy()
    if stop is not None:
        try:
            server.watch(settings.reload_interval_s or 2.0, stop)
        finally:
            server.undeploy()
    return server
