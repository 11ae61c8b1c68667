"""Preemption: SIGTERM/SIGINT make every rank finish its step, save a checkpoint and leave the loop.

The handler only notes the signal. Ranks get it at different times, or only some of them do (DeepSpeed's launcher
forwards it to one rank after the other), so they agree through the step's own all-reduce of the non-finite-loss
flag (`StopFlag.exchange`: one more element, no extra collective). Where that all-reduce ran on the host (gloo)
every rank reads the agreed flag after the same step; on a GPU each reads the previous step's flag from a pinned
copy, which has landed by then, so no step waits on the device. A second SIGINT interrupts at once (Ctrl-C twice);
repeated SIGTERMs (a scheduler and a launcher both sending one) do not.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
from typing import Iterator, Optional

import torch

from ..runtime import Runtime

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    def __init__(self):
        self.signal: Optional[str] = None  # the first signal this rank received
        self.agreed = False  # every rank knows: stop after this step
        self._pid = os.getpid()  # forked loader workers inherit the handler: they ignore the signal
        self._slots: list = []  # two host buffers (numpy views: read without a tensor read)
        self._pending: collections.deque = collections.deque()  # (slot, CUDA event or None), oldest first
        self._n = 0

    def handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return
        name = signal.Signals(signum).name
        if name == self.signal == "SIGINT":
            raise KeyboardInterrupt  # Ctrl-C twice: do not wait for the step
        if self.signal is None:
            self.signal = name
            os.write(2, f"[of_ds] {name}: finishing this step, then a checkpoint and exit (Ctrl-C again to "
                        f"interrupt at once)\n".encode())

    def exchange(self, runtime: Runtime, nonfinite: torch.Tensor) -> torch.Tensor:
        """The step's all-reduce: -> `nonfinite` on any rank; also carries whether any rank received a signal."""
        wanted = torch.full((), self.signal is not None, dtype=torch.bool, device=nonfinite.device)
        flags = runtime.any_rank(torch.stack([nonfinite.reshape(()), wanted]))
        if not self._slots:
            pinned = flags.is_cuda
            for _ in range(2):
                host = torch.zeros(1, dtype=torch.bool, pin_memory=pinned)
                self._slots.append((host, host.numpy()))
        slot = self._n % 2
        self._n += 1
        self._slots[slot][0].copy_(flags[1:], non_blocking=True)
        event = None
        if flags.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending.append((slot, event))
        return flags[0]

    def should_stop(self) -> bool:
        """After each optimizer step, on every rank alike: whether the ranks agreed to stop now."""
        lag = 1 if self._pending and self._pending[-1][1] is not None else 0
        while len(self._pending) > lag:
            slot, event = self._pending.popleft()
            if event is not None:
                event.synchronize()  # the previous step's copy: long done
            self.agreed |= bool(self._slots[slot][1][0])
        return self.agreed


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """SIGTERM and SIGINT set the yielded flag while the block runs (main thread); the old handlers come back after."""
    flag = StopFlag()
    previous = {s: signal.signal(s, flag.handle) for s in SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
