"""Heartbeats for agents written in Python: `heartbeat()` once, or `Heartbeater` every N seconds.

A heartbeat is one control line on stderr, `{"corral":"heartbeat","note":"...","progress":0.5}`;
Corral takes it out of the output, records a `heartbeat` event and resets the execution's idle
timer. Import cost matters (agents import this), so only the standard library and orjson.

    from actors.heartbeat import Heartbeater, heartbeat

    heartbeat("cloned the repository", progress=0.1)
    with Heartbeater(interval=10, note="running the test suite"):
        run_tests()

Each line is written with one `write()` on the stream, after flushing what is already buffered,
so it never interleaves mid-line with other writes of this process, threads included. It is written between whole lines
only if the rest of the program also writes whole lines to stderr: a heartbeat written after a
partial line such as a prompt without its newline is not seen as a control line.
"""

import math
import sys
import threading
from types import TracebackType
from typing import Any, TextIO

import orjson

__all__ = ["Heartbeater", "format_heartbeat", "heartbeat"]

SOURCES = ("agent", "wrapper")
_LOCK = threading.Lock()
_UNSET: Any = object()


def format_heartbeat(note: str | None = None, progress: float | None = None, *, source: str | None = None) -> bytes:
    """Return one heartbeat control line, newline included; keys are written only when given."""
    message: dict[str, Any] = {"corral": "heartbeat"}
    if source is not None:
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, not {source!r}")
        message["source"] = source
    if note is not None:
        message["note"] = str(note)
    if progress is not None:
        value = float(progress)
        if not math.isfinite(value):
            raise ValueError(f"progress must be a finite number, not {progress!r}")
        message["progress"] = value
    return orjson.dumps(message) + b"\n"  # orjson escapes newlines in the note: always one line


def heartbeat(
    note: str | None = None,
    progress: float | None = None,
    *,
    source: str | None = None,
    stream: TextIO | None = None,
) -> None:
    """Write one heartbeat line to stderr (or `stream`) and flush it. Thread-safe.

    Errors writing the stream (e.g. BrokenPipeError once Corral is gone) are raised.
    """
    line = format_heartbeat(note, progress, source=source).decode()
    target = sys.stderr if stream is None else stream
    with _LOCK:
        # Through the stream, not around it: its buffer keeps other threads' writes whole. After
        # the first flush the buffer is empty, so the line goes out alone in one write(2), which
        # a pipe keeps whole against other processes too (below PIPE_BUF, 4096 bytes).
        target.flush()
        target.write(line)
        target.flush()


class Heartbeater:
    """Heartbeat every `interval` seconds from a daemon thread while the work goes on.

    The first heartbeat is written at `start()`. Use it as a context manager, or call `start()`
    and `stop()`. `update()` changes the note or progress of the following heartbeats. A write
    error (stderr closed) ends the thread quietly; it is kept in `error`.
    """

    def __init__(
        self,
        interval: float = 5.0,
        note: str | None = None,
        progress: float | None = None,
        *,
        source: str | None = None,
        stream: TextIO | None = None,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        format_heartbeat(note, progress, source=source)  # validate now, not in the thread
        self.interval = float(interval)
        self.note = note
        self.progress = progress
        self.source = source
        self.stream = stream
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, note: str | None = _UNSET, progress: float | None = _UNSET) -> None:
        """Change what the next heartbeats say; arguments left out stay as they are."""
        if note is not _UNSET:
            self.note = note
        if progress is not _UNSET:
            format_heartbeat(None, progress)
            self.progress = progress

    def start(self) -> "Heartbeater":
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="corral-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and wait for it (no heartbeat is written after this returns)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def __enter__(self) -> "Heartbeater":
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        while True:
            try:
                heartbeat(self.note, self.progress, source=self.source, stream=self.stream)
            except (OSError, ValueError) as exc:  # stderr closed or broken: nobody is listening
                self.error = exc
                return
            if self._stop.wait(self.interval):
                return
