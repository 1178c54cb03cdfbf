"""The README and the pages under docs/ say what runs: their code blocks are run or checked as written.

The rules, for README.md and every docs/*.md:

- Every fenced block carries a language tag. Shell transcripts, program output and file listings are tagged
  ```text and never run.
- Every ```python block runs as written: saved as ``snippet.py`` and run with the project's Python in a fresh
  temporary folder that holds ``photos/`` (a few images drawn here, each with a ``.txt`` caption beside it) and
  ``query.jpg``. A snippet that needs an index builds it itself.
- Every line of a ```bash block in README.md is run or checked, by kind; a line of another kind fails here
  until a rule for it is added:
    * ``stair-search index|search|serve ...`` runs as written through bash, in a temporary folder, with HOME
      a temporary folder holding ``Pictures/`` (a few drawn images with ``.txt`` captions) and the project's
      ``.venv/bin`` first on PATH. ``serve`` runs in the background until ``/healthz`` answers, then is
      stopped; it is skipped when its port (8000) is taken.
    * ``make TARGET``: ``make -n TARGET`` succeeds (the target exists); it is not run.
    * ``source .venv/bin/activate``: the Makefile's environment is ``.venv``; not run.
    * ``docker build``: the Dockerfile exists. ``docker run ... stair-search ARGS``: ARGS are a valid
      stair-search command line (the local CLI gives no usage error for them); no container is run.
- ```bash blocks in docs/*.md need not run: they are synopses with placeholders and [options].
- Relative links point at files that exist, and their #anchors at headings of the page they name.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from stair_search.paths import data_dir

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
VENV_BIN = REPO / ".venv" / "bin" if (REPO / ".venv" / "bin" / "python").exists() else Path(sys.executable).parent
PYTHON = VENV_BIN / "python"
# Written in parallel with this README; a link to them is accepted while they do not exist yet.
PENDING = {REPO / "docs" / "docker.md", REPO / "docs" / "search-page-phone.png"}
SERVE_PORT = 8000  # the README's `serve` line uses the default port
COMMAND_TIMEOUT_S = 600  # a first run builds the default model's concept bank (1-2 min alone, more beside the snippets)

FENCE = re.compile(r"^```(\S*)\s*$")


def code_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(tag, line number of the opening fence, text) of each fenced block in a markdown file."""
    blocks, tag, start, body = [], None, 0, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(line)
        if tag is None and match:
            tag, start, body = match.group(1), number, []
        elif tag is not None and line.strip() == "```":
            blocks.append((tag, start, "\n".join(body) + "\n"))
            tag = None
        elif tag is not None:
            body.append(line)
    assert tag is None, f"{path.name}: the block opened on line {start} is never closed"
    return blocks


def shell_lines(text: str) -> list[str]:
    """The commands of a shell block: comments and blank lines dropped, backslash continuations joined."""
    lines, pending = [], ""
    for raw in text.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


PYTHON_SNIPPETS = [pytest.param(text, id=f"{rel(page)}:{line}")
                   for page in PAGES for tag, line, text in code_blocks(page) if tag == "python"]
README_SHELL = [pytest.param(command, id=command[:70])
                for tag, _, text in code_blocks(README) if tag == "bash" for command in shell_lines(text)]


def draw(path: Path, colour: str, shape: str, caption: str) -> None:
    """A real image of a coloured shape, with its caption in a .txt file beside it."""
    image = Image.new("RGB", (96, 96), "white")
    pen = ImageDraw.Draw(image)
    box = (18, 18, 78, 78)
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    elif shape == "triangle":
        pen.polygon([(48, 12), (12, 84), (84, 84)], fill=colour)
    else:  # a dog on the beach, as a child draws it: sand, sea, a body with legs and a head
        pen.rectangle((0, 60, 96, 96), fill=(230, 200, 140))
        pen.rectangle((0, 0, 96, 30), fill=(70, 130, 200))
        pen.rectangle((30, 44, 66, 60), fill=colour)
        pen.rectangle((62, 34, 76, 48), fill=colour)
        for x in (32, 42, 52, 62):
            pen.rectangle((x, 60, x + 3, 72), fill=colour)
    image.save(path)
    path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")


def draw_folder(folder: Path) -> list[str]:
    """Five small images with captions (few enough that indexing them takes seconds); their file names."""
    folder.mkdir(parents=True)
    drawings = [("red-circle.png", "red", "circle", "a red circle"),
                ("blue-square.png", "blue", "square", "a blue square"),
                ("green-triangle.jpg", "green", "triangle", "a green triangle"),
                ("yellow-circle.jpg", "yellow", "circle", "a yellow sun"),
                ("dog.png", "saddlebrown", "dog", "a brown dog on the beach")]
    for name, colour, shape, caption in drawings:
        draw(folder / name, colour, shape, caption)
    return [name for name, *_ in drawings]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# ----------------------------------------------------------------------------------------- the blocks' rules

@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_block_is_tagged(page):
    untagged = [line for tag, line, _ in code_blocks(page) if not tag]
    assert not untagged, f"{rel(page)}: untagged code blocks on lines {untagged} (```text for output)"


