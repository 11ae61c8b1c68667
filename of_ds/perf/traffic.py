"""The bytes each operator of a training step reads and writes, counted on the meta device at a recipe's real sizes.

With the FLOPs (`of_ds.model.flops`) these are the two axes of a roofline. A GPU step's kernel time is about
GEMM FLOPs / GEMM rate + attention FLOPs / attention rate + the other operators' bytes / memory bandwidth: every
eager operator that is not a matmul or an attention kernel is at least one kernel that reads its inputs and writes
its outputs, and at these sizes it is bound by memory. `tools/bench_step --traffic` prints the counts and that
projection, which needs no GPU and no weights (about 6 s for the 3B recipe on a CPU).

What is counted: the step as the engines run it (`weighted_losses`, packed when `engine.fuse_datasets`), forward
and backward (activation checkpointing's recomputation and the chunked loss included), with every weight in the
engine's dtype (DeepSpeed's bf16 layout); views are free; a broadcast input counts at its stored size, a tensor
given twice once; gathers (embedding, index_select, the loss's nll) count the rows they read. SDPA is counted as
the GPU runs it (one fused kernel each way), not as the meta device's math decomposition, and nn.MultiheadAttention
(open_clip's frozen ViT) as its fast path (`torch._native_multi_head_attention`), which a GPU takes under no_grad
in eval mode and the meta device never does. The optimizer
step, which needs DeepSpeed and real tensors, is its bytes per trainable parameter counted on a small CPU run
(`OPTIMIZER_BYTES_PER_TRAINABLE`) times the count. A `torch.compile`d part fuses some operators: this is the eager
step's count (`tools/compiled_traffic` measures what compiling removes).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.module_tracker import ModuleTracker

_aten = torch.ops.aten
GEMM_OPS = frozenset(p.overloadpacket for p in (
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.convolution.default,
    _aten.convolution_backward.default))
_GEMM_NAMES = frozenset(str(p).removeprefix("aten.") for p in GEMM_OPS)
FREE_OPS = frozenset((_aten.detach.default, _aten._unsafe_view.default, _aten.alias.default, _aten.lift_fresh.default))
TIMED_GEMMS = {"mm": torch.mm, "addmm": torch.addmm, "bmm": torch.bmm}  # what `time_gemm_shapes` can replay
BLAS_FALLBACK = "Will attempt to recover by calling"  # torch's warning where cuBLASLt refuses a shape (libtorch_cuda)
# which model part a forward operator belongs to, by the innermost module path it runs under
PART_KEYS = (("gated_cross_attn_layer", "cross_attn"), ("decoder_layer", "lm_layers"), ("perceiver", "perceiver"), ("vision_encoder", "vision"))
# DeepSpeed ZeRO-1/2 bf16 per trainable parameter, as counted (this module's counter) over the optimizer step of a
# 1-rank CPU run with the device-side skip: fused AdamW reading fp32 weight, gradient, m and v and writing weight, m
# and v (28), the clip's scaling (8), the bf16 gradient to fp32 (6), the fp32 weight back to bf16 (6), the flat
# gradient buffer (4), the norm (2)
OPTIMIZER_BYTES_PER_TRAINABLE = 54


@dataclass(frozen=True)
class Rates:
    """Achieved device rates for the projection (not peaks)."""

    gemm_tflops: float
    attention_tflops: float
    memory_tbps: float


# Fitted to the one profiled GPU step (H200, 3B recipe, ZeRO-2 bf16, eager MPT attention, gates on the outputs,
# 2026-11-27; docs/performance.md): matmuls 157.1 TFLOP in 280.2 ms; SDPA 1.9 TFLOP forward in 13.3 ms; the
# remaining 180 ms of its 481 ms of kernel time over the 340 GB this module counts for that configuration.
H200_MEASURED = Rates(gemm_tflops=561.0, attention_tflops=135.0, memory_tbps=1.89)


@dataclass
class OpTally:
    calls: int = 0
    bytes: int = 0
    flops: int = 0


@dataclass
class StepTraffic:
    """One step's counts: per aten operator, and the forward's memory-bound bytes per model part."""

    ops: dict[str, OpTally] = field(default_factory=dict)
    kinds: dict[str, OpTally] = field(default_factory=lambda: {k: OpTally() for k in ("gemm", "attention", "memory")})
    forward_memory_bytes: Counter = field(default_factory=Counter)  # part -> bytes
    gemm_shapes: dict[tuple, OpTally] = field(default_factory=dict)  # (op, input shapes, inputs transposed) -> tally
    optimizer_bytes: int = 0

    def projected_seconds(self, rates: Rates = H200_MEASURED) -> dict[str, float]:
        """Kernel seconds per kind at `rates` (the optimizer's estimated bytes under memory) and their total: the
        step time if the device never waits for the host."""
        out = {
            "gemm": self.kinds["gemm"].flops / (rates.gemm_tflops * 1e12),
            "attention": self.kinds["attention"].flops / (rates.attention_tflops * 1e12),
            "memory": (self.kinds["memory"].bytes + self.optimizer_bytes) / (rates.memory_tbps * 1e12),
        }
        out["total"] = sum(out.values())
        return out

    def summary(self, rates: Rates = H200_MEASURED, top: int = 12) -> dict:
        """A JSON-ready summary: GB and TFLOP per kind, the top memory-bound operators, the projection."""
        gb, tf = (lambda b: round(b / 1e9, 2)), (lambda f: round(f / 1e12, 3))
        memory_ops = sorted(((n, t) for n, t in self.ops.items() if kind_of(n) == "memory"), key=lambda kv: -kv[1].bytes)
        return {
            "kinds": {k: {"calls": t.calls, "gb": gb(t.bytes), "tflop": tf(t.flops)} for k, t in self.kinds.items()},
            "optimizer_gb_est": gb(self.optimizer_bytes),
            "memory_gb_by_forward_part": {k: gb(v) for k, v in self.forward_memory_bytes.most_common()},
            "top_memory_ops": {n: {"calls": t.calls, "gb": gb(t.bytes)} for n, t in memory_ops[:top]},
            "top_gemm_shapes": [{"op": k[0], "shapes": k[1], "transposed": k[2], "calls": t.calls, "tflop": tf(t.flops)}
                                for k, t in sorted(self.gemm_shapes.items(), key=lambda kv: -kv[1].flops)[:top]],
            "rates": vars(rates),
            "projected_ms": {k: round(v * 1e3, 3) for k, v in self.projected_seconds(rates).items()},
        }


def time_gemm_shapes(traffic: StepTraffic, device: torch.device, dtype: torch.dtype = torch.bfloat16, repeats: int = 10,
                     compare_blas: Optional[bool] = None) -> dict:
    """Replay each of the step's matmul shapes (same operator, shapes and transposed inputs) on `device` with random
    values and time it: the achieved TFLOP/s per shape, and the step's matmul time from those instead of one fitted
    rate. On a GPU each shape is timed under both of torch's BLAS libraries (cuBLAS, torch's default for matmuls
    without a bias, and cuBLASLt, which it uses for those with one; `TORCH_BLAS_PREFER_CUBLASLT=1` makes it the
    default for all): `ms_by_blas` per shape and `gemm_ms_by_blas` for the step (`compare_blas`, default on a GPU).
    Where cuBLASLt refuses a shape (with either preference: a matmul with a bias goes to it under both), torch warns
    and runs cuBLAS: the row's `cublaslt_refused_in` names the runs whose time is cuBLAS's. Seconds on a GPU; at a
    recipe's sizes, slow on a CPU."""
    cuda = device.type == "cuda"
    compare = cuda if compare_blas is None else compare_blas
    in_effect = torch.backends.cuda.preferred_blas_library().name.lower() if compare else device.type
    libraries = [in_effect] + [b for b in ("cublas", "cublaslt") if b != in_effect] if compare else [in_effect]
    shapes, totals = [], dict.fromkeys(libraries, 0.0)
    try:
        for (name, dims, transposed), tally in sorted(traffic.gemm_shapes.items(), key=lambda kv: -kv[1].flops):
            inputs = [_random_like(d, t, device, dtype) for d, t in zip(dims, transposed)]
            seconds, fell_back = {}, []
            for library in libraries:
                if compare:
                    torch.backends.cuda.preferred_blas_library(library)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    seconds[library] = _time_op(TIMED_GEMMS[name], inputs, repeats, cuda)
                if any(BLAS_FALLBACK in str(w.message) for w in caught):
                    fell_back.append(library)
                for w in caught:  # still to the log, once each
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                totals[library] += seconds[library] * tally.calls
            own = seconds[in_effect]
            row = {"op": name, "shapes": dims, "transposed": transposed, "calls": tally.calls, "tflop": round(tally.flops / 1e12, 3),
                   "ms_per_call": round(own * 1e3, 5), "tflops": round(tally.flops / tally.calls / own / 1e12, 1)}
            if compare:
                row["ms_by_blas"] = {k: round(v * 1e3, 5) for k, v in seconds.items()}
            if fell_back:
                row["cublaslt_refused_in"] = fell_back  # the runs (by preference) in which torch fell back to cuBLAS
            shapes.append(row)
            del inputs
    finally:
        if compare:
            torch.backends.cuda.preferred_blas_library(in_effect)
    out = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "blas": in_effect,
           "gemm_ms": round(totals[in_effect] * 1e3, 2), "shapes": shapes}
    if compare:
        out["gemm_ms_by_blas"] = {k: round(v * 1e3, 2) for k, v in totals.items()}
    out["shapes_cublaslt_refused"] = sum(1 for row in shapes if "cublaslt_refused_in" in row)
    return out


