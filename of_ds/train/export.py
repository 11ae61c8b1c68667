"""`tools/export_checkpoint RUN_DIR OUT [--format pt|safetensors]`: one file of trainable weights, in the original
OpenFlamingo key layout, and the run's spec beside it (`OUT` without its suffix + `.spec.yaml`), from which
`tools/generate OUT` builds the model without further flags.

Reads any engine's checkpoint: the torch engine's `model.pt`, DeepSpeed ZeRO-0 module states, and ZeRO-1/2/3
partitions (consolidated to fp32 with DeepSpeed's `zero_to_fp32`, frozen parameters excluded). The weights are
loaded into a freshly built model (the checkpoint's own `spec.yaml`, same seed), checked for completeness, and
written with `to_openflamingo_state_dict`: loadable by `load_openflamingo_state_dict`, by `checkpoint.resume_from`,
and by the original's `model.load_state_dict(sd, strict=False)`. `--format safetensors` writes the same tensors as
a safetensors file (no pickle; the spec and layout also in its metadata, under `of_ds.spec` / `of_ds.layout`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..spec import RunSpec
from .checkpoint import find_checkpoint
from .untrusted import UnsafeCheckpointError, check_checkpoint_dir, load_untrusted


def read_trainable_weights(step_dir: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Our-layout trainable weights (fp32 where the engine kept fp32 masters) from any engine's files, each read as
    `load_untrusted` allows (`allow_pickle`: fully)."""
    meta = json.loads((step_dir / "meta.json").read_text())
    if (step_dir / "model.pt").is_file():
        return load_untrusted(step_dir / "model.pt", allow_pickle=allow_pickle)
    if meta.get("engine") != "deepspeed":
        raise FileNotFoundError(f"{step_dir}: no model.pt for engine {meta.get('engine')}")
    if (meta.get("zero_stage") or 0) == 0:
        states = load_untrusted(step_dir / "mp_rank_00_model_states.pt", allow_pickle=allow_pickle)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    check_checkpoint_dir(step_dir, allow_pickle=allow_pickle)  # DeepSpeed unpickles them fully

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name, exclude_frozen_parameters=True))


def load_weights_into(model, step_dir: Path, allow_pickle: bool = False) -> None:
    """Checkpoint `step_dir`'s trainable weights (any engine's, saved by any number of ranks) into `model`, built
    whole; every trainable parameter must be there, and nothing the model lacks."""
    weights = read_trainable_weights(step_dir, allow_pickle)
    params = dict(model.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in weights)
    if missing:
        raise KeyError(f"{step_dir}: trainable weights missing from the checkpoint: {missing[:8]}")
    unexpected = sorted(k for k in weights if k not in model.state_dict())
    if unexpected:
        raise KeyError(f"{step_dir}: weights the model does not have: {unexpected[:8]}")
    with torch.no_grad():
        for name, value in weights.items():
            if name in params:
                params[name].copy_(value.to(params[name].dtype))


def load_checkpoint_into_model(step_dir: Path, spec: RunSpec | None = None, allow_pickle: bool = False):
    """-> (model, spec): the checkpoint's model rebuilt on the CPU with its trainable weights loaded."""
    from ..model import build_flamingo
    from ..runtime import seed_everything

    spec = spec or RunSpec.from_yaml(step_dir / "spec.yaml")
    seed_everything(spec.run.seed)  # same init as training: frozen new-token rows, if any, match
    model, _, _ = build_flamingo(spec.model)
    load_weights_into(model, step_dir, allow_pickle)
    return model, spec


FORMATS = ("pt", "safetensors")
SPEC_META, LAYOUT_META = "of_ds.spec", "of_ds.layout"


def spec_beside(weights: Path) -> Path:
    """Where an export's spec is written: `export.pt` -> `export.spec.yaml`."""
    return weights.with_name(weights.stem + ".spec.yaml")


def export_checkpoint(src: str | Path, out: str | Path, layout: str = "openflamingo", allow_pickle: bool = False,
                      fmt: str = "pt") -> Path:
    from ..model.checkpoint_keys import to_openflamingo_state_dict

    step_dir = find_checkpoint(src)
    model, spec = load_checkpoint_into_model(step_dir, allow_pickle=allow_pickle)
    sd = to_openflamingo_state_dict(model) if layout == "openflamingo" else {k: v.cpu() for k, v in model.trainable_state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if fmt == "safetensors":
        from safetensors.torch import save_file

        # own storage per tensor: safetensors refuses views and shared memory
        save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(tmp),
                  metadata={"format": "pt", SPEC_META: spec.to_yaml(), LAYOUT_META: layout})
    else:
        torch.save(sd, tmp)  # a bare state dict, as the released checkpoint.pt files
    spec_beside(out).write_text(spec.to_yaml())
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a run dir, its checkpoints/ dir, or one step-* folder")
    p.add_argument("out", help="output file (.pt or .safetensors); the spec goes beside it (OUT.spec.yaml)")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: safetensors for a .safetensors OUT, else pt")
    p.add_argument("--layout", choices=["openflamingo", "ours"], default="openflamingo")
    p.add_argument("--allow-pickle", action="store_true", help="unpickle the checkpoint's files fully (can run code they contain)")
    args = p.parse_args(argv)
    try:
        fmt = args.format or ("safetensors" if args.out.endswith(".safetensors") else "pt")
        path = export_checkpoint(args.run_dir, args.out, args.layout, args.allow_pickle, fmt)
    except (FileNotFoundError, KeyError, UnsafeCheckpointError) as e:
        print(f"export_checkpoint: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
