"""Per-GPU memory estimate (model states + activations) per ZeRO stage / offload, and the cheapest plan that fits.

Model states follow the ZeRO paper's accounting: 16-bit weights (all of them), 16-bit gradients and 12 bytes of
fp32 master weights + Adam moments per *trainable* parameter under bf16/fp16; fp32 and amp_* keep 4-byte weights
and gradients and 8 bytes of moments. Stage 1 shards optimizer states, 2 also gradients, 3 also every weight
(frozen included); offload moves optimizer states (and with offload_param, weights) to the host. Activations are
estimated for one micro-step of every dataset (`activation_bytes`: frozen decoder layers, trainable
cross-attention blocks, the loss's logits, the perceiver, and the largest transient; SDPA assumed, so no s² term),
calibrated on three H200 measurements, which it matches within 20%; `tools/bench_step` measures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

GiB = 2**30
OVERHEAD_BYTES = 1.5 * GiB  # CUDA context, allocator slack, NCCL buffers
HEADROOM = 0.9  # plan to use at most 90% of the card

# cheapest (fastest) first: (zero stage, offload_optimizer, offload_param)
PLANS = [(0, "none", "none"), (1, "none", "none"), (2, "none", "none"), (3, "none", "none"), (2, "cpu", "none"), (3, "cpu", "none"), (3, "cpu", "cpu")]


@dataclass
class ModelDims:
    total_params: int
    trainable_params: int
    lm_dim: int
    lm_layers: int
    xattn_blocks: int
    xattn_heads: int
    vocab: int
    vis_dim: int
    vis_tokens: int  # patch tokens per image (incl. class token)
    vis_layers: int
    latents: int
    perceiver_depth: int
    xattn_gated_in: tuple[int, int]  # in-features of a block's two output projections, whose results the gates scale


@dataclass
class MemoryEstimate:
    zero_stage: int
    offload_optimizer: str
    offload_param: str
    activation_checkpointing: bool
    params_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    overhead_gib: float
    total_gib: float
    host_gib: float  # what offload puts in CPU memory, per rank

    def as_dict(self) -> dict:
        return asdict(self)


def parse_size(text: str) -> float:
    """'24GiB', '80GB', '24g', '24' (GiB) -> bytes."""
    t = text.strip().lower().replace(" ", "")
    units = {"tib": 2**40, "tb": 1e12, "gib": 2**30, "gb": 1e9, "g": 2**30, "mib": 2**20, "mb": 1e6, "m": 2**20}
    for u, mult in units.items():
        if t.endswith(u):
            return float(t[: -len(u)]) * mult
    return float(t) * GiB


def model_dims(model, spec) -> ModelDims:
    """Read the sizes that matter from a (meta) Flamingo and its spec."""
    import open_clip

    from ..model import count_parameters
    from ..model.vision import tower_image_size

    counts = count_parameters(model)
    xa = spec.model.cross_attn
    vcfg = open_clip.get_model_config(spec.model.vision.name)["vision_cfg"]
    size = tower_image_size(model)
    return ModelDims(
        total_params=counts["total"], trainable_params=counts["trainable"], lm_dim=model.lang_dim,
        lm_layers=len(model.flamingo_layers()), xattn_blocks=len(model.cross_attention_blocks()),
        xattn_heads=xa.heads, vocab=model.new_tokens.vocab_size, vis_dim=model.vis_dim,
        vis_tokens=(size // vcfg["patch_size"]) ** 2 + 1, vis_layers=vcfg["layers"],
        latents=spec.model.perceiver.num_latents, perceiver_depth=spec.model.perceiver.depth,
        xattn_gated_in=(xa.heads * xa.dim_head, xa.ff_mult * model.lang_dim),
    )


def activation_bytes(dims: ModelDims, spec, precision: str, checkpointing: bool) -> float:
    """Activations of one micro-step of every dataset at their peak (the start of the last backward).

    Saved for backward, per dataset: frozen decoder layers 20 bytes per s·b·h in 16-bit (norm inputs, q/k/v, the
    MLP's activation input: no matmul inputs, their weights take no gradient), trainable cross-attention blocks
    Korthikanti's 34 less the two gated outputs, plus what each gate keeps instead (`ScaledLinear`: its scaled
    weight, or the output where that is the smaller), plus the keys/values; the fp32 log-softmax of the loss (4 bytes per logit); per perceiver layer
    and image the concat(media, latents) and its keys/values, 2·(v+n)·D, and a block's 17·n·D for the latents.
    Under activation checkpointing each FlamingoLayer keeps only its input. On top, the largest transient: a
    checkpointed layer recomputed, the loss's logit gradients, or the frozen vision tower's forward. With
    `engine.loss_chunk_tokens` the loss keeps nothing and its transient is one chunk's (10 bytes per logit); compiled
    (`engine.compile_targets` loss) it keeps the logits in the model's dtype (2 bytes in 16-bit). With
    `engine.fuse_datasets` the transients are those of one pass over every dataset's rows.
    Calibrated on an H200 (docs/performance.md): 3B ZeRO-2, 9B ZeRO-2, 9B ZeRO-3 + checkpointing at 6x batch.
    """
    a = 4 if precision == "fp32" else 2
    per = a / 2  # byte figures below are for 16-bit
    # with engine.fuse_datasets one pass carries every dataset's rows: its transients add up instead of taking turns
    fused = spec.engine.fuse_datasets and len(spec.data.datasets) > 1
    shapes = _pass_shapes(spec.data.datasets, fused)
    total = 0.0
    layer_t, logit_tokens, vision_t = [], [], []
    for d, (rows, L, slots) in zip(spec.data.datasets, shapes):
        b, t = d.batch_size, 1 if d.kind == "laion" else d.max_images
        sbh = rows * L * dims.lm_dim
        frozen_layer = 20 * per * sbh
        gated = a * dims.lm_dim * sum(min(rows * L, k) for k in dims.xattn_gated_in)  # scaled weight or output
        xattn = 30 * per * sbh + gated + 2 * a * rows * dims.xattn_heads * L * slots * dims.latents
        if checkpointing:
            lm = dims.lm_layers * a * sbh  # each FlamingoLayer's input
            layer_t.append(frozen_layer + xattn)
        else:
            lm = dims.lm_layers * frozen_layer + dims.xattn_blocks * xattn
        logit_tokens.append(rows * L)
        images = b * t
        perceiver = dims.perceiver_depth * a * images * dims.vis_dim * (2 * (dims.vis_tokens + dims.latents) + 17 * dims.latents)
        total += lm + perceiver
        vision_t.append(8 * a * images * dims.vis_tokens * dims.vis_dim)
    combine = sum if fused else max
    chunk = spec.engine.loss_chunk_tokens
    passes = [sum(logit_tokens)] if fused else logit_tokens
    # kept for backward: eager, the fp32 log-softmax; compiled (target loss), the logits in the model's dtype
    # (measured on a CPU with saved-tensor hooks)
    kept = a if spec.engine.compile and "loss" in spec.engine.compile_targets else 4
    for tokens in passes:
        chunked = 0 < chunk < tokens  # as Flamingo.forward decides
        total += 0 if chunked else kept * tokens * dims.vocab
    # the loss's transient: one chunk recomputed, or the logit gradients of a pass
    logit_t = max(10 * chunk * dims.vocab if 0 < chunk < tokens else 6 * tokens * dims.vocab for tokens in passes)
    return total + max(combine(layer_t) if layer_t else 0.0, logit_t, combine(vision_t))


def _pass_shapes(datasets, fused: bool) -> list[tuple[int, int, int]]:
    """(rows, tokens a row, image slots a row) each dataset's micro-batch takes in the model: its own, or its share
    of the packed batch (`of_ds.model.packing`)."""
    own = [(d.batch_size, d.effective_max_tokens(), 1 if d.kind == "laion" else d.max_images) for d in datasets]
    if not fused:
        return own
    from ..model.packing import pack_factor

    target = max(L for _, L, _ in own)
    ks = [pack_factor(b, L, target) for b, L, _ in own]
    slots = max(k * t for k, (_, _, t) in zip(ks, own))
    return [(b // k, target, slots) for k, (b, _, _) in zip(ks, own)]


def estimate(dims: ModelDims, spec, world_size: int, zero_stage: int, offload_optimizer: str = "none",
             offload_param: str = "none", checkpointing: Optional[bool] = None) -> MemoryEstimate:
    precision = spec.engine.precision
    ckpt = spec.engine.activation_checkpointing if checkpointing is None else checkpointing
    half = precision in ("bf16", "fp16")
    w, g, o = (2, 2, 12) if half else (4, 4, 8)
    n = max(1, world_size)
    pt, pall = dims.trainable_params, dims.total_params
    params = pall * w / (n if zero_stage >= 3 else 1)
    grads = pt * g / (n if zero_stage >= 2 else 1)
    optim = pt * o / (n if zero_stage >= 1 else 1)
    host = 0.0
    if offload_optimizer != "none":
        host += optim + pt * 4 / n
        optim = 0.0
    if offload_param != "none":
        host += params
        params = min(params, 3e7 * w)  # stage3_max_live_parameters gathered at a time
    buckets = 0.0 if zero_stage == 0 else 2 * min(5e8, pt) * g
    acts = activation_bytes(dims, spec, precision, ckpt)
    total = params + grads + optim + acts + OVERHEAD_BYTES + buckets
    return MemoryEstimate(
        zero_stage, offload_optimizer, offload_param, ckpt, params / GiB, grads / GiB, optim / GiB, acts / GiB,
        (OVERHEAD_BYTES + buckets) / GiB, total / GiB, host / GiB,
    )


@dataclass
class Recommendation:
    fits: Optional[MemoryEstimate]
    budget_gib: float
    considered: list[MemoryEstimate] = field(default_factory=list)

    def describe(self) -> str:
        if self.fits is None:
            return (f"nothing fits {self.budget_gib:.1f} GiB per GPU, even ZeRO-3 with parameter and optimizer offload "
                    f"and activation checkpointing: lower data.datasets[*].batch_size (use optim.grad_accum_steps)")
        e = self.fits
        parts = [f"ZeRO-{e.zero_stage}"]
        if e.offload_optimizer != "none":
            parts.append(f"optimizer offload ({e.offload_optimizer})")
        if e.offload_param != "none":
            parts.append(f"parameter offload ({e.offload_param})")
        ckpt = "with activation checkpointing" if e.activation_checkpointing else "without activation checkpointing"
        cfg = {(0, "none", "none"): "zero0", (1, "none", "none"): "zero1", (2, "none", "none"): "zero2", (3, "none", "none"): "zero3",
               (2, "cpu", "none"): "zero2_offload", (3, "cpu", "cpu"): "zero3_offload"}.get((e.zero_stage, e.offload_optimizer, e.offload_param))
        hint = f" (ds_configs/{cfg}.json" + (", --set engine.activation_checkpointing=true)" if e.activation_checkpointing else ")") if cfg else ""
        return f"recommended for {self.budget_gib:.1f} GiB per GPU: {' + '.join(parts)}, {ckpt}, about {e.total_gib:.1f} GiB{hint}"


def recommend(dims: ModelDims, spec, world_size: int, gpu_bytes: float) -> Recommendation:
    """The first plan (fastest first; activation checkpointing only when nothing fits without) under 90% of the card."""
    budget = gpu_bytes * HEADROOM / GiB
    rec = Recommendation(None, gpu_bytes / GiB)
    for ckpt in (False, True):
        for stage, off_opt, off_param in PLANS:
            e = estimate(dims, spec, world_size, stage, off_opt, off_param, ckpt)
            rec.considered.append(e)
            if rec.fits is None and e.total_gib <= budget:
                rec.fits = e
        if rec.fits is not None:
            break
    return rec


def format_table(estimates: list[MemoryEstimate]) -> str:
    head = f"{'plan':<34}{'params':>9}{'grads':>9}{'optim':>9}{'activ':>9}{'other':>8}{'total':>9}{'host':>9}  GiB/GPU"
    rows = [head]
    for e in estimates:
        name = f"ZeRO-{e.zero_stage}" + (f" off-opt:{e.offload_optimizer}" if e.offload_optimizer != "none" else "") + (f" off-param:{e.offload_param}" if e.offload_param != "none" else "") + (" +ckpt" if e.activation_checkpointing else "")
        rows.append(f"{name:<34}{e.params_gib:9.2f}{e.grads_gib:9.2f}{e.optimizer_gib:9.2f}{e.activations_gib:9.2f}{e.overhead_gib:8.2f}{e.total_gib:9.2f}{e.host_gib:9.2f}")
    return "\n".join(rows)