def _time_op(op, inputs: list[torch.Tensor], repeats: int, cuda: bool) -> float:
    """Seconds per call of `op(*inputs)`, after two untimed calls."""
    for _ in range(2):
        op(*inputs)
    if not cuda:
        t0 = time.perf_counter()
        for _ in range(repeats):
            op(*inputs)
        return (time.perf_counter() - t0) / repeats
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        op(*inputs)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def _random_like(dims: tuple, transposed: bool, device, dtype) -> torch.Tensor:
    """A random tensor of shape `dims`; `transposed`: a transposed view of a contiguous one, as a weight in F.linear."""
    if not transposed:
        return torch.randn(*dims, device=device, dtype=dtype)
    return torch.randn(*dims[:-2], dims[-1], dims[-2], device=device, dtype=dtype).mT


def kind_of(op_name: str) -> str:
    """gemm, attention (fused SDPA kernels) or memory (everything else)."""
    if op_name in _GEMM_NAMES:
        return "gemm"
    return "attention" if "attention" in op_name else "memory"


def _tensors(tree) -> list[torch.Tensor]:
    """The tensors of a pytree, each once (a tensor passed twice, as in sdpa(q, q, q), is read once)."""
    seen, out = set(), []
    for t in tree_flatten(tree)[0]:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _written(out) -> int:
    return sum(footprint(t) for t in _tensors(out))


