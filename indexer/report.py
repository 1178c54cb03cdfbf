"""What a job tells its user: a live progress bar, the ``skipped.parquet`` report and the final summary."""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from indexer import sources
from indexer.sync import SyncPlan
from stair_search.index import Manifest
from stair_search.index.skipped import Skip


@dataclass
class JobSummary:
    manifest: Manifest
    indexed: int  # documents this job added (including those a killed earlier run had encoded)
    seconds: float  # this run's wall time
    skipped: list[Skip] = field(default_factory=list)  # (id, source, reason)
    encoded_now: int = 0  # documents encoded by this run (indexed minus what a previous run had done)
    resumed_from: int = 0  # source position this run started at (0: a fresh job)
    report: Path | None = None  # where skipped.parquet was written
    already_complete: bool = False  # this same job (source, options, model) had already built the index
    sync: SyncPlan | None = None  # what a sync found changed (indexer/sync.py)
    finished_earlier_run: bool = False  # an earlier run of this job was stopped after publishing: cleaned up now

    def reasons(self) -> Counter:
        """Skips by reason; details after a colon (an exception text) are folded into their kind."""
        return Counter(reason.split(":")[0] for _, _, reason in self.skipped)

    def describe(self) -> str:
        if self.already_complete:
            return ("already complete: this job (same source, options and model) built the index; nothing to do "
                    "(--append adds new images, --overwrite rebuilds)")
        if self.sync is not None and self.sync.nothing_to_do:
            return f"{self.sync.describe()}: the index is in step with the source, nothing published"
        rate = self.encoded_now / max(self.seconds, 1e-9)
        text = f"indexed {self.indexed} in {self.seconds:.1f} s ({rate:.1f} images/s)"
        if self.sync is not None:
            text = f"{self.sync.describe()}; {text}"
        if self.resumed_from:
            text += f", resumed at item {self.resumed_from}"
        if self.finished_earlier_run:
            text += " (by an earlier run of this command, stopped before it had cleaned up: finished now)"
        if self.skipped:
            text += f", skipped {len(self.skipped)}: " + ", ".join(f"{n} {r}" for r, n in self.reasons().items())
            text += f" (listed in {self.report})" if self.report else ""
        return text


def count_items(spec: str) -> int | None:
    """How many items a source holds, when that is cheap to know (for the ETA); None otherwise (also when a
    source is damaged: the job itself reports what it cannot read)."""
    kind = sources.describe(spec)
    if kind == "folder":
        return sum(1 for _ in sources.folder_entries(Path(spec)))  # unreadable subfolders are items too
    if kind == "parquet":
        path = Path(spec)
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        try:
            return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        except Exception:  # a footer that cannot be read: reported by the job as skipped
            return None
    return None  # lists may carry comments and CSV headers; tar shards need a full read


class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} images/s" if task.speed else "- images/s")


class JobProgress:
    """A rich progress bar over source items (images/s, ETA); silent when stderr is not a terminal."""

    def __init__(self, spec: str, start: int, enabled: bool | None = None):
        console = Console(file=sys.stderr)
        self.enabled = console.is_terminal if enabled is None else enabled
        self._progress = Progress(TextColumn("indexing"), BarColumn(), MofNCompleteColumn(), _Rate(),
                                  TextColumn("ETA"), TimeRemainingColumn(), console=console,
                                  disable=not self.enabled)
        total = count_items(spec) if self.enabled else None
        self._task = self._progress.add_task("indexing", total=total, completed=start)
        self._done = start
        self.started = time.perf_counter()

    def __enter__(self) -> JobProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def advance_to(self, position: int) -> None:
        self._progress.update(self._task, advance=position - self._done)
        self._done = position
