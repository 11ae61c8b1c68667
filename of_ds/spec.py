"""The run spec: the one source of truth for a training run.

A `RunSpec` is loaded from YAML (`RunSpec.from_yaml(path, overrides=["optim.lr=2e-4"])`), validated once, and
then treated as read-only. Runtime facts (rank, world size, device) live in `of_ds.runtime`, never here.

Every flag of the original OpenFlamingo trainer has a home here; `ORIGINAL_FLAGS` maps each one to its field.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class SpecError(ValueError):
    """A spec that cannot run. `problems` holds one message per problem, each naming its dotted field."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        head = f"invalid run spec{f' {source}' if source else ''} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"
        super().__init__("\n".join([head] + [f"  - {p}" for p in problems]))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # a spec is read-only: changes are copies (`updated`)

    def updated(self, changes: Mapping[str, Any]):
        """A copy with `changes` made, a dotted key reaching into nested sections, each copied on the way:
        `spec.updated({"checkpoint.resume_from": None, "run.seed": 1})`. Like `model_copy`, it does not validate."""
        direct, nested = {}, {}
        for key, value in changes.items():
            head, _, rest = key.partition(".")
            if rest:
                nested.setdefault(head, {})[rest] = value
            else:
                direct[head] = value
        direct |= {head: getattr(self, head).updated(sub) for head, sub in nested.items()}
        return self.model_copy(update=direct)


# ----------------------------------------------------------------------------------------------------------- model
class VisionSpec(_Section):
    name: str = Field("ViT-L-14", description="open_clip model name (e.g. ViT-L-14), or a name for `config`.")
    pretrained: Optional[str] = Field(
        "openai", description="open_clip pretrained tag, a local checkpoint path, or null for random init."
    )
    config: Optional[dict[str, Any]] = Field(
        None, description="An open_clip model config (embed_dim, vision_cfg, text_cfg) registered under `name`; for tiny test models."
    )
    quick_gelu: Optional[bool] = Field(
        None,
        description="The MLP activation x*sigmoid(1.702x) that OpenAI's CLIP weights were trained with. null: true "
        "where the pretrained tag was trained with it (the `openai` tags, and some others; open_clip >= 2.29 would "
        "build GELU and only warn) or the config sets it. Set true for an OpenAI checkpoint given as a file; false "
        "to continue a run begun before of_ds built QuickGELU (its perceiver learned GELU features).",
    )
    cache_dir: Optional[str] = Field(None, description="Where open_clip caches downloaded weights.")


class LMSpec(_Section):
    name_or_path: Optional[str] = Field(
        "anas-awadalla/mpt-1b-redpajama-200b", description="HF causal LM by hub name or local path."
    )
    config: Optional[dict[str, Any]] = Field(
        None, description="An HF config dict (must hold `model_type`) for a randomly initialised LM; overrides name_or_path."
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow custom modelling code from the hub, for families of_ds does not implement. Never needed "
        "for the OpenFlamingo releases: MosaicGPT (mosaic_gpt) and MPT are built natively and their remote code is "
        "not run even when this is true.",
    )
    decoder_layers_attr: Optional[str] = Field(
        None, description="Dotted path of the decoder layer list (e.g. model.layers) for families not known to of_ds."
    )
    attention: Literal["sdpa", "eager"] = Field(
        "sdpa",
        description="The LM's attention kernel: `sdpa` (torch's fused scaled_dot_product_attention; for MPT of_ds's "
        "ALiBi-aware replacement of transformers' eager-only attention) or `eager` (transformers' matmul + softmax).",
    )
    cache_dir: Optional[str] = None


class PerceiverSpec(_Section):
    depth: int = Field(6, ge=1)
    heads: int = Field(8, ge=1)
    dim_head: int = Field(64, ge=1)
    num_latents: int = Field(64, ge=1)
    ff_mult: int = Field(4, ge=1)


class CrossAttnSpec(_Section):
    every_n_layers: int = Field(1, ge=1, description="A gated cross-attention block before every N-th decoder layer.")
    heads: int = Field(8, ge=1)
    dim_head: int = Field(64, ge=1)
    ff_mult: int = Field(4, ge=1)
    only_attend_immediate_media: bool = Field(True, description="Text attends only to the most recent preceding image.")