def _gather(index: torch.Tensor, out: torch.Tensor) -> int:
    """A gather reads its indices and one output's worth of the source, and writes the output."""
    return footprint(index) + 2 * footprint(out)


# operators that read a part of an input, or write without reading: (args, out) -> bytes read and written
_SPECIAL_BYTES = {
    # reads the target and one logit a row; writes the loss (and the total weight)
    _aten.nll_loss_forward.default: lambda a, out: footprint(a[1]) + a[1].numel() * a[0].element_size() + _written(out),
    # reads the incoming gradient and the target, writes the logits' gradient whole; the logits are not read
    _aten.nll_loss_backward.default: lambda a, out: footprint(a[0]) + footprint(a[2]) + _written(out),
    _aten.embedding.default: lambda a, out: _gather(a[1], out),
    _aten.index_select.default: lambda a, out: _gather(a[2], out),
    _aten.copy_.default: lambda a, out: footprint(a[1]) + _written(out),  # the destination is written, not read
    _aten.fill_.Scalar: lambda a, out: _written(out),
    _aten.zero_.default: lambda a, out: _written(out),
}
_ALLOCATIONS = frozenset((_aten.empty.memory_format, _aten.empty_like.default, _aten.new_empty.default, _aten.empty_strided.default))


def op_bytes(func, args, kwargs, out) -> int:
    """Bytes an operator's kernel reads and writes: every input and output at its stored extent, except gathers
    (the rows read) and in-place fills and copies (the destination written once)."""
    special = _SPECIAL_BYTES.get(func)
    if special is not None:
        return special(args, out)
    written = _written(out)
    if not written:  # an in-place operator that returns nothing (foreach, fused optimizers) writes its mutable arguments
        written = _written(_mutated(func, args, kwargs))
    return sum(footprint(t) for t in _tensors((args, kwargs))) + written


