"""Native engines: DDP and FSDP2 (`fully_shard`) behind the same verbs and checkpoint semantics as DeepSpeed.

Checkpoints hold full (unsharded) trainable weights and optimizer state keyed by parameter name, written by rank 0
(`model.pt`, `optim.pt`, `scheduler.pt`, `client_state.pt`), so DDP and FSDP checkpoints load into either engine and
any world size.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..runtime import Runtime
from ..spec import RunSpec
from .optim import build_optimizer, build_scheduler, reapply_fused, step_schedule
from .base import Batch, PackingReport, StepStats, weighted_losses
from .device_skip import found_inf, step_unless, supports_device_skip

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}


def apply_fsdp(model: nn.Module, precision: str, hybrid: bool) -> nn.Module:
    """FSDP2: shard every decoder layer (with its cross-attention) and the vision tower, then the root.

    The perceiver stays with the root: Flamingo reads `perceiver.latents` outside the perceiver's own forward, where
    a separately sharded perceiver would hand it a sharded DTensor.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device_type = "cuda" if next(model.parameters()).is_cuda else "cpu"
    world = dist.get_world_size()
    if hybrid and torch.cuda.is_available() and world > torch.cuda.device_count():
        per_node = torch.cuda.device_count()
        mesh = init_device_mesh(device_type, (world // per_node, per_node), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device_type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=_DTYPES[precision], reduce_dtype=torch.float32) if precision in ("bf16", "fp16") else MixedPrecisionPolicy()
    for layer in model.flamingo_layers():
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model.vision_encoder, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


# No buffer sync before each forward: our buffers are constants, and NCCL's in-place broadcast before the second
# dataset's forward bumped the version of `new_tokens.new_ids`, which the first forward's graph had saved (seen on
# an H200 at the 3B recipe). torch >= 2.14 spells it forward_sync_buffers.
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


def cast_frozen_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen weight matrices (vision tower, LM: Linear, Conv, Embedding) in `dtype`, which autocast casts
    them to on every forward anyway. Trainable weights stay fp32 (the optimizer's master copy), and so do 1-D
    parameters (norm weights, biases): autocast runs norms in fp32 on CUDA, and CPU norms need fp32 weights."""
    for p in model.parameters():
        if not p.requires_grad and p.ndim >= 2:
            p.data = p.data.to(dtype)


class TorchEngine:
    """DDP (`engine.kind=ddp`) or FSDP2 (`engine.kind=fsdp`). bf16/fp16 under DDP and amp_* everywhere run the
    forward in torch autocast; fp16 uses a GradScaler (DDP) and skipped steps are counted. DDP bf16/fp16 also
    store the frozen weight matrices in that dtype (amp_* keeps them fp32, as the original)."""

    def __init__(self, model: nn.Module, spec: RunSpec, runtime: Runtime, total_steps: int,
                 fuse_datasets: Optional[dict[str, int]] = None):
        eng = spec.engine
        self.kind, self.precision, self.device = eng.kind, eng.precision, runtime.device
        self.grad_accum_steps = spec.optim.grad_accum_steps
        self.grad_clip = spec.optim.grad_clip
        self._pack_report = PackingReport(runtime.rank)
        self.can_reshape = True
        self.fuse_datasets = fuse_datasets  # None: a pass per dataset (prepare.prepare_model decided)
        model.to(runtime.device)
        if self.kind == "ddp" and eng.precision in ("bf16", "fp16"):
            cast_frozen_parameters(model, _DTYPES[eng.precision])
        self.module = model
        if self.kind == "fsdp":
            self.wrapped = apply_fsdp(model, eng.precision, eng.fsdp_sharding == "hybrid")
            autocast_precision = eng.precision if eng.precision.startswith("amp_") else None
        else:
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            # gradients as views into DDP's all-reduce buckets: no copy of the reduced buckets back into .grad
            self.wrapped = (
                nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True, **_NO_FORWARD_BUFFER_SYNC)
                if runtime.distributed else model
            )
            autocast_precision = eng.precision if eng.precision != "fp32" else None
        self.autocast_dtype = _DTYPES.get(autocast_precision) if autocast_precision else None
        self.scaler = torch.amp.GradScaler(runtime.device.type) if self.autocast_dtype == torch.float16 else None
        self.optimizer = build_optimizer(model, spec.optim, device_type=runtime.device.type)
        self.scheduler = build_scheduler(self.optimizer, spec.optim, total_steps)
        self.device_skip = self.scaler is None and supports_device_skip(self.optimizer)  # reported; checked per step
        self._fused = [g.get("fused") for g in self.optimizer.param_groups]
        self._micro = 0
        self._trainable = [p for p in model.parameters() if p.requires_grad]

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _set_grad_sync(self, sync: bool) -> None:
        if isinstance(self.wrapped, nn.parallel.DistributedDataParallel):
            self.wrapped.require_backward_grad_sync = sync  # what no_sync() toggles; read by the forward
        elif self.kind == "fsdp":
            self.wrapped.set_requires_gradient_sync(sync)

    def forward(self, batches: Mapping[str, Batch], weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
        self._set_grad_sync(self._micro == self.grad_accum_steps - 1)  # reduce once, on the last micro-step
        ctx = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext()
        with ctx:
            return weighted_losses(self.wrapped, batches, weights, self.device, fuse=self.fuse_datasets, on_pack=self._pack_report)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.grad_accum_steps
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        self._micro += 1

    def step(self, nonfinite_loss: Optional[torch.Tensor] = None) -> StepStats:
        if self._micro != self.grad_accum_steps:
            raise RuntimeError(f"TorchEngine.step() after {self._micro} micro-steps; expected {self.grad_accum_steps}")
        self._micro, lr = 0, self.lr
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self._trainable, self.grad_clip if self.grad_clip > 0 else float("inf"))
        norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).detach()
        if self.scaler is None:
            skip = found_inf(norm, nonfinite_loss, self.device)
            step_unless(self.optimizer, skip)  # on the device with the fused kernel (no host sync)
            skipped = skip > 0
        else:  # fp16 loss scaling: decided on the host
            skipped = not bool(torch.isfinite(norm)) or (nonfinite_loss is not None and bool(nonfinite_loss))
            scale = self.scaler.get_scale()
            if not skipped:
                self.scaler.step(self.optimizer)  # skips itself on inf/NaN
            self.scaler.update()
            skipped = skipped or self.scaler.get_scale() < scale
        step_schedule(self.scheduler)  # the schedule counts optimizer steps, applied or skipped (as the original)
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(grad_norm=norm, skipped=skipped, lr=lr)

    # ------------------------------------------------------------------------------------------- checkpoints
    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True, **kw)

    def save(self, directory: Path, client_state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        directory = Path(directory)
        model_sd = get_model_state_dict(self.module, options=self._options())
        optim_sd = get_optimizer_state_dict(self.module, self.optimizer, options=self._options())
        if not dist.is_initialized() or dist.get_rank() == 0:
            directory.mkdir(parents=True, exist_ok=True)
            torch.save(model_sd, directory / "model.pt")
            torch.save(optim_sd, directory / "optim.pt")
            torch.save({"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None}, directory / "scheduler.pt")
            torch.save(client_state, directory / "client_state.pt")

    def load(self, directory: Path) -> dict:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        directory = Path(directory)
        model_sd = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
        expected = {n for n, p in self.module.named_parameters() if p.requires_grad}
        missing = sorted(expected - set(model_sd))
        if missing:
            raise KeyError(f"{directory}/model.pt lacks trainable weights {missing[:8]}")
        set_model_state_dict(self.module, model_sd, options=self._options(strict=False))
        optim_sd = torch.load(directory / "optim.pt", map_location="cpu", weights_only=False)
        set_optimizer_state_dict(self.module, self.optimizer, optim_sd, options=self._options())
        reapply_fused(self.optimizer, self._fused)  # the spec's kernel choice, not the checkpoint's
        sched = torch.load(directory / "scheduler.pt", map_location="cpu", weights_only=False)
        self.scheduler.load_state_dict(sched["scheduler"])
        if self.scaler and sched.get("scaler"):
            self.scaler.load_state_dict(sched["scaler"])
        return torch.load(directory / "client_state.pt", map_location="cpu", weights_only=False)