class ModelSpec(_Section):
    vision: VisionSpec = Field(default_factory=VisionSpec)
    lm: LMSpec = Field(default_factory=LMSpec)
    tokenizer: Optional[str] = Field(None, description="HF tokenizer name or local dir; defaults to lm.name_or_path.")
    perceiver: PerceiverSpec = Field(default_factory=PerceiverSpec)
    cross_attn: CrossAttnSpec = Field(default_factory=CrossAttnSpec)
    freeze_lm_embeddings: bool = Field(
        False, description="Keep the new-token (<image>, <|endofchunk|>) embedding rows frozen (the original's flag)."
    )
    offline: bool = Field(False, description="Never touch the hub: local files only (the original's --offline).")


# ------------------------------------------------------------------------------------------------------------ data
class DatasetSpec(_Section):
    name: str = Field(..., description="Unique name; used in logs (loss_<name>) and loader state.")
    kind: Literal["laion", "mmc4", "chatgpt"] = Field(..., description="laion: image-text pairs; mmc4/chatgpt: interleaved.")
    shards: Union[str, list[str]] = Field(
        ..., description="Brace pattern, glob, list of paths, or pipe: command (s3:// is read through `aws s3 cp`)."
    )
    batch_size: int = Field(..., ge=1, description="Per-GPU micro-batch of this dataset.")
    loss_weight: float = Field(1.0, ge=0.0, description="Multiplier of this dataset's loss (the original's loss_multiplier_*).")
    samples_per_epoch: Optional[int] = Field(
        None, ge=1, description="Global samples per epoch; null: a real pass, from the shards' sizes.json."
    )
    resampled: bool = Field(False, description="Sample shards with replacement (the original's --dataset_resampled).")
    workers: int = Field(1, ge=0, description="DataLoader workers per rank for this dataset.")
    shuffle_buffer: int = Field(5000, ge=0)
    shuffle_initial: int = Field(1000, ge=0)
    shard_shuffle_buffer: int = Field(2000, ge=0)
    max_tokens: Optional[int] = Field(None, ge=2, description="Sequence length; null: 32 for laion, 256 for mmc4/chatgpt.")
    # interleaved-only fields (ignored for laion)
    max_images: int = Field(6, ge=1, description="Images per interleaved sequence (the original's --mmc4_max_num_images).")
    min_images: int = Field(1, ge=1, description="Minimum <image> tokens after truncation (--mmc4_min_num_images).")
    sim_threshold: float = Field(0.24, description="Drop image-sentence pairs below this CLIP similarity (--mmc4_textsim_threshold).")
    min_image_bytes: int = Field(10_000, ge=0, description="Images of at most this many bytes are skipped (the original's 10 KB floor).")
    single_image_drop_prob: float = Field(0.5, ge=0.0, le=1.0, description="Drop single-image documents with this probability.")
    flip_prob: float = Field(0.5, ge=0.0, le=1.0, description="Horizontal flip probability (the original flips per batch/doc).")
    val_shards: Optional[Union[str, list[str]]] = Field(
        None,
        description="Held-out shards of this dataset (the forms of `shards`), evaluated every "
        "logging.eval_every_n_steps and at the end: read in a fixed order (no shuffling, no resampling) with the "
        "training preprocessing, by every rank, in eval mode without gradients. null: no validation of this dataset.",
    )
    val_batches: Optional[int] = Field(
        None, ge=1,
        description="Validation micro-batches (of batch_size) per rank at each evaluation. null: the whole held-out "
        "set (its sizes.json), the last batches wrapping around to its first samples.",
    )
    decode_draft: bool = Field(
        False,
        description="false (default): the exact open_clip transform, bit-identical. true: JPEGs whose shortest side is "
        ">= 4x the image size are decoded at 1/2-1/8 DCT scale, leaving >= 2x to the same bicubic resize; within the "
        "measured per-image error stated in of_ds/data/README.md, faster on large JPEGs only.",
    )
    decode_resize: Literal["crop", "full"] = Field(
        "crop",
        description="crop (default): Pillow's bicubic/bilinear resize reproduced bit for bit (numba) and computed only "
        "for the center crop's pixels, about 3x faster than Pillow's; full: Pillow resizes the whole image, as "
        "open_clip does. Both give the same pixels (the fast path's reduced decodes and 'nearest' always use Pillow's).",
    )

    def effective_max_tokens(self) -> int:
        return self.max_tokens or (32 if self.kind == "laion" else 256)


