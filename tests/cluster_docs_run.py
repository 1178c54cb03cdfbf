"""docs/cluster.md's "Step by step", run as written, in namespaces of its own (see tests/test_cluster_docs.py).

``python tests/cluster_docs_run.py SPEC.json``, started by the test as PID 1 of a new PID and network namespace
with only loopback up: every process Ray starts is in them, so none outlives the run (the kernel ends them when
this process exits) and none can reach another address or another Ray cluster on the machine. It reads the
section's shell commands from the page, replaces the placeholders (HEAD_HOST and THIS_HOST: 127.0.0.1, TOKEN: what
``ray get-auth-token`` printed, the index path: the spec's index), applies its ``export`` lines to the commands'
environment, runs ``ray start --head`` and ``ray start --address`` (one worker node), then the
page's ``stair-search serve ... --cluster auto ...`` with ``--copy-shards`` (the page's option for node-local
copies) added; then it searches over HTTP, deletes a document with ``stair-search delete`` as the page says an
index is updated, searches again, and writes what it saw to the spec's ``out`` file.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.cluster_run import ready, wait_for  # noqa: E402  (this file runs as a script)

PLACEHOLDER_INDEX = "/shared/indexes/photos"
SERVE_MAX_S = 300.0
DELETE_MAX_S = 120.0


def documented_commands(page: Path) -> list[str]:
    """The shell commands of the page's "Step by step" section, in order."""
    section = page.read_text(encoding="utf-8").split("## Step by step", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def as_run_here(command: str, index: str, token: str) -> list[str]:
    words = shlex.split(command.replace("HEAD_HOST", "127.0.0.1").replace("THIS_HOST", "127.0.0.1")
                        .replace(PLACEHOLDER_INDEX, index).replace("=TOKEN", f"={token}"), comments=True)
    if words[0] == "stair-search":
        words = [sys.executable, "-m", "stair_search.cli", *words[1:]]
    elif words[0] == "ray":
        words = [str(Path(sys.executable).with_name("ray")), *words[1:]]
    return words


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    # HOME of its own: the token Ray generates goes to $HOME/.ray, not the user's
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_TMPDIR": spec["ray_tmp"],
                                                                                "HOME": spec["home"]}
    report: dict[str, Any] = {"commands": documented_commands(ROOT / "docs" / "cluster.md")}
    serve, token = None, ""
    try:
        for command in report["commands"]:
            words = as_run_here(command, spec["index"], token)
            if words[0] == "export":
                env |= dict(word.split("=", 1) for word in words[1:])
            elif words[1:2] == ["get-auth-token"]:
                done = subprocess.run(words, env=env, capture_output=True, text=True, timeout=120)
                token = done.stdout.strip()
                report.setdefault("ray", []).append([command, done.returncode, done.stderr[-1500:]])
            elif command.startswith("stair-search serve"):
                words += ["--copy-shards", spec["copies"], "--reload-interval", "0.5"]
                serve = subprocess.Popen(words, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)
            else:
                done = subprocess.run(words, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
                report.setdefault("ray", []).append([command, done.returncode, done.stderr[-1500:]])
        report |= searches(spec, serve)
    finally:
        if serve is not None:
            serve.terminate()
            try:
                report["serve_log"] = serve.communicate(timeout=60)[0][-4000:]
            except subprocess.TimeoutExpired:
                serve.kill()
        Path(spec["out"]).write_text(json.dumps(report, indent=1, default=str))


def searches(spec: dict[str, Any], serve: subprocess.Popen | None) -> dict[str, Any]:
    import httpx

    if serve is None:
        return {"error": "the page has no stair-search serve command"}
    with httpx.Client(base_url="http://127.0.0.1:8000", timeout=60) as client:
        if not wait_for(lambda: ready(client), SERVE_MAX_S):
            return {"error": "the cluster never became ready"}
        answers = [client.post("/search", json=body).json() for body in spec["bodies"]]
        deleted = subprocess.run([sys.executable, "-m", "stair_search.cli", "delete", spec["index"],
                                  spec["delete_id"]], cwd=ROOT, capture_output=True, text=True, timeout=300)
        body = spec["bodies"][0]
        gone = wait_for(lambda: spec["delete_id"] not in ids(client.post("/search", json=body).json()),
                        DELETE_MAX_S)
        after = client.post("/search", json=body).json()
    copies = sorted(str(p.relative_to(spec["copies"])) for p in Path(spec["copies"]).glob("*/shards/*"))
    return {"answers": answers, "delete": [deleted.returncode, deleted.stderr[-1500:]], "gone": gone,
            "after": after, "copies": copies}


def ids(answer: dict) -> list[str]:
    return [hit["id"] for hit in answer.get("hits", [])]


if __name__ == "__main__":
    main(sys.argv[1])
