"""Node-failure detection: a heartbeat thread that turns "a rank died" into a bounded, named exit.

When one node's process dies, the others sit in a collective until the backend times out (30 minutes by default),
or fail with a backend error that does not say who is gone. Each rank's watchdog thread beats into the c10d
TCPStore that rank 0 already serves (through its own client connection). Rank 0 watches every rank; the others
watch rank 0 and a shared `failed` key. A rank whose beat stops for `timeout_s` is reported as

    rank R (host H) stopped responding; exiting

and the watching process leaves with `os._exit(EXIT_CODE)`, so the launcher tears the job down. Clocks are only
compared within one process (monotonic time), never across nodes.

`start_watchdog` also writes `RUN_DIR/ranks/rank{r}.json` (rank, host, node address, pid), which tests and
operators use to see where each rank ran and which pid to signal.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

EXIT_CODE = 17
_PREFIX = "of_ds/watchdog"
_DONE = "done"
_FAILED = "failed"


def node_address() -> str:
    """The address this process's node was reached at: the ssh server address under pdsh, else the host name.

    Under pdsh every rank of a node inherits `SSH_CONNECTION` ("client_ip client_port server_ip server_port");
    its server address tells nodes apart even when they share a host name (loopback "nodes" in tests).
    """
    conn = os.environ.get("SSH_CONNECTION", "").split()
    if len(conn) == 4:
        return conn[2]
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def collective_timeout(seconds: float) -> timedelta:
    """The timeout to pass to `deepspeed.init_distributed(timeout=...)` / `init_process_group(timeout=...)`."""
    return timedelta(seconds=float(seconds))


def write_rank_file(run_dir: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Write `run_dir/ranks/rank{rank}.json`: where this rank runs, its pid and torch's intra-op threads."""
    import torch

    path = Path(run_dir) / "ranks" / f"rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "rank": rank,
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "world_size": world_size,
        "hostname": socket.gethostname(),
        "node_address": node_address(),
        "pid": os.getpid(),
        "torch_threads": torch.get_num_threads(),
        "started_at": time.time(),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(path)
    return path


def _die(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)


@dataclass
class Watchdog:
    """Heartbeats through `store`; see the module docstring. Start with `start()`, end cleanly with `stop()`."""

    store: object  # a torch.distributed.Store (a PrefixStore over a TCPStore client)
    rank: int
    world_size: int
    timeout_s: float
    interval_s: float = 1.0
    on_failure: Callable[[str], None] = _die
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: Optional[threading.Thread] = field(default=None, init=False)
    _hosts: dict = field(default_factory=dict, init=False)
    blamed: Optional[str] = field(default=None, init=False)

    def start(self) -> "Watchdog":
        self.store.set(f"host/{self.rank}", node_address())
        self._beat(0)
        self._thread = threading.Thread(target=self._run, name="of_ds-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self, failed: bool = False) -> None:
        """Say this rank ended (cleanly, or with an error of its own) and end the thread. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s * 3)
        try:
            self.store.set(f"beat/{self.rank}", _FAILED if failed else _DONE)
        except RuntimeError:  # c10d errors: the store may already be gone at teardown; nothing left to tell
            pass

    # --------------------------------------------------------------------------------------------- internals
    def _beat(self, n: int) -> None:
        self.store.set(f"beat/{self.rank}", str(n))

    def _host(self, rank: int) -> str:
        return self._hosts.get(rank, "?")

    def _report(self, rank: int, why: str = "stopped responding") -> None:
        self.blamed = f"rank {rank} (host {self._host(rank)}) {why}; exiting"
        if self.rank == 0:
            try:  # tell the others before the store (served by this process) goes away with it
                self.store.set(_FAILED, self.blamed)
                time.sleep(min(3 * self.interval_s, 5.0))
            except RuntimeError:  # c10d errors: the others will find out from the lost store
                pass
        self.on_failure(self.blamed)

    def _run(self) -> None:
        watched = range(self.world_size) if self.rank == 0 else [0]
        watched = [r for r in watched if r != self.rank]
        last_value: dict[int, bytes] = {}
        last_change = {r: time.monotonic() for r in watched}
        last_contact = time.monotonic()
        n = 0
        while not self._stop.wait(self.interval_s):
            n += 1
            now = time.monotonic()
            try:
                self._beat(n)
                if self.rank != 0 and self.store.check([_FAILED]):
                    self.blamed = self.store.get(_FAILED).decode()
                    self.on_failure(self.blamed)
                    return
                for r in watched:
                    if r not in self._hosts and self.store.check([f"host/{r}"]):
                        self._hosts[r] = self.store.get(f"host/{r}").decode()
                present = [r for r in watched if self.store.check([f"beat/{r}"])]
                values = self.store.multi_get([f"beat/{r}" for r in present]) if present else []
                last_contact = now
            except RuntimeError:  # c10d errors (DistError): the store lives in rank 0, so rank 0 (or its network) is gone
                if self._stop.is_set() or last_change.get(0) == float("inf"):
                    return  # we are ending, or rank 0 said it was done before its store went away
                if now - last_contact > self.timeout_s:
                    self._report(0)
                    return
                continue
            for r, v in zip(present, values):
                if v == _DONE.encode():
                    last_change[r] = float("inf")
                elif v == _FAILED.encode():
                    self._report(r, "failed")
                    return
                elif v != last_value.get(r):
                    last_value[r], last_change[r] = v, now
            stale = [r for r in watched if now - last_change[r] > self.timeout_s]
            if stale and not self._stop.is_set():
                self._report(stale[0])
                return


def start_watchdog(
    run_dir: str | os.PathLike | None,
    timeout_s: float,
    interval_s: float | None = None,
) -> Optional[Watchdog]:
    """Write this rank's rank file and, in a multi-process job with `timeout_s > 0`, start its watchdog.

    Call after the process group is up (`deepspeed.init_distributed`), on every rank. Returns None when there is
    nothing to watch. Also installs an excepthook: a backend error (RuntimeError) in the main thread first gives
    the watchdog up to `timeout_s` to name a dead peer, so the message says who failed, not just "connection
    closed".
    """
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if run_dir is not None:
        write_rank_file(run_dir, rank, world)
    if world < 2 or timeout_s <= 0:
        return None
    interval = interval_s if interval_s is not None else max(0.5, min(5.0, timeout_s / 10))
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=max(5.0, 2 * interval)),
        wait_for_workers=False,
    )
    dog = Watchdog(dist.PrefixStore(_PREFIX, client), rank, world, timeout_s, interval).start()
    _install_excepthook(dog)
    atexit.register(dog.stop)  # a clean exit says "done", so peers do not mistake it for a failure
    return dog


def maybe_start_watchdog(spec, runtime) -> Optional[Watchdog]:
    """`start_watchdog` for a training run: rank files under the run dir, the spec's heartbeat timeout."""
    return start_watchdog(spec.run.run_dir, spec.engine.heartbeat_timeout_s if runtime.world_size > 1 else 0)


def _install_excepthook(dog: Watchdog) -> None:
    previous = sys.excepthook

    def hook(kind, value, tb):
        if isinstance(value, RuntimeError) and dog._thread is not None:
            # maybe a peer died under us: let the watchdog find out who (it exits the process if so)
            deadline = time.monotonic() + dog.timeout_s + 3 * dog.interval_s
            while dog._thread.is_alive() and time.monotonic() < deadline:
                dog._thread.join(timeout=dog.interval_s)
        dog.stop(failed=True)
        previous(kind, value, tb)

    sys.excepthook = hook
