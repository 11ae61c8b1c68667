"""Counting what the loaders skip: `DropSample` marks bad data, `DropCounter` tallies it by reason.

Only `DropSample` is caught by the stages; any other exception (a bug in our code) propagates.
Reasons starting with `image_` count single images skipped inside a kept document; every other reason counts a
whole sample (or shard event) and feeds the stall guard.
"""

from __future__ import annotations

from collections import Counter


class DropSample(Exception):
    """Raised by a stage for data that cannot be used; `reason` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class ImagePairingError(RuntimeError):
    """A kept sample's k-th `<image>` token is not the image its text placed k-th: a bug in our stages, never
    bad data (data that could cause it is dropped before), so it is raised, not counted."""


class DataStalledError(RuntimeError):
    """A dataset dropped every sample for too long: its data (or its settings) cannot produce batches."""


class DropCounter:
    """Per-worker tally of drops by reason; `enabled=False` while a resume replays already-counted samples."""

    def __init__(self, dataset: str, max_consecutive: int):
        self.dataset = dataset
        self.max_consecutive = max_consecutive
        self.counts: Counter[str] = Counter()
        self.consecutive = 0
        self.enabled = True

    def image(self, reason: str) -> None:
        """One image of a document skipped (the document itself may still be used)."""
        if self.enabled:
            self.counts[reason] += 1

    def drop(self, reason: str) -> None:
        """One sample (or shard) lost; raises `DataStalledError` after `max_consecutive` in a row."""
        if not self.enabled:
            return
        self.counts[reason] += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            top = ", ".join(f"{r}={n}" for r, n in self.counts.most_common(4))
            raise DataStalledError(
                f"dataset '{self.dataset}': the last {self.consecutive} samples were all dropped (top reasons: {top}); "
                "check the shards and the dataset's filters (sim_threshold, min_images, min_image_bytes)"
            )

    def ok(self) -> None:
        self.consecutive = 0

    def take(self) -> dict[str, int]:
        """The counts since the previous `take()` (they travel with the next batch)."""
        out, self.counts = dict(self.counts), Counter()
        return out


def add_counts(total: dict[str, int], delta: dict[str, int]) -> None:
    for reason, n in delta.items():
        total[reason] = total.get(reason, 0) + n