def _mutated(func, args, kwargs) -> list:
    """The arguments `func`'s schema marks as written."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            out.append(args[i] if i < len(args) else kwargs.get(arg.name))
    return out


def footprint(t: torch.Tensor) -> int:
    """Bytes a kernel touches for `t`: its stored extent (a broadcast dimension, stride 0, counts once)."""
    if t.numel() == 0:
        return 0
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return min(extent, t.numel()) * t.element_size()


class TrafficCounter(TorchDispatchMode):
    """Tallies every dispatched aten operator into a `StepTraffic`."""

    def __init__(self) -> None:
        super().__init__()
        self.traffic = StepTraffic()
        self.tracker = ModuleTracker()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "prim" or func.is_view or func in FREE_OPS or func in _ALLOCATIONS:  # no kernel
            return out
        nbytes = op_bytes(func, args, kwargs, out)
        flops = flop_registry[func.overloadpacket](*args, **kwargs, out_val=out) if func.overloadpacket in flop_registry else 0
        name = str(func.overloadpacket).removeprefix("aten.")
        kind = kind_of(name)
        for tally in (self.traffic.ops.setdefault(name, OpTally()), self.traffic.kinds[kind]):
            tally.calls += 1
            tally.bytes += nbytes
            tally.flops += flops
        if kind == "memory" and not self.tracker.is_bw:
            self.traffic.forward_memory_bytes[self._part()] += nbytes
        if name in TIMED_GEMMS:
            inputs = [a for a in args if isinstance(a, torch.Tensor)]
            key = (name, tuple(tuple(t.shape) for t in inputs), tuple(t.ndim > 1 and t.stride(-1) != 1 for t in inputs))
            tally = self.traffic.gemm_shapes.setdefault(key, OpTally())
            tally.calls += 1
            tally.flops += flops
        return out

    def _part(self) -> str:
        for key, part in PART_KEYS:
            if any(key in p for p in self.tracker.parents):
                return part
        return "other"  # embeddings, LM head, loss, packing


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as one fused kernel each way (the memory-efficient one, which takes any bias), as on a GPU."""
    if enable_gqa and k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
    if attn_mask is not None:
        attn_mask = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    grad = q.requires_grad or k.requires_grad or v.requires_grad
    return _aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, grad, dropout_p, is_causal, scale=scale)[0]


