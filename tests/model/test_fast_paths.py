"""The step-speed paths against the plain ones: the per-part step breakdown, torch.compile of each part,
DDP with frozen weights stored in bf16."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from of_ds.perf.step_profile import PARTS, StepBreakdown, run_profiled_step

from .conftest import build_tiny, encode, open_gates

REPO = Path(__file__).resolve().parents[2]


def two_batches(tok):
    """An MMC4-like batch (2 images a row) and a LAION-like one (1 image), as the step loop feeds them."""
    ids, mask = encode(tok, ["<image>a photo of a cat<|endofchunk|><image>a dog", "<image>a cup<|endofchunk|>"])
    ids2, mask2 = encode(tok, ["<image>a rocket<|endofchunk|>", "<image>a red sofa<|endofchunk|>", "<image>a flag"])
    g = torch.Generator().manual_seed(0)
    return [
        dict(pixel_values=torch.randn(2, 2, 3, 32, 32, generator=g), input_ids=ids, attention_mask=mask, labels=ids, num_images=torch.tensor([2, 1])),
        dict(pixel_values=torch.randn(3, 1, 3, 32, 32, generator=g), input_ids=ids2, attention_mask=mask2, labels=ids2, num_images=torch.ones(3, dtype=torch.long)),
    ]


def loss_and_grads(model, batches):
    model.zero_grad(set_to_none=True)
    loss = sum(model(**b).loss for b in batches)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_breakdown_covers_every_part_and_sums_to_the_step(tiny_tokenizer_dir):
    model, _, tok = build_tiny(tiny_tokenizer_dir, "llama", every_n_layers=1)
    open_gates(model)
    batches = two_batches(tok)
    ref_loss, ref_grads = loss_and_grads(model, batches)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    breakdown = StepBreakdown(model, torch.device("cpu"))

    def step(mark):
        model.zero_grad(set_to_none=True)
        loss = sum(model(**b).loss for b in batches)
        mark("head_loss_bwd")
        loss.backward()
        mark("optimizer")
        opt.step()
        step.loss = loss.detach()

    t = time.perf_counter()
    parts = run_profiled_step(breakdown, step, lambda: None)
    wall = time.perf_counter() - t
    assert set(PARTS) <= set(parts), set(PARTS) - set(parts)
    assert all(v >= 0 for v in parts.values())
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
    assert 0.5 * wall < parts["total"] <= wall
    # marks per part: one pair per module call in forward, one per layer and dataset in backward
    n_layers, n_sets = len(model.flamingo_layers()), len(batches)
    counts = Counter(label for label, _ in breakdown.marks)
    assert counts["cross_attn_fwd"] == counts["lm_layers_fwd"] == n_layers * n_sets
    assert counts["vision_fwd"] == counts["perceiver_fwd"] == n_sets
    assert counts["cross_attn_bwd"] >= n_layers * n_sets and counts["lm_layers_bwd"] >= n_layers * n_sets
    assert counts["embed_perceiver_bwd"] == n_sets
    # every forward mark comes before the first backward mark
    labels = [label for label, _ in breakdown.marks]
    first_bwd = labels.index("head_loss_bwd")
    assert not any(label.endswith("_bwd") for label in labels[:first_bwd])
    assert all(label.endswith("_bwd") or label in ("optimizer", "end") for label in labels[first_bwd:])
    # the hooks observe, they change nothing
    assert torch.equal(step.loss, ref_loss)
    breakdown.remove()
    loss, grads = loss_and_grads(model, batches)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.slow
def test_compiled_parts_match_eager(tiny_tokenizer_dir):
    """engine.compile_targets=[lm_layers, perceiver, vision]: same logits and gradients as eager (fp32, CPU)."""
    model, _, tok = build_tiny(tiny_tokenizer_dir, "mpt", every_n_layers=1)
    open_gates(model)
    model.train()
    batches = two_batches(tok)
    ref_loss, ref_grads = loss_and_grads(model, batches)
    model.compile_parts(["lm_layers", "perceiver", "vision"])
    for _ in range(2):  # the second call runs the cached graphs
        loss, grads = loss_and_grads(model, batches)
        assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
        for k in ref_grads:
            assert torch.allclose(grads[k], ref_grads[k], atol=1e-5, rtol=1e-4), k
    with pytest.raises(ValueError, match="compile_targets"):
        model.compile_parts(["everything"])


def ddp_spec(precision: str):
    from of_ds.spec import RunSpec

    return RunSpec.from_yaml(REPO / "launch" / "specs" / "demo.yaml", [f"engine.kind=ddp", f"engine.precision={precision}", "optim.warmup_steps=0"])


def test_ddp_bf16_keeps_frozen_weights_in_bf16_and_matches_fp32(tiny_tokenizer_dir, monkeypatch):
    import torch.distributed as dist

    from of_ds.engines.torch_engine import TorchEngine
    from of_ds.runtime import Runtime, _free_port

    ref, _, tok = build_tiny(tiny_tokenizer_dir, "gpt_neox")  # padded vocab: new ids inside the matrix (index_copy path)
    open_gates(ref)
    batches = two_batches(tok)
    weights = {"mmc4": 1.0, "laion": 0.2}
    named = dict(zip(weights, batches))
    ref.train()
    ref_loss = sum(w * ref(**named[k]).loss for k, w in weights.items()).item()

    model, _, _ = build_tiny(tiny_tokenizer_dir, "gpt_neox")
    open_gates(model)
    started = not dist.is_initialized()
    if started:
        # set through monkeypatch, so they are removed again: later launches from this process must not inherit them
        rendezvous = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        for var, value in rendezvous.items():
            monkeypatch.setenv(var, value)
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        runtime = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
        engine = TorchEngine(model, ddp_spec("bf16"), runtime, total_steps=10)
        assert isinstance(engine.wrapped, torch.nn.parallel.DistributedDataParallel)
        assert not engine.wrapped.will_sync_module_buffers()  # NCCL's in-place buffer broadcast broke the 2nd dataset's graph
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.ndim >= 2}
        rest = {p.dtype for p in model.parameters() if p.requires_grad or p.ndim < 2}
        assert frozen == {torch.bfloat16} and rest == {torch.float32}
        losses = engine.forward(named, weights)
        engine.backward(losses["loss"])
        stats = engine.step()
        assert losses["loss"].item() == pytest.approx(ref_loss, rel=0.03)
        assert stats.grad_norm > 0 and not stats.skipped
    finally:
        if started:
            dist.destroy_process_group()


@pytest.mark.parametrize("chunk", [5, 7, 1000])
def test_chunked_loss_equals_the_one_pass_loss(tiny_tokenizer_dir, chunk):
    """engine.loss_chunk_tokens: LM head + loss per chunk of positions, recomputed in backward. Same loss and
    gradients as the one-pass loss (fp32, CPU), chunks that do not divide the batch's positions included; a
    chunk as large as the batch takes the one-pass path (and returns logits)."""
    model, _, tok = build_tiny(tiny_tokenizer_dir, "mpt", every_n_layers=1)
    open_gates(model)
    model.train()
    batches = two_batches(tok)
    ref_loss, ref_grads = loss_and_grads(model, batches)
    model.set_loss_chunking(chunk)
    loss, grads = loss_and_grads(model, batches)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7, msg=k)
    out = model(**batches[0])
    positions = batches[0]["input_ids"].numel()
    assert (out.logits is None) == (chunk < positions)


@pytest.mark.parametrize("tokens", [4, 64])  # fewer outputs than weights: the output is scaled; more: the weight
def test_scaled_linear_equals_scaling_the_output(tokens):
    """The gates' ScaledLinear: F.linear(x, W·s) or linear(x)·s, whichever moves less, equal to linear(x)·s with the
    same gradients for x, W and s."""
    from of_ds.model.perceiver import ScaledLinear

    torch.manual_seed(0)
    layer = ScaledLinear(16, 8, bias=False)
    x = torch.randn(tokens, 16, requires_grad=True)
    s = torch.tensor([0.3], requires_grad=True)
    grads = []
    for fn in (lambda: layer(x, s), lambda: torch.nn.functional.linear(x, layer.weight) * s):
        for t in (x, s, layer.weight):
            t.grad = None
        out = fn()
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), x.grad.clone(), s.grad.clone(), layer.weight.grad.clone()))
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)  # fp32 rounding; gradients up to ~1e3
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight))  # no scale: a plain Linear