class DataSpec(_Section):
    datasets: list[DatasetSpec] = Field(..., min_length=1)


# ----------------------------------------------------------------------------------------------------------- optim
class OptimSpec(_Section):
    lr: float = Field(1e-4, gt=0.0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(5000, ge=0, description="In optimizer steps.")
    weight_decay: float = Field(0.1, ge=0.0, description="Applied to gated cross-attention weights only, as the original.")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float = Field(1.0, ge=0.0, description="Global grad-norm clip; 0 disables.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    schedule_on_resume: Literal["continue", "recompute"] = Field(
        "continue",
        description="When a resume changes the schedule's horizon or shape (run.max_steps, run.epochs, schedule, "
        "warmup_steps): continue goes on from the lr multiplier of the last step taken to the new end (no jump); "
        "recompute uses this spec's schedule over the new horizon from the start, as a fresh run would be at this "
        "step (the lr may jump).",
    )
    fused: bool = Field(True, description="Fused AdamW kernel (CUDA, CPU): faster, and it skips a non-finite update on the device, without a host sync per step.")


# ---------------------------------------------------------------------------------------------------------- engine
class EngineSpec(_Section):
    kind: Literal["deepspeed", "ddp", "fsdp"] = "deepspeed"
    precision: Literal["fp32", "bf16", "fp16", "amp_bf16", "amp_fp16"] = Field(
        "fp32", description="bf16/fp16: DeepSpeed/FSDP mixed precision; amp_*: torch autocast around the forward."
    )
    zero_stage: int = Field(2, ge=0, le=3)
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: Optional[str] = Field(None, description="Directory for NVMe offload.")
    activation_checkpointing: bool = Field(False, description="Recompute decoder layers and cross-attention blocks.")
    loss_chunk_tokens: int = Field(
        0, ge=0,
        description="LM head + loss over chunks of this many positions, recomputed in backward, instead of the "
        "whole [tokens, vocab] fp32 logits at once (0: at once). Saves the 4-byte log-softmax kept per position and "
        "vocab entry and most of the logit gradients' transient (the 9B recipe at 6x batch: about 15 GB) for one "
        "more LM-head matmul; worth it at large batches.",
    )
    fuse_datasets: bool = Field(
        False,
        description="One model pass for every dataset's micro-batch: short rows (LAION) packed end to end into rows "
        "of the longest length (MMC4), attention kept within each original row; per-dataset losses and gradients as "
        "with separate passes. Fewer, larger kernels (of_ds/model/packing.py).",
    )
    deepspeed_config: Optional[str] = Field(None, description="A ds_configs/*.json file; `auto` values are filled from the spec.")
    fsdp_sharding: Literal["full", "hybrid"] = "full"
    compile: bool = Field(False, description="torch.compile the parts named in compile_targets.")
    compile_targets: list[Literal["cross_attn", "lm_layers", "perceiver", "vision", "loss"]] = Field(
        default_factory=lambda: ["cross_attn"],
        description="With compile: cross_attn (the gated blocks), lm_layers (each block with its decoder layer), "
        "perceiver, vision (the frozen tower), loss (the logits' fp32 cross-entropy, forward and backward fused).",
    )
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="torch.compile mode for compile_targets. max-autotune-no-cudagraphs times Triton matmul templates "
        "against cuBLAS for every shape (minutes of compiling) and, where a template wins, fuses the GELU, bias or "
        "residual that follows a matmul into it.",
    )
    dist_backend: Optional[str] = Field(None, description="nccl on GPUs, gloo on CPU when null.")
    dist_url: str = "env://"
    set_device_rank: bool = Field(True, description="Use cuda:<local_rank> (false: cuda:0, the original's --no-set-device-rank).")
    collective_timeout_s: float = Field(
        1800.0, gt=0, description="Timeout of one collective (init_distributed/init_process_group timeout)."
    )
    heartbeat_timeout_s: float = Field(
        30.0, ge=0, description="Exit, naming the rank, when a rank's heartbeat stops this long (0: no watchdog)."
    )


