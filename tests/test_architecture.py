"""The shape of the code, checked: no two of the project's modules import each other (directly or in a longer
circle), whether at the top of a module or inside a function; the library never imports the packages built on it
(outside the command line that composes them); no package's ``__init__`` shadows one of its modules; the storage
layer runs without torch; and the slow Pyserini import stays off the paths that do not search Lucene."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from indexer import IndexJob

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stair_search", "indexer", "server")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports anywhere in its code (``from a.b import c`` is ``a.b.c`` when that
    is a module, else ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                found.add(target if target in modules else node.module)
    return {m for m in found if m in modules and m != module_name(path)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_two_modules_import_each_other():
    modules = project_modules()
    # A package's __init__ re-exporting its own modules is not a dependency of theirs on it.
    graph = {name: {m for m in imports_of(path, modules) if not (path.name == "__init__.py" and m.startswith(name))}
             for name, path in modules.items()}
    assert cycles(graph) == []


def test_the_graph_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_only_point_down():
    """``indexer`` and ``server`` build on ``stair_search``; only its command line (``stair_search.cli``), which
    composes all three, may import them."""
    modules = project_modules()
    upward = {name: sorted(m for m in imports_of(path, modules) if m.split(".")[0] in ("indexer", "server"))
              for name, path in modules.items()
              if name.startswith("stair_search") and not name.startswith("stair_search.cli")}
    assert {name: found for name, found in upward.items() if found} == {}
    assert any(m.startswith("indexer") for m in imports_of(modules["stair_search.cli.commands"], modules))  # can fail


def test_no_package_init_shadows_one_of_its_modules():
    """``from indexer.job import run`` in ``indexer/__init__.py`` would hide a module ``indexer/run.py``."""
    shadowed = []
    for init in (p for package in PACKAGES for p in (ROOT / package).rglob("__init__.py")):
        package = module_name(init)
        for node in ast.walk(ast.parse(init.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module != package:
                for alias in node.names:
                    bound = alias.asname or alias.name
                    if (init.parent / f"{bound}.py").exists() or (init.parent / bound / "__init__.py").exists():
                        shadowed.append(f"{package}.{bound}")
    assert shadowed == []


def test_the_storage_layer_opens_and_searches_an_index_without_torch(tmp_path, tiny_encoder):
    """A process that only serves shards (a cluster replica) must not carry a model: ``stair_search.index``
    imports no torch, and opening an index and searching every route loads none either: sparse through Lucene
    (the accelerated searcher removed) and through Seismic, dense, the text route's BM25, a filter, stored
    fields. (Pyserini's ``pyserini.search.lucene`` package imports torch; the shard calls Anserini's searchers
    from Pyserini's jar directly.)"""
    from stair_search.index import FeatureRecord, IndexWriter
    from tests.conftest import draw_shape

    images = [draw_shape(colour, "circle") for colour in ("red", "green", "blue")]
    records = [FeatureRecord(id=f"{c}-circle", source=f"drawn://{c}", width=64, height=64, caption=f"a {c} circle",
                             metadata={"colour": c}) for c in ("red", "green", "blue")]
    encoded = tiny_encoder.encode_images(images)
    with IndexWriter(tmp_path / "index", tiny_encoder.record, shard_size=2) as writer:
        writer.add(records, encoded)
        writer.commit()
    for accelerated in (tmp_path / "index").glob("shards/*/sparse/accelerated"):
        shutil.rmtree(accelerated)  # the shards ask Lucene: its impact search is the first Java this process runs
    code = ("import sys, numpy as np\n"
            "from stair_search.index import IndexReader, ShardQuery\n"
            "index = IndexReader(sys.argv[1])\n"
            "vector = np.load(sys.argv[2])\n"
            "sparse = index.sparse_vectors([index.find('red-circle')])[0]\n"
            "assert index.search(ShardQuery(2, sparse=sparse))['sparse']  # Lucene, unfiltered: the first Java\n"
            "found = index.search(ShardQuery(2, sparse=sparse, dense=vector, text='red circle',\n"
            "                                filter=index.check_filter({'colour': ['red', 'blue']})))\n"
            "print(sorted(index.documents(found['dense'], ['id'])[0].values()), sorted(found),\n"
            "      index.documents(found['text'], ['id'])[0]['id'], 'jnius' in sys.modules, 'torch' in sys.modules)")
    np.save(tmp_path / "query.npy", encoded.dense[0])
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "index"), str(tmp_path / "query.npy")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['red-circle']", "['dense',", "'sparse',", "'text']", "red-circle", "True",
                                     "False"], result.stdout


def test_dense_only_paths_do_not_import_pyserini():
    code = ("import sys; from stair_search.index import IndexReader; from stair_search.retrieve import "
            "QueryRouter; import indexer, server.app; print('pyserini.search.lucene' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_a_dense_search_with_explanations_never_starts_java(tmp_path, tiny_config_path, tiny_encoder):
    """Explanations read the stored CSR vectors; a sparse search is answered in process by the shard's
    accelerated searcher, and only a shard without one opens Lucene (and the JVM), which then prints no
    warnings. One process searches dense, then sparse, checking after each (a JVM, once started, stays); a
    second searches the shards without their accelerated searchers."""
    import indexer
    from tests.conftest import draw_shape

    folder = tmp_path / "images"
    folder.mkdir()
    for colour in ("red", "blue"):
        draw_shape(colour, "circle").save(folder / f"{colour}.png")
    indexer.run(IndexJob(folder, tmp_path / "index", workers=0), encoder=tiny_encoder, progress=False)
    code = ("import sys; from stair_search.cli import main\n"
            "for mode in sys.argv[3:]:\n"
            "    args = ['search', sys.argv[1], 'red circle', '--mode', mode, '--json', '--model', sys.argv[2]]\n"
            "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
            "    print(mode, 'JAVA' if 'pyserini.search.lucene' in sys.modules or 'jnius' in sys.modules else "
            "'NO-JAVA', flush=True)")
    accelerated = list((tmp_path / "index").glob("shards/*/sparse/accelerated"))
    assert accelerated, "the writer builds each shard's accelerated searcher"
    for modes, java in ((["dense", "sparse"], "NO-JAVA"), (["sparse"], "JAVA")):
        if java == "JAVA":
            for folder in accelerated:
                shutil.rmtree(folder)  # an index built before it: Lucene answers
        result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "index"), str(tiny_config_path), *modes],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.strip().splitlines()
        checks = [line for line in lines if line.split()[0] in modes]
        assert checks == [f"{mode} {java}" for mode in modes], (modes, lines)
        if modes[0] == "dense":  # its hits as JSON, then the check
            assert lines.index("dense NO-JAVA") == 2, lines
        assert "WARNING" not in result.stderr, result.stderr  # not Lucene's "running with Java 22 or later" either
