"""Where stair-search keeps what it downloads or builds once (data sets, WordNet, caches): one place to change.

``$STAIR_DATA`` if set, else ``~/.cache/stair-search``: an environment variable rather than a fixed path because
the data often has to live on a bigger or shared disk than the home directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """Root of downloaded and prepared data."""
    env = os.environ.get("STAIR_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stair-search"


def wordnet_dir() -> Path:
    """The offline WordNet folder S^3 and query expansion read (prepared from the Debian package's files)."""
    return data_dir() / "wordnet"


def concepts_dir() -> Path:
    """Cached concept banks (training-free sparse vectors of models without trained heads), one file per model."""
    return data_dir() / "concepts"


def emoji_set_dir() -> Path:
    """The emoji data set the demo and the benchmarks build."""
    return data_dir() / "emoji-set"