# ------------------------------------------------------------------------------------------------------ checkpoint
class CheckpointSpec(_Section):
    every_n_steps: int = Field(1000, ge=1, description="Save every N optimizer steps (and always at the end).")
    keep_last: int = Field(2, ge=1, description="Keep the newest K complete checkpoints.")
    resume: Literal["auto", "never"] = Field(
        "auto",
        description="auto: continue from the newest complete checkpoint in the run dir (its spec compared with this "
        "one). never: start at step 0 (in a run dir that holds a run only with checkpoint.on_existing).",
    )
    resume_from: Optional[str] = Field(None, description="An explicit checkpoint dir, or an original OpenFlamingo checkpoint.pt.")
    load_weights_only: bool = Field(False, description="With resume_from: load weights, start a fresh optimizer and step 0.")
    allow_pickle: bool = Field(
        False,
        description="Read checkpoint files this run did not write (resume_from, an original checkpoint.pt, another "
        "run's folder) with full unpickling, which can run code a file contains. false: tensors and plain containers "
        "only; a file needing more is refused, naming it.",
    )
    on_existing: Literal["refuse", "move_aside", "delete"] = Field(
        "refuse",
        description="A start at step 0 (resume: never, a weights-only start, or another run's checkpoint) in a run "
        "dir that holds a run (checkpoints or metrics.jsonl): refuse names the dir; move_aside renames it to "
        "RUN_DIR.old-<UTC time> and starts in an empty one; delete removes it first.",
    )
    keep_best: bool = Field(
        False,
        description="Also keep the checkpoint with the lowest validation loss (val/loss) besides the newest keep_last; "
        "`RUN_DIR/checkpoints/best` names it. Needs validation data and every_n_steps a multiple of "
        "logging.eval_every_n_steps (each checkpoint then has its validation loss, in its meta.json).",
    )
    original_optimizer: Literal["fresh", "carry"] = Field(
        "fresh",
        description="With resume_from an original OpenFlamingo checkpoint_N.pt (its train.py's optimizer state): fresh "
        "starts AdamW anew; carry takes over its Adam moments and step counts (the input matrix's new-token rows to the "
        "new-token table), to continue an interrupted original run. The lr schedule is this spec's either way.",
    )


# --------------------------------------------------------------------------------------------------------- logging
class WandbSpec(_Section):
    mode: Literal["online", "offline", "disabled"] = Field(
        "disabled", description="online/offline: log every metrics row to wandb, the resolved spec as its config; the "
        "run's id is kept in RUN_DIR/wandb_id, so a resumed run continues the same wandb run."
    )
    project: Optional[str] = None
    entity: Optional[str] = None
    save_checkpoints: bool = Field(False, description="Upload exported weights to wandb (needs mode online/offline).")


class LoggingSpec(_Section):
    every_n_steps: int = Field(100, ge=1, description="Console/metrics line every N optimizer steps.")
    progress_bar: bool = True
    eval_every_n_steps: int = Field(
        1000, ge=0,
        description="Evaluate on the datasets' val_shards every N optimizer steps and at the end of training "
        "(0: never): per-dataset loss and perplexity in the console, metrics.jsonl, wandb and TensorBoard, and sample captions.",
    )
    samples: int = Field(
        4, ge=0,
        description="At each evaluation, greedy captions of this many fixed validation images (from the first laion "
        "dataset with val_shards) and one interleaved prompt (from the first mmc4/chatgpt one), written to "
        "RUN_DIR/samples/step-N.jsonl (0: none).",
    )
    sample_max_new_tokens: int = Field(16, ge=1, description="Tokens generated per sample caption.")
    wandb: WandbSpec = Field(default_factory=WandbSpec)
    tensorboard: bool = Field(
        False, description="Also write every metrics row, and the resolved spec as text, as TensorBoard events under "
        "RUN_DIR/tensorboard (a resumed run adds to the same folder)."
    )


