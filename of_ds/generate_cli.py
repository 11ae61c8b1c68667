"""`tools/generate CHECKPOINT --image PATH [--prompt TEXT]` (`of-generate`): caption images with a trained Flamingo.

CHECKPOINT is a run dir or step folder (its `spec.yaml` builds the model), or a `.pt` or `.safetensors` file of
trainable weights: the original OpenFlamingo layout (`checkpoint.pt`, as `tools/export_checkpoint` writes it) or
our `trainable_state_dict()`. A file's spec is `--spec`, else the one `tools/export_checkpoint` wrote beside it
(`NAME.spec.yaml`), else the one in a safetensors file's metadata. The prompt holds one `<image>` per `--image`, in order.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="generate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="run dir, step folder, or a .pt / .safetensors file of trainable weights")
    p.add_argument("--spec", help="run spec YAML (overrides a run dir's spec.yaml, or the one beside an exported file)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="spec override, repeatable")
    p.add_argument("--image", action="append", default=[], required=True, help="image file, one per <image> in the prompt")
    p.add_argument("--prompt", default="<image>", help="text with one <image> per --image (default: '<image>')")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--num-beams", type=int, default=None, help="only this search (default: greedy and beam search of 3)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--allow-pickle", action="store_true", help="unpickle the checkpoint fully (can run code it contains)")
    return p.parse_args(argv)


def load_weights(model, path: str | Path, allow_pickle: bool = False) -> None:
    """Our trainable layout if it has `new_tokens.*` keys, else the original OpenFlamingo layout (strict)."""
    from .model.checkpoint_keys import load_openflamingo_state_dict, unwrap_checkpoint
    from .train.untrusted import load_untrusted

    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = unwrap_checkpoint(load_untrusted(path, allow_pickle=allow_pickle, opt_in="--allow-pickle"))
    if any(k.startswith("new_tokens.") for k in sd):
        model.load_trainable_state_dict(sd)
    else:
        load_openflamingo_state_dict(model, sd)


def build_from_checkpoint(path: Path, spec_path: str | None, overrides: list[str], allow_pickle: bool = False):
    """-> (model, image_processor, tokenizer) with the checkpoint's trainable weights."""
    from .model import build_flamingo
    from .model.tokenizer import load_tokenizer
    from .model.vision import build_image_processor
    from .spec import RunSpec

    if path.is_dir():
        from .train.export import find_checkpoint, load_checkpoint_into_model

        step = find_checkpoint(path)
        spec = RunSpec.from_yaml(spec_path or step / "spec.yaml", overrides=overrides)
        model, spec = load_checkpoint_into_model(step, spec, allow_pickle)
        m = spec.model
        tok = load_tokenizer(m.tokenizer or m.lm.name_or_path, offline=m.offline, trust_remote_code=m.lm.trust_remote_code, cache_dir=m.lm.cache_dir)
        return model, build_image_processor(model.vision_encoder), tok
    from .runtime import seed_everything
    from .train.export import spec_beside

    if spec_path:
        spec = RunSpec.from_yaml(spec_path, overrides=overrides)
    elif spec_beside(path).is_file():
        spec = RunSpec.from_yaml(spec_beside(path), overrides=overrides)
    else:
        spec = _embedded_spec(path, overrides)
    seed_everything(spec.run.seed)  # randomly initialised frozen parts (tests, demo) come out as in training
    model, processor, tok = build_flamingo(spec.model)
    load_weights(model, path, allow_pickle)
    return model, processor, tok


def _embedded_spec(path: Path, overrides: list[str]):
    """The spec in a safetensors export's metadata; ValueError for a file without one."""
    import yaml

    from .spec import RunSpec, apply_overrides
    from .train.export import SPEC_META, spec_beside

    text = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(SPEC_META)
    if text is None:
        raise ValueError(f"{path}: needs --spec (the run spec it was trained with): there is none beside it "
                         f"({spec_beside(path).name}) or inside it")
    return RunSpec.from_dict(apply_overrides(yaml.safe_load(text), overrides), source=f"{path} ({SPEC_META})")


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    from .model.tokenizer import MEDIA_TOKEN
    from .spec import SpecError

    args = parse_args(argv)
    problems = [f"--image: not found: {f}" for f in args.image if not Path(f).is_file()]
    if args.prompt.count(MEDIA_TOKEN) != len(args.image):
        problems.append(f"--prompt has {args.prompt.count(MEDIA_TOKEN)} {MEDIA_TOKEN} but {len(args.image)} --image given")
    if not Path(args.checkpoint).exists():
        problems.append(f"checkpoint not found: {args.checkpoint}")
    if problems:
        print("generate: " + "\n  ".join(problems), file=sys.stderr)
        return 2
    try:
        model, processor, tok = build_from_checkpoint(Path(args.checkpoint), args.spec, args.set, args.allow_pickle)
    except (SpecError, ValueError, KeyError, FileNotFoundError) as e:
        print(f"generate: {e}", file=sys.stderr)
        return 2
    model.to(args.device).eval()
    pixels = torch.stack([processor(Image.open(f).convert("RGB")) for f in args.image])[None].to(args.device)
    enc = tok([args.prompt], return_tensors="pt")

    def continuation(num_beams: int, skip_special: bool) -> str:
        out = model.generate(
            pixels, enc.input_ids.to(args.device), enc.attention_mask.to(args.device),
            max_new_tokens=args.max_new_tokens, num_beams=num_beams,
        )
        return tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=skip_special)

    if args.num_beams is not None:
        print(continuation(args.num_beams, skip_special=False))
        return 0
    print(f"prompt:           {args.prompt}")
    print(f"greedy:           {continuation(1, skip_special=True).strip()}")
    print(f"beam search (3):  {continuation(3, skip_special=True).strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