def headings(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings (outside code blocks)."""
    anchors, in_block = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_block = not in_block
        elif not in_block and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_links_lead_somewhere(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if path in PENDING and not path.exists():
            continue
        assert path.exists(), f"{rel(page)} links to {target}, which does not exist"
        if anchor:
            assert anchor in headings(path), f"{rel(page)} links to {target}: no such heading in {path.name}"


def test_readme_first_screen_gets_a_newcomer_to_a_served_index():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 120
    first_screen = "\n".join(lines[:40])
    for command in ("make demo", "source .venv/bin/activate", "stair-search index ~/Pictures",
                    "stair-search search indexes/photos", "stair-search serve indexes/photos", "docker build",
                    "docs/docker.md"):
        assert command in first_screen, command
    setup = [shlex.join(shlex.split(command, comments=True))
             for tag, _, text in code_blocks(README) if tag == "bash" for command in shell_lines(text)]
    assert "make demo" in setup and "make test" in setup  # the two set-up commands, verbatim
    for page in PAGES[1:]:
        if page.name != "docker.md":
            assert f"(docs/{page.name})" in README.read_text(encoding="utf-8"), f"README does not link {page.name}"


# -------------------------------------------------------------------------------- the README's shell lines

@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, snippet_runs):
    """A newcomer's machine after the README's first command: HOME with a Pictures folder, a working folder,
    .venv/bin first on PATH, and the data cache that `make demo` filled (``STAIR_DATA``: the emoji set and the
    default model's concept bank, built once per machine and shared with the other tests); the README's
    `stair-search index` lines already run there (the search and serve lines need their index)."""
    home = tmp_path_factory.mktemp("home")
    pictures = draw_folder(home / "Pictures")
    work = tmp_path_factory.mktemp("work")
    env = {**os.environ, "HOME": str(home), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "STAIR_DATA": str(data_dir())}
    env.pop("VIRTUAL_ENV", None)
    indexed = {command: subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True,
                                       timeout=COMMAND_TIMEOUT_S)
               for command in (param.values[0] for param in README_SHELL)
               if shlex.split(command)[:2] == ["stair-search", "index"]}
    return {"env": env, "cwd": work, "pictures": pictures, "indexed": indexed}


def run_index_line(command, quickstart):
    done = quickstart["indexed"][command]
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"indexed {len(quickstart['pictures'])}" in done.stdout + done.stderr


def run_search_line(command, quickstart):
    done = subprocess.run(["bash", "-c", command], cwd=quickstart["cwd"], env=quickstart["env"],
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dog.png" in done.stdout and "a brown dog" in done.stdout, done.stdout


def run_serve_line(command, quickstart):
    if not port_is_free(SERVE_PORT):
        pytest.skip(f"port {SERVE_PORT} is taken on this machine, and the README's serve line uses it")
    server = subprocess.Popen(["bash", "-c", command], cwd=quickstart["cwd"], env=quickstart["env"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{SERVE_PORT}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"serve exited with {server.returncode}: {server.stdout.read()}"
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "serve did not answer /healthz within 120 s"
            time.sleep(0.5)
        for path in ("/", "/docs"):  # the search page, the API's documentation
            with urllib.request.urlopen(base + path, timeout=10) as answer:
                assert answer.status == 200, path
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the shell and the server it started: their own group
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        server.stdout.close()


def check_docker_line(words):
    if words[1] == "build":
        assert (REPO / "Dockerfile").is_file()
        return
    assert words[1] == "run" and "stair-search" in words, words
    args = words[words.index("stair-search") + 1:]
    container_paths = [Path(arg) for arg in args if arg.startswith("/")]
    if any(path.exists() for path in container_paths):
        pytest.skip(f"{container_paths} exist on this machine: the command would really run")
    done = subprocess.run([str(VENV_BIN / "stair-search"), *args], capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    # exit status 2 is a usage error (a missing or unknown option); 1 is the missing path, as expected here
    assert done.returncode != 2, done.stderr


@pytest.mark.parametrize("command", README_SHELL)
def test_readme_shell_line(command, request):
    words = shlex.split(command, comments=True)
    if words[0] == "stair-search" and words[1] in ("index", "search", "serve"):
        quickstart = request.getfixturevalue("quickstart")
        {"index": run_index_line, "search": run_search_line, "serve": run_serve_line}[words[1]](command, quickstart)
    elif words[0] == "make":
        done = subprocess.run(["make", "-n", *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    elif words == ["source", ".venv/bin/activate"]:
        assert re.search(r"^VENV \?= \.venv$", (REPO / "Makefile").read_text(encoding="utf-8"), re.M)
    elif words[0] == "docker":
        check_docker_line(words)
    else:
        pytest.fail(f"no rule in tests/test_readme.py for the README line: {command}")


# ------------------------------------------------------------------------------------------ python snippets

@pytest.fixture(scope="module")
def snippet_runs(tmp_path_factory):
    """Every python snippet, started at once in its own folder; the quickstart's commands run meanwhile (each
    process spends much of its time starting torch and Java, so the two overlap well)."""
    runs = {}
    for param in PYTHON_SNIPPETS:
        folder = tmp_path_factory.mktemp("snippet")
        draw_folder(folder / "photos")
        draw(folder / "query.jpg", "red", "circle", "a red circle")
        (folder / "query.txt").unlink()
        (folder / "snippet.py").write_text(param.values[0], encoding="utf-8")
        with open(folder / "output.txt", "wb") as output:  # a file, not a pipe: nothing blocks on a full pipe
            runs[param.values[0]] = (subprocess.Popen([str(PYTHON), "snippet.py"], cwd=folder, stdout=output,
                                                      stderr=subprocess.STDOUT), folder / "output.txt")
    yield runs
    for process, _ in runs.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("snippet", PYTHON_SNIPPETS)
def test_python_snippet_runs_as_written(snippet, snippet_runs):
    process, output = snippet_runs[snippet]
    process.wait(timeout=COMMAND_TIMEOUT_S)
    assert process.returncode == 0, output.read_text(encoding="utf-8", errors="replace")