# ------------------------------------------------------------------------------------------------------------- run
class RunMeta(_Section):
    name: str = Field("openflamingo3B", description="Run name; the run dir is output_dir/name.")
    output_dir: str = Field("runs", description="Parent directory of run dirs.")
    seed: int = 42
    epochs: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps.")
    demo_data: Optional[str] = Field(
        None, description="If set and missing, generate the demo dataset here before training (demo spec only)."
    )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


class RunSpec(_Section):
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec
    optim: OptimSpec = Field(default_factory=OptimSpec)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    run: RunMeta = Field(default_factory=RunMeta)

    # ------------------------------------------------------------------------------------------- cross-field
    @model_validator(mode="after")
    def _cross_field(self) -> "RunSpec":
        problems = _cross_field_problems(self)
        if problems:
            raise ValueError(_CROSS_MARK + "\n".join(problems))
        return self

    # -------------------------------------------------------------------------------------------------- io
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> "RunSpec":
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise SpecError(_format_errors(e, data), source) from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: list[str] | None = None) -> "RunSpec":
        """Load a spec from YAML, apply `key.path=value` overrides (values parsed as YAML), validate."""
        path = Path(path)
        if not path.is_file():
            raise SpecError([f"spec file not found: {path}"])
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise SpecError([f"{path}: not valid YAML: {e}"]) from None
        if not isinstance(data, dict):
            raise SpecError([f"{path}: top level must be a mapping of sections"])
        data = apply_overrides(data, overrides or [])
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def dataset(self, name: str) -> DatasetSpec:
        for d in self.data.datasets:
            if d.name == name:
                return d
        raise KeyError(name)


_CROSS_MARK = "@@cross@@"