def _mha_fast_path(mha: torch.nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """What `torch._native_multi_head_attention` (nn.MultiheadAttention's fast path) runs on a GPU without a mask:
    the input projection with its bias, fused SDPA straight on strided head views of it, the output projection."""
    b, length, dim = x.shape
    heads = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = (t.view(b, length, heads, dim // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    out = F.scaled_dot_product_attention(q, k, v)
    return F.linear(out.transpose(1, 2).reshape(b, length, dim), mha.out_proj.weight, mha.out_proj.bias)


def _takes_fast_path(mha: torch.nn.MultiheadAttention, query, key, value, key_padding_mask, need_weights, attn_mask) -> bool:
    """nn.MultiheadAttention's own fast-path conditions (torch 2.x), but for the device (it refuses meta tensors),
    narrowed to where the native kernel then calls SDPA: no mask (with one it runs its unfused math)."""
    tensors = (query, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias)
    return (torch.backends.mha.get_fastpath_enabled() and query.dim() == 3 and query is key is value and not need_weights
            and key_padding_mask is None and attn_mask is None
            and mha.batch_first and not mha.training and mha._qkv_same_embed_dim and mha.in_proj_bias is not None
            and mha.bias_k is None and mha.bias_v is None and not mha.add_zero_attn and mha.num_heads % 2 == 0
            and not torch.is_autocast_enabled() and query.dtype == mha.in_proj_weight.dtype
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)))


@contextlib.contextmanager
def fused_attention_kernels(mha_fast_path: bool = True) -> Iterator[None]:
    """Route `F.scaled_dot_product_attention` (ours, transformers', nn.MultiheadAttention's) through `_fused_sdpa`,
    and (`mha_fast_path`) nn.MultiheadAttention through the fast path it takes on a GPU where it can (open_clip's
    frozen ViT: no autograd, eval)."""
    original, mha_forward = F.scaled_dot_product_attention, torch.nn.MultiheadAttention.forward

    def forward(mha, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
        if mha_fast_path and _takes_fast_path(mha, query, key, value, key_padding_mask, need_weights, attn_mask):
            return _mha_fast_path(mha, query), None
        return mha_forward(mha, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)

    F.scaled_dot_product_attention = _fused_sdpa
    torch.nn.MultiheadAttention.forward = forward
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        torch.nn.MultiheadAttention.forward = mha_forward


def weight_dtype(precision: str) -> torch.dtype:
    """Every weight's dtype in DeepSpeed's layout for `engine.precision` (16-bit throughout, or fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def count_step_traffic(spec, mha_fast_path: bool = True) -> StepTraffic:
    """Build `spec`'s model on the meta device and count one training step (one micro-batch per dataset);
    `mha_fast_path=False` counts nn.MultiheadAttention's unfused path (what `torch.compile` traces)."""
    from ..model import build_flamingo, count_parameters
    from ..model.flops import batch_shapes
    from ..model.vision import tower_image_size
    from ..engines.base import fused_row_lengths, weighted_losses

    model, _, _ = build_flamingo(spec.model, meta=True)
    dtype = weight_dtype(spec.engine.precision)
    model.to(dtype).train()
    model.set_activation_checkpointing(spec.engine.activation_checkpointing)  # its recomputation is counted
    model.set_loss_chunking(spec.engine.loss_chunk_tokens)
    shapes = batch_shapes(spec, tower_image_size(model))
    batches = {d.name: _meta_batch(s, dtype) for d, s in zip(spec.data.datasets, shapes)}
    weights = {d.name: d.loss_weight for d in spec.data.datasets}
    counter = TrafficCounter()
    try:
        with fused_attention_kernels(mha_fast_path), counter, counter.tracker:
            losses = weighted_losses(model, batches, weights, torch.device("meta"), fuse=fused_row_lengths(model, spec))
            losses["loss"].backward()
    except RuntimeError as e:
        if "meta tensors" not in str(e):
            raise
        lm = type(model.lang_encoder).__name__
        raise ValueError(f"traffic count: {lm} reads tensor values while it builds its attention masks, which a meta-device "
                         f"count cannot do (the recipes' MPT does not; with engine.fuse_datasets most LMs do not)") from e
    counter.traffic.optimizer_bytes = OPTIMIZER_BYTES_PER_TRAINABLE * count_parameters(model)["trainable"]
    return counter.traffic


def _meta_batch(shapes: Mapping[str, tuple], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    b, length = shapes["input_ids"]
    ids = torch.zeros(b, length, dtype=torch.long, device="meta")
    return {
        "pixel_values": torch.zeros(*shapes["pixel_values"], dtype=dtype, device="meta"),
        # no attention mask (all ones): transformers' SDPA mask builders read a given one's values, which meta lacks
        "input_ids": ids, "labels": ids,
        "num_images": torch.full((b,), shapes["pixel_values"][1]),  # on the host, as the loaders give it
    }


def traffic_report(spec, rates: Optional[Rates] = None, time_gemms_on: Optional[torch.device] = None) -> dict:
    """`count_step_traffic(spec).summary(rates)` plus the samples/s the projection implies; with `time_gemms_on`,
    also each matmul shape timed there (`time_gemm_shapes`) and the projection with those times."""
    traffic, rates = count_step_traffic(spec), rates or H200_MEASURED
    summary = traffic.summary(rates)
    samples = sum(d.batch_size for d in spec.data.datasets)
    projected = traffic.projected_seconds(rates)
    summary["projected_samples_per_s"] = round(samples / projected["total"], 1)
    if time_gemms_on is not None:
        timed = time_gemm_shapes(traffic, time_gemms_on)
        replayed = sum(t.flops for t in traffic.gemm_shapes.values())  # convolutions stay at the fitted rate
        rest = projected["total"] - replayed / (rates.gemm_tflops * 1e12)
        total = rest + timed["gemm_ms"] / 1e3
        summary["timed_gemms"] = {**timed, "projected_ms_total": round(total * 1e3, 3), "projected_samples_per_s": round(samples / total, 1)}
        if "gemm_ms_by_blas" in timed:
            summary["timed_gemms"]["projected_ms_total_by_blas"] = {k: round(rest * 1e3 + ms, 3) for k, ms in timed["gemm_ms_by_blas"].items()}
    summary["fuse_datasets"] = spec.engine.fuse_datasets
    summary["lm_attention"] = spec.model.lm.attention
    return summary
