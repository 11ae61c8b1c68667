"""Validation during training: each dataset's `val_shards`, every `logging.eval_every_n_steps` and at the end.

Every rank reads its own fixed part of the held-out set (the training stream's shard dealing, with no shuffle
buffer and no resampling, epoch 0 each time: the same batches at every evaluation and in every run) and runs the
engine's own forward on it, in eval mode without gradients: training's precision and ZeRO stage, every rank taking
part. A dataset's loss is the training loss's token mean over the whole evaluation: the sum over ranks and batches
of (batch loss x its targets) over the sum of targets, not a mean of means. `val/loss` weighs the datasets' losses
by their `loss_weight`, as the training `loss` does.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch

from ..data.held_out import held_out_batches
from ..model.labels import IGNORE_INDEX
from ..model.loss import next_token_targets
from ..runtime import Runtime
from ..spec import DatasetSpec, RunSpec


def target_count(batch: dict) -> int:
    """The positions the loss averages over (labels shifted, not -100)."""
    return int((next_token_targets(batch["labels"]) != IGNORE_INDEX).sum())


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


class Validation:
    """Called after every optimizer step; evaluates on due steps (collective: every rank calls it)."""

    def __init__(self, spec: RunSpec, runtime: Runtime, tokenizer, image_processor_cfg, metrics, total_steps: int):
        self.spec, self.rt, self.tokenizer, self.image_cfg = spec, runtime, tokenizer, image_processor_cfg
        self.metrics, self.total_steps = metrics, total_steps
        self.datasets = [d for d in spec.data.datasets if d.val_shards is not None]
        self.every = spec.logging.eval_every_n_steps
        self.samples = None
        if spec.logging.samples:
            from .samples import SampleSet

            self.samples = SampleSet.build(spec, tokenizer, image_processor_cfg, spec.run.run_dir, runtime)

    @classmethod
    def maybe(cls, spec: RunSpec, runtime: Runtime, tokenizer, image_processor_cfg, metrics, total_steps: int) -> Optional["Validation"]:
        """A Validation when the spec asks for one (val_shards somewhere, eval_every_n_steps > 0), else None."""
        if not spec.logging.eval_every_n_steps or not any(d.val_shards is not None for d in spec.data.datasets):
            return None
        return cls(spec, runtime, tokenizer, image_processor_cfg, metrics, total_steps)

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step >= self.total_steps

    def __call__(self, engine, step: int) -> Optional[float]:
        """On a due step: evaluate, log the row, write the samples; -> val/loss (None on other steps)."""
        if not self.due(step):
            return None
        start = time.perf_counter()
        model = engine.module
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                sums = []
                for ds in self.datasets:
                    sums += self._sums(engine, ds)
                totals = [v * self.rt.world_size for v in self.rt.all_reduce_mean(sums)]
                records = self.samples.generate(model, step) if self.samples is not None else None
        finally:
            model.train(was_training)
        row = self._row(step, totals, time.perf_counter() - start)
        self.metrics.log(row)  # rank 0 writes, the others do nothing
        if self.rt.is_main and records is not None:
            self.samples.write(records, step, self.metrics.loggers)
        return row["val/loss"]

    def _sums(self, engine, ds: DatasetSpec) -> list[float]:
        """[sum of token losses, targets] of this rank's batches of `ds`."""
        loss_sum, targets = None, 0
        for batch in held_out_batches(ds, self.spec.run.seed, self.tokenizer, self.image_cfg, self.rt.rank, self.rt.world_size):
            n = target_count(batch)
            term = engine.forward({ds.name: batch}, {ds.name: 1.0})[ds.name].detach().double() * n
            loss_sum = term if loss_sum is None else loss_sum + term
            targets += n
        return [float(loss_sum) if loss_sum is not None else 0.0, float(targets)]

    def _row(self, step: int, totals: list[float], seconds: float) -> dict:
        row: dict = {"step": step, "val/loss": 0.0}
        for i, ds in enumerate(self.datasets):
            loss_sum, targets = totals[2 * i], round(totals[2 * i + 1])
            loss = loss_sum / targets if targets else float("nan")
            row["val/loss"] += ds.loss_weight * loss
            row.update({f"val/loss/{ds.name}": loss, f"val/ppl/{ds.name}": perplexity(loss), f"val/tokens/{ds.name}": targets})
        row["eval_s"] = round(seconds, 3)
        return row