def _cross_field_problems(spec: RunSpec) -> list[str]:
    p: list[str] = []
    e = spec.engine
    if e.offload_optimizer != "none" and e.kind == "deepspeed" and e.zero_stage < 1:
        p.append(f"engine.offload_optimizer: '{e.offload_optimizer}' needs engine.zero_stage >= 1 (DeepSpeed ZeRO-Offload), got {e.zero_stage}")
    if e.offload_param != "none" and (e.kind != "deepspeed" or e.zero_stage != 3):
        p.append(f"engine.offload_param: '{e.offload_param}' needs engine.kind=deepspeed and engine.zero_stage=3, got {e.kind}/{e.zero_stage}")
    if (e.offload_optimizer != "none" or e.offload_param != "none") and e.kind != "deepspeed":
        if e.offload_optimizer != "none":
            p.append(f"engine.offload_optimizer: offload is a DeepSpeed feature; engine.kind is '{e.kind}'")
    if "nvme" in (e.offload_optimizer, e.offload_param) and not e.nvme_path:
        p.append("engine.nvme_path: NVMe offload needs a directory")
    if e.deepspeed_config and e.kind != "deepspeed":
        p.append(f"engine.deepspeed_config: given, but engine.kind is '{e.kind}'")
    if e.deepspeed_config and not Path(e.deepspeed_config).is_file():
        p.append(f"engine.deepspeed_config: file not found: {e.deepspeed_config}")
    if e.precision.startswith("amp_") and e.kind == "deepspeed":
        pass  # DeepSpeed's torch_autocast block handles amp_*; see engines/deepspeed_config.py
    if e.compile and "loss" in e.compile_targets and e.loss_chunk_tokens > 0:
        p.append("engine.compile_targets: 'loss' compiles the one-pass loss, which engine.loss_chunk_tokens "
                 f"({e.loss_chunk_tokens}) replaces; drop one of them")
    names = [d.name for d in spec.data.datasets]
    for n in sorted({n for n in names if names.count(n) > 1}):
        p.append(f"data.datasets.{n}.name: dataset names must be unique ('{n}' appears {names.count(n)} times)")
    for d in spec.data.datasets:
        where = f"data.datasets.{d.name}"
        if d.kind != "laion":
            if d.min_images > d.max_images:
                p.append(f"{where}.min_images: {d.min_images} exceeds max_images {d.max_images}")
            if not -1.0 <= d.sim_threshold <= 1.0:
                p.append(
                    f"{where}.sim_threshold: {d.sim_threshold} is outside [-1, 1]; MMC4 similarities are cosines "
                    f"(about 0.2-0.35; the recipe uses 0.24). The original's default of 30 drops every image."
                )
        if d.samples_per_epoch is not None and d.samples_per_epoch < d.batch_size:
            p.append(f"{where}.samples_per_epoch: {d.samples_per_epoch} is smaller than one batch ({d.batch_size})")
        if d.shuffle_initial > d.shuffle_buffer:
            p.append(f"{where}.shuffle_initial: {d.shuffle_initial} exceeds shuffle_buffer {d.shuffle_buffer}")
        if isinstance(d.shards, list) and not d.shards:
            p.append(f"{where}.shards: empty list")
        if isinstance(d.val_shards, list) and not d.val_shards:
            p.append(f"{where}.val_shards: empty list (null: no validation of this dataset)")
        if d.val_batches is not None and d.val_shards is None:
            p.append(f"{where}.val_batches: given, but {where}.val_shards is not")
    m = spec.model
    if m.lm.config is not None and "model_type" not in m.lm.config:
        p.append("model.lm.config: an HF config dict must name its model_type (e.g. llama, gpt2, opt, gpt_neox)")
    if m.lm.config is None and not m.lm.name_or_path:
        p.append("model.lm.name_or_path: give an HF name or local path, or model.lm.config")
    if m.tokenizer is None and m.lm.config is not None:
        p.append("model.tokenizer: an LM built from model.lm.config needs a tokenizer path")
    if spec.logging.wandb.save_checkpoints and spec.logging.wandb.mode == "disabled":
        p.append("logging.wandb.save_checkpoints: needs logging.wandb.mode online or offline")
    if spec.checkpoint.keep_best:
        every = spec.logging.eval_every_n_steps
        if every == 0 or not any(d.val_shards for d in spec.data.datasets):
            p.append("checkpoint.keep_best: needs validation (data.datasets[*].val_shards and logging.eval_every_n_steps > 0)")
        elif spec.checkpoint.every_n_steps % every:
            p.append(f"checkpoint.keep_best: checkpoint.every_n_steps ({spec.checkpoint.every_n_steps}) must be a multiple "
                     f"of logging.eval_every_n_steps ({every}), so that every checkpoint has its validation loss")
    if spec.checkpoint.resume_from and not Path(spec.checkpoint.resume_from).exists():
        p.append(f"checkpoint.resume_from: not found: {spec.checkpoint.resume_from}")
    return p


def _dotted(loc: tuple, data: dict[str, Any]) -> str:
    """Turn a pydantic loc into a dotted path, naming datasets by name where the input has one."""
    parts: list[str] = []
    node: Any = data
    for item in loc:
        if isinstance(item, int) and isinstance(node, list) and item < len(node):
            entry = node[item]
            name = entry.get("name") if isinstance(entry, dict) else None
            parts.append(str(name) if isinstance(name, str) and name else str(item))
            node = entry
            continue
        if isinstance(item, str) and item.startswith(("function-", "tagged-union")):
            continue
        parts.append(str(item))
        node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts)


