"""FLOPs of one training step (forward + backward), counted by `torch.utils.flop_counter.FlopCounterMode`.

Works on a meta-device model (`build_flamingo(spec, meta=True)`), so the recipe's FLOPs can be counted anywhere:
meta weights run as FakeTensors (HF's mask helpers skip their value checks for those).
"""

from __future__ import annotations

import contextlib
from typing import Mapping, Sequence, Union

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .language import module_path

BatchShapes = Mapping[str, Sequence[int]]


def _fake_batch(model, shapes: BatchShapes, device, dtype) -> dict[str, torch.Tensor]:
    b, length = shapes["input_ids"]
    ids = torch.zeros(b, length, dtype=torch.long, device=device)
    return dict(
        pixel_values=torch.zeros(*shapes["pixel_values"], device=device, dtype=dtype),
        input_ids=ids,
        attention_mask=None,  # HF mask helpers read a given mask's values, which meta tensors lack
        labels=ids,
    )


@contextlib.contextmanager
def _no_mha_fastpath():
    """nn.MultiheadAttention's eval fast path is one fused op the counter cannot see (open_clip's ViT uses it)."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def _count(model, batch_shapes, counter: FlopCounterMode, backward: bool = True) -> None:
    """Run forward (+ backward) per batch under `counter`, on FakeTensors when the model is on the meta device."""
    shapes_list = [batch_shapes] if isinstance(batch_shapes, Mapping) else list(batch_shapes)
    param = next(model.parameters())
    if param.device.type != "meta":
        # the counter has no formula for CPU's fused SDPA kernel: use the math path there, whose matmuls it counts
        backend = sdpa_kernel(SDPBackend.MATH) if param.device.type == "cpu" else contextlib.nullcontext()
        with counter, backend, _no_mha_fastpath():
            for shapes in shapes_list:
                loss = model(**_fake_batch(model, shapes, param.device, param.dtype)).loss
                if backward:
                    loss.backward()
        model.zero_grad(set_to_none=True)
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        state = {k: fake.from_tensor(v) for k, v in [*model.named_parameters(), *model.named_buffers()]}
        for k, v in model.named_parameters():
            state[k].requires_grad_(v.requires_grad)
        with counter:
            for shapes in shapes_list:
                batch = _fake_batch(model, shapes, "meta", param.dtype)
                loss = functional_call(model, state, args=(), kwargs=batch).loss
                if backward:
                    loss.backward()


def count_step_flops(model, batch_shapes: Union[BatchShapes, Sequence[BatchShapes]]) -> int:
    """Total FLOPs of forward + backward over one batch per dataset.

    `batch_shapes`: {"pixel_values": (B, T, 3, H, W), "input_ids": (B, L)} or a list of those (one per dataset).
    Every image slot is counted as real (no `num_images` skipping), as the recipe's padded worst case.
    """
    counter = FlopCounterMode(display=False)
    _count(model, batch_shapes, counter)
    return int(counter.get_total_flops())


def forward_flops_by_part(model, batch_shapes: Union[BatchShapes, Sequence[BatchShapes]]) -> dict[str, int]:
    """Forward FLOPs per part: vision_encoder, perceiver, cross_attention, lm_body, lm_head (incl. new-token head).

    Forward only: the counter's module attribution is reliable there, not in backward.
    """
    counter = FlopCounterMode(display=False, depth=None)
    _count(model, batch_shapes, counter, backward=False)
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    root = type(model).__name__
    head = module_path(model.lang_encoder, model.lang_encoder.get_output_embeddings())
    parts = {
        "vision_encoder": counts.get(f"{root}.vision_encoder", 0),
        "perceiver": counts.get(f"{root}.perceiver", 0),
        "cross_attention": sum(v for k, v in counts.items() if k.endswith(".gated_cross_attn_layer")),
        "lm_head": counts.get(f"{root}.lang_encoder.{head}", 0) + counts.get(f"{root}.new_tokens.output", 0),
    }
    parts["lm_body"] = counts.get("Global", 0) - sum(parts.values())
    parts["total"] = counts.get("Global", 0)
    return parts


def batch_shapes(spec, image_size: int) -> list[dict]:
    """Padded worst-case micro-batch shapes per dataset (for FLOP counting)."""
    out = []
    for d in spec.data.datasets:
        t = 1 if d.kind == "laion" else d.max_images
        out.append({"pixel_values": (d.batch_size, t, 3, image_size, image_size), "input_ids": (d.batch_size, d.effective_max_tokens())})
    return out
