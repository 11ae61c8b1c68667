"""The heartbeat watchdog on a real c10d TCPStore: who gets blamed, how fast, and what the excepthook lets through."""

import json
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from of_ds.watchdog import Watchdog, collective_timeout, node_address, write_rank_file

from .conftest import free_port


def _store_pair():
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=5), wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=5), wait_for_workers=False)
    return server, client


def _dogs(timeout_s=1.5, interval_s=0.1):
    server, client = _store_pair()
    blamed: dict[int, list[str]] = {0: [], 1: []}
    dogs = [
        Watchdog(dist.PrefixStore("wd", store), rank, 2, timeout_s, interval_s, on_failure=blamed[rank].append)
        for rank, store in ((0, server), (1, client))
    ]
    return server, dogs, blamed


def _wait(pred, limit_s):
    deadline = time.monotonic() + limit_s
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.05)
    return pred()


def _silence(dog):
    """What a killed process looks like to its peers: beats stop, no 'done'."""
    dog._stop.set()
    dog._thread.join(timeout=2)


def test_rank0_names_a_silent_rank_and_tells_the_others(monkeypatch):
    monkeypatch.setenv("SSH_CONNECTION", "127.0.0.1 5000 127.0.0.2 22")
    server, (d0, d1), blamed = _dogs()
    d1.start()
    monkeypatch.setenv("SSH_CONNECTION", "127.0.0.1 5001 127.0.0.1 22")
    d0.start()
    time.sleep(0.5)
    assert blamed == {0: [], 1: []}  # both alive: nobody blamed
    t0 = time.monotonic()
    _silence(d1)
    assert _wait(lambda: blamed[0], 5.0)
    assert 1.0 < time.monotonic() - t0 < 3.0  # after timeout_s, not before, not long after
    assert blamed[0] == ["rank 1 (host 127.0.0.2) stopped responding; exiting"]
    assert server.get("wd/failed").decode() == blamed[0][0]  # the message every other rank prints


def test_a_rank_reads_the_failure_rank0_posted():
    server, (d0, d1), blamed = _dogs(timeout_s=30)
    d0.start(), d1.start()
    server.set("wd/failed", "rank 5 (host h5) stopped responding; exiting")
    assert _wait(lambda: blamed[1], 3.0)
    assert blamed[1] == ["rank 5 (host h5) stopped responding; exiting"]
    d0.stop()


def test_a_finished_rank_is_not_blamed():
    _, (d0, d1), blamed = _dogs()
    d0.start(), d1.start()
    time.sleep(0.3)
    d1.stop()
    time.sleep(2.5)
    assert blamed == {0: [], 1: []}
    d0.stop()


def test_a_rank_that_failed_itself_is_named_at_once():
    _, (d0, d1), blamed = _dogs(timeout_s=30)
    d0.start(), d1.start()
    d1.stop(failed=True)
    assert _wait(lambda: blamed[0], 3.0)
    assert blamed[0][0].startswith("rank 1 (host ") and blamed[0][0].endswith(") failed; exiting")


def test_losing_rank0s_store_blames_rank0_after_the_timeout(monkeypatch):
    monkeypatch.setenv("SSH_CONNECTION", "127.0.0.9 5000 127.0.0.1 22")
    server, (d0, d1), blamed = _dogs()
    d0.start()
    d1.start()
    time.sleep(0.3)
    _silence(d0)
    t0 = time.monotonic()
    del d0, server  # rank 0's process (and the store it serves) is gone
    import gc

    gc.collect()
    assert _wait(lambda: blamed[1], 8.0)
    assert time.monotonic() - t0 > 1.0
    assert blamed[1] == ["rank 0 (host 127.0.0.1) stopped responding; exiting"]


def test_rank_file_and_helpers(tmp_path, monkeypatch):
    monkeypatch.setenv("SSH_CONNECTION", "10.0.0.1 40000 10.0.0.2 22")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert node_address() == "10.0.0.2"
    info = json.loads(write_rank_file(tmp_path, 7, 8).read_text())
    assert (info["rank"], info["local_rank"], info["world_size"], info["node_address"]) == (7, 3, 8, "10.0.0.2")
    assert collective_timeout(90).total_seconds() == 90
    monkeypatch.delenv("SSH_CONNECTION")
    assert node_address() == socket.gethostname() or node_address() == __import__("os").environ.get("SLURMD_NODENAME")


_RANK1 = """
import sys
from datetime import timedelta
import torch.distributed as dist
from of_ds.watchdog import Watchdog, _install_excepthook
store = dist.TCPStore("127.0.0.1", {port}, is_master=False, timeout=timedelta(seconds=5), wait_for_workers=False)
dog = Watchdog(dist.PrefixStore("wd", store), 1, 2, timeout_s=1.5, interval_s=0.1).start()
_install_excepthook(dog)
raise {error}
"""


@pytest.mark.slow
@pytest.mark.parametrize("error", ["RuntimeError('Connection closed by peer')", "TypeError('a bug of ours')"])
def test_excepthook_names_the_dead_peer_but_never_hides_our_bugs(error):
    """A backend error waits for the watchdog to name the dead peer; any other error leaves at once, as itself."""
    server, _ = _store_pair()
    server.set("wd/host/0", "10.0.0.1")
    server.set("wd/beat/0", "0")  # rank 0 beats once, then is "dead"
    code = _RANK1.format(port=server.port, error=error)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    secs = time.monotonic() - t0
    if error.startswith("RuntimeError"):
        assert proc.returncode == 17, proc.stderr
        assert "rank 0 (host 10.0.0.1) stopped responding; exiting" in proc.stderr
    else:
        assert proc.returncode == 1 and "TypeError: a bug of ours" in proc.stderr
        assert "stopped responding" not in proc.stderr and secs < 15
        assert server.get("wd/beat/1") == b"failed"  # rank 0 would report "rank 1 (host ...) failed" at once