def _format_errors(err: ValidationError, data: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    for e in err.errors():
        msg = str(e.get("msg", ""))
        if _CROSS_MARK in msg:
            problems.extend(msg.split(_CROSS_MARK, 1)[1].split("\n"))
            continue
        where = _dotted(tuple(e["loc"]), data) or "<spec>"
        if e["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown key")
        elif e["type"] == "missing":
            problems.append(f"{where}: required field is missing")
        else:
            got = e.get("input")
            shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
            problems.append(f"{where}: {msg}{shown}")
    return problems


# ------------------------------------------------------------------------------------------------------- overrides
def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a raw spec dict. Lists are indexed by position or by an entry's `name`."""
    data = copy.deepcopy(data)
    problems = []
    for ov in overrides:
        if "=" not in ov:
            problems.append(f"override '{ov}': expected key.path=value")
            continue
        key, raw = ov.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node: Any = data
        try:
            for i, part in enumerate(parts[:-1]):
                node = _child(node, part, create=True, next_is_index=parts[i + 1].isdigit())
            last = parts[-1]
            if isinstance(node, list):
                node[_index(node, last)] = value
            else:
                node[last] = value
        except (KeyError, IndexError, TypeError) as e:
            problems.append(f"override '{ov}': no such place in the spec ({e})")
    if problems:
        raise SpecError(problems)
    return data


def _index(lst: list, part: str) -> int:
    if part.isdigit():
        return int(part)
    for i, entry in enumerate(lst):
        if isinstance(entry, dict) and entry.get("name") == part:
            return i
    raise KeyError(f"no list entry named '{part}'")


def _child(node: Any, part: str, create: bool, next_is_index: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part)]
    if not isinstance(node, dict):
        raise TypeError(f"'{part}' is under a value, not a section")
    if part not in node or node[part] is None:
        if not create:
            raise KeyError(part)
        node[part] = [] if next_is_index else {}
    return node[part]


# ------------------------------------------------------------------------------------------ the original's flags
ORIGINAL_FLAGS: dict[str, str] = {
    "--vision_encoder_path": "model.vision.name",
    "--vision_encoder_pretrained": "model.vision.pretrained",
    "--lm_path": "model.lm.name_or_path",
    "--tokenizer_path": "model.tokenizer",
    "--cross_attn_every_n_layers": "model.cross_attn.every_n_layers",
    "--run_name": "run.name",
    "--resume_from_checkpoint": "checkpoint.resume_from",
    "--delete_previous_checkpoint": "checkpoint.keep_last (=1)",
    "--batch_size_mmc4": "data.datasets.<mmc4>.batch_size",
    "--batch_size_laion": "data.datasets.<laion>.batch_size",
    "--gradient_accumulation_steps": "optim.grad_accum_steps",
    "--seed": "run.seed",
    "--learning_rate": "optim.lr",
    "--lr_scheduler": "optim.schedule",
    "--loss_multiplier_mmc4": "data.datasets.<mmc4>.loss_weight",
    "--loss_multiplier_laion": "data.datasets.<laion>.loss_weight",
    "--warmup_steps": "optim.warmup_steps",
    "--weight_decay": "optim.weight_decay",
    "--precision": "engine.precision",
    "--gradient_checkpointing": "engine.activation_checkpointing",
    "--num_epochs": "run.epochs",
    "--offline": "model.offline (and logging.wandb.mode=offline)",
    "--freeze_lm_embeddings": "model.freeze_lm_embeddings",
    "--logging_steps": "logging.every_n_steps",
    "--laion_shards": "data.datasets.<laion>.shards",
    "--mmc4_shards": "data.datasets.<mmc4>.shards",
    "--workers": "data.datasets.<each>.workers",
    "--train_num_samples_mmc4": "data.datasets.<mmc4>.samples_per_epoch",
    "--train_num_samples_laion": "data.datasets.<laion>.samples_per_epoch",
    "--dataset_resampled": "data.datasets.<each>.resampled",
    "--mmc4_textsim_threshold": "data.datasets.<mmc4>.sim_threshold",
    "--mmc4_max_num_images": "data.datasets.<mmc4>.max_images",
    "--mmc4_min_num_images": "data.datasets.<mmc4>.min_images",
    "--dist-url": "engine.dist_url",
    "--dist-backend": "engine.dist_backend",
    "--horovod": "not supported (the original trained with DDP anyway); use engine.kind",
    "--no-set-device-rank": "engine.set_device_rank (=false)",
    "--fsdp": "engine.kind (=fsdp)",
    "--fsdp_use_orig_params": "always on (FSDP2 fully_shard keeps original parameters)",
    "--fsdp_sharding_strategy": "engine.fsdp_sharding",
    "--deepspeed": "engine.kind (=deepspeed)",
    "--deepspeed_stage": "engine.zero_stage",
    "--report_to_wandb": "logging.wandb.mode",
    "--wandb_project": "logging.wandb.project",
    "--wandb_entity": "logging.wandb.entity",
    "--save_checkpoints_to_wandb": "logging.wandb.save_checkpoints",
}
