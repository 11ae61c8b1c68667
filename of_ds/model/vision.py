"""The frozen open_clip vision encoder and its evaluation transform.

Patch tokens: we return the tokens *before* `ln_post`, as open_clip < 2.23 (which OpenFlamingo's released
checkpoints were trained with) did. open_clip 3.3 applies `ln_post` to all tokens by default
(`final_ln_after_pool=False`); setting `final_ln_after_pool=True` on the tower restores the old behaviour for the
tokens (only the pooled output, which we do not use, gets `ln_post`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..spec import VisionSpec

_REQUIRED_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


class ImageProcessorConfig(NamedTuple):
    """What the data pipeline needs to reproduce the eval transform numerically."""

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    resize_mode: str


def register_open_clip_config(name: str, config: dict) -> None:
    """Register a custom open_clip model config dict under `name` (open_clip's `add_model_config` reads files)."""
    import open_clip

    missing = [k for k in _REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"model.vision.config: an open_clip config needs keys {list(_REQUIRED_CONFIG_KEYS)}; missing {missing}")
    if "/" in name or name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"model.vision.name: '{name}' cannot name a custom config (use a plain name)")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{name}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)
    if open_clip.get_model_config(name) is None:
        raise ValueError(f"model.vision.config: open_clip did not accept the config registered as '{name}'")


def build_vision_encoder(spec: VisionSpec, *, load_weights: bool = True, device: str | torch.device = "cpu") -> tuple[nn.Module, object, int]:
    """Create the open_clip model, keep `.visual` (frozen, eval, returning patch tokens); also its val transform and width."""
    import open_clip

    if spec.config is not None:
        register_open_clip_config(spec.name, spec.config)
    cfg = open_clip.get_model_config(spec.name)
    if cfg is None:
        raise ValueError(f"model.vision.name: unknown open_clip model '{spec.name}' (see open_clip.list_models(), or give model.vision.config)")
    pretrained = spec.pretrained if load_weights else None
    if pretrained and not Path(pretrained).exists() and pretrained not in open_clip.list_pretrained_tags_by_model(spec.name):
        raise ValueError(f"model.vision.pretrained: '{pretrained}' is neither a file nor a pretrained tag of {spec.name}")
    clip = open_clip.create_model(spec.name, pretrained=pretrained, cache_dir=spec.cache_dir, device=device)
    visual = clip.visual
    visual.output_tokens = True
    visual.final_ln_after_pool = True  # tokens before ln_post (see the module docstring)
    visual.requires_grad_(False)
    visual.eval()
    return visual, build_image_processor(visual), int(cfg["vision_cfg"]["width"])


def build_image_processor(visual: nn.Module):
    """open_clip's evaluation transform (resize, center crop, normalize) for this tower."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**visual.preprocess_cfg), is_train=False)


def image_processor_config(model: nn.Module) -> ImageProcessorConfig:
    """The eval transform's parameters of a Flamingo (or an open_clip visual tower)."""
    visual = getattr(model, "vision_encoder", model)
    pp = visual.preprocess_cfg
    size = pp["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    return ImageProcessorConfig(size, tuple(pp["mean"]), tuple(pp["std"]), pp["interpolation"], pp["resize_mode"])


def tower_image_size(model: nn.Module) -> int:
    """The square input size of a Flamingo's vision encoder (or of an open_clip visual tower)."""
    size = getattr(model, "vision_encoder", model).image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def encode_patch_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, v, D] patch tokens, without autograd (the tower is frozen)."""
    with torch.no_grad():
        dtype = next(visual.parameters()).dtype
        return visual(images.to(dtype))[1]
