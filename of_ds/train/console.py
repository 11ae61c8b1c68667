"""`RUN_DIR/train.log`: rank 0's console output, and the other ranks' warnings and errors prefixed by their rank.

Rank 0's `sys.stdout`/`sys.stderr` and the other ranks' `sys.stderr` are copied there line by line while a run
lasts (all ranks append to the one file; a resumed run adds to it), as are DeepSpeed's log records (rank 0: all;
other ranks: warnings and errors) and the traceback of an error that ends the run. Output that bypasses Python's
streams (C++ warnings of torch or NCCL) reaches the console only.

The copy is held in memory until the run dir is settled (`open_file`, called once the run knows whether it
continues the run dir's history or moves an earlier run aside), then written there first: a start refused before
that leaves the run dir as it found it, and a fresh start's log never lands in the run it moved away.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator, TextIO

from ..runtime import Runtime

TRAIN_LOG = "train.log"


class _Sink:
    """The copy's destination: memory until `open` names the file (which gets what came before), then the file."""

    def __init__(self):
        self.memory: io.StringIO | None = io.StringIO()
        self.file: TextIO | None = None
        self.closed = False

    def open(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", buffering=1)
        self.file.write(self.memory.getvalue())
        self.memory = None

    def write(self, text: str) -> None:
        (self.file or self.memory).write(text)

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        self.closed = True
        if self.file is not None:
            self.file.close()


class _Tee:
    """A text stream that also writes each complete line, prefixed, to `log`."""

    def __init__(self, stream: TextIO, log: TextIO, prefix: str):
        self.stream, self.log, self.prefix, self._partial = stream, log, prefix, ""

    @property
    def terminal(self) -> TextIO:
        """The console stream under any copies (for a progress bar, which belongs on the console only)."""
        return getattr(self.stream, "terminal", self.stream)

    def write(self, text: str) -> int:
        n = self.stream.write(text)
        if self.log.closed:  # a stream kept past the run (a logging handler made during it): the console only
            return n
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        if lines:
            self.log.write("".join(f"{self.prefix}{line}\n" for line in lines))
        return n

    def flush(self) -> None:
        self.stream.flush()
        if not self.log.closed:
            self.log.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


class _LogHandler(logging.Handler):
    def __init__(self, log: TextIO, prefix: str, level: int):
        super().__init__(level)
        self.log, self.prefix = log, prefix
        self.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)s] [%(filename)s:%(lineno)d] %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.log.write("".join(f"{self.prefix}{line}\n" for line in self.format(record).split("\n")))
        self.log.flush()


@contextlib.contextmanager
def console_log(run_dir: Path, runtime: Runtime) -> Iterator[Callable[[], Path]]:
    """Copy this rank's console output (see the module docstring) while the block runs; -> `open_file()`, which
    starts writing the copy, from its first line, to RUN_DIR/train.log (-> that path). Never called: nothing is
    written."""
    path = Path(run_dir) / TRAIN_LOG
    prefix = "" if runtime.is_main else f"[rank {runtime.rank}] "
    saved = sys.stdout, sys.stderr
    ds_logger = logging.getLogger("DeepSpeed")
    log = _Sink()

    def open_file() -> Path:
        log.open(path)
        return path

    if runtime.is_main:
        log.write(f"[of_ds] {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: a start on {runtime.world_size} rank(s)\n")
        sys.stdout = _Tee(sys.stdout, log, prefix)
    sys.stderr = _Tee(sys.stderr, log, prefix)
    handler = _LogHandler(log, prefix, logging.NOTSET if runtime.is_main else logging.WARNING)
    ds_logger.addHandler(handler)
    try:
        yield open_file
    except BaseException:
        log.write("".join(prefix + line for line in "".join(traceback.format_exc()).splitlines(keepends=True)))
        raise
    finally:
        ds_logger.removeHandler(handler)
        sys.stdout.flush(), sys.stderr.flush()
        sys.stdout, sys.stderr = saved
        log.close()
