"""`of_ds.perf.traffic` / `tools/bench_step --traffic`: bytes and FLOPs per operator of one step, on the meta device."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from of_ds.perf.bench_step import bench_spec
from of_ds.perf.traffic import (
    OPTIMIZER_BYTES_PER_TRAINABLE, Rates, TrafficCounter, count_step_traffic, footprint, fused_attention_kernels, time_gemm_shapes,
)
from of_ds.model import build_flamingo, count_parameters
from of_ds.model.flops import count_step_flops
from of_ds.model.flops import batch_shapes

REPO = Path(__file__).resolve().parents[2]


def test_footprint_counts_stored_bytes():
    x = torch.empty(8, 16, device="meta")
    assert footprint(x) == 8 * 16 * 4
    assert footprint(x.t()) == 8 * 16 * 4  # a transposed view touches the same bytes
    assert footprint(torch.empty(16, device="meta", dtype=torch.bfloat16).expand(8, 16)) == 16 * 2  # broadcast: stored once


def test_linear_gelu_counts_by_hand():
    b, d, h = 64, 32, 128
    x = torch.empty(b, d, device="meta")
    w = torch.empty(h, d, device="meta")
    counter = TrafficCounter()
    with counter:
        y = F.gelu(F.linear(x, w))
    t = counter.traffic
    assert t.kinds["gemm"].calls == 1 and t.kinds["gemm"].flops == 2 * b * d * h
    assert t.kinds["gemm"].bytes == 4 * (b * d + d * h + b * h)  # the GEMM reads x and w, writes y (transposed w: a view)
    assert t.kinds["memory"].calls == 1 and t.ops["gelu"].bytes == 2 * 4 * b * h  # reads and writes [b, h] once
    assert y.shape == (b, h)


def test_gathers_fills_copies_and_repeated_inputs_count_what_they_touch():
    logits = torch.empty(64, 1000, device="meta", requires_grad=True)
    target = torch.zeros(64, dtype=torch.long, device="meta")
    table, dst = torch.empty(1000, 32, device="meta"), torch.empty(64, 32, device="meta")
    counter = TrafficCounter()
    with counter:
        F.nll_loss(logits, target).backward()
        F.embedding(target, table)
        dst.copy_(torch.empty(64, 32, device="meta", dtype=torch.bfloat16))
        dst.zero_()
        x = torch.empty(64, 32, device="meta")
        torch.add(x, x)
        torch._foreach_mul_([x], 2.0)  # in place, returns nothing: its argument is read and written
    ops = counter.traffic.ops
    assert ops["nll_loss_forward"].bytes == 64 * 8 + 64 * 4 + 2 * 4  # the targets, one logit a row, loss and weight
    assert ops["nll_loss_backward"].bytes == 4 + 64 * 8 + 64 * 1000 * 4  # the logits are not read, their gradient written
    assert ops["embedding"].bytes == 64 * 8 + 2 * 64 * 32 * 4  # the rows read, not the table
    assert ops["copy_"].bytes == 64 * 32 * (2 + 4) and ops["zero_"].bytes == 64 * 32 * 4
    assert ops["add"].bytes == 2 * 64 * 32 * 4  # x given twice is read once
    assert "empty" not in ops
    assert ops["_foreach_mul_"].bytes == 2 * 64 * 32 * 4


@pytest.mark.slow
def test_the_optimizer_figure_is_what_a_deepspeed_step_moves():
    """OPTIMIZER_BYTES_PER_TRAINABLE against the count of a real DeepSpeed ZeRO-2 bf16 step (1 CPU rank)."""
    from engines_launch import env

    proc = subprocess.run([sys.executable, str(REPO / "tests" / "engines" / "traffic_optimizer_driver.py")],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "_fused_adamw_" in report["ops"]  # the engine's fused AdamW, as on a GPU
    # the schema counts the gradients as written too (fused AdamW may unscale them in place): 4 bytes over
    assert OPTIMIZER_BYTES_PER_TRAINABLE <= report["bytes_per_trainable"] <= OPTIMIZER_BYTES_PER_TRAINABLE + 5


def test_sdpa_counts_as_one_fused_kernel_each_way():
    q = torch.empty(2, 4, 16, 8, device="meta", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.zeros(2, 1, 16, 16, device="meta", dtype=torch.bfloat16)
    counter = TrafficCounter()
    with fused_attention_kernels(), counter:
        F.scaled_dot_product_attention(q, q, q, attn_mask=bias).sum().backward()
    names = set(counter.traffic.ops)
    assert {"_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"} <= names
    assert not names & {"bmm", "_safe_softmax", "_softmax"}, names  # not the meta device's math decomposition
    # torch's counter: forward 2 matmuls (4·B·H·L·S·d), backward 5 (the scores recomputed)
    assert counter.traffic.kinds["attention"].flops == 4 * 2 * 4 * 16 * 16 * 8 * 7 // 2
    assert "fused" not in F.scaled_dot_product_attention.__name__  # restored on exit


TINY_MPT = ["engine.precision=bf16",
            "model.lm.config={model_type: mpt, d_model: 64, n_layers: 2, n_heads: 4, vocab_size: 1000, max_seq_len: 256}"]


def test_step_counts_match_the_flop_counter_and_packing_halves_the_gemm_launches(tmp_path):
    spec = bench_spec(str(REPO / "launch" / "specs" / "openflamingo-3b.yaml"), TINY_MPT, True, tmp_path / "a")
    separate = count_step_traffic(spec)
    fused = count_step_traffic(bench_spec(str(REPO / "launch" / "specs" / "openflamingo-3b.yaml"),
                                          TINY_MPT + ["engine.fuse_datasets=true"], True, tmp_path / "b"))
    meta, _, _ = build_flamingo(spec.model, meta=True)
    size = meta.vision_encoder.image_size
    flops = count_step_flops(meta, batch_shapes(spec, int(size[0] if isinstance(size, (tuple, list)) else size)))
    counted = separate.kinds["gemm"].flops + separate.kinds["attention"].flops
    assert counted == pytest.approx(flops, rel=0.02)  # the same step; SDPA here fused, there the math path's matmuls
    assert fused.kinds["gemm"].calls < 0.6 * separate.kinds["gemm"].calls
    assert fused.kinds["gemm"].flops == pytest.approx(separate.kinds["gemm"].flops, rel=0.1)  # packing adds a little
    assert separate.optimizer_bytes == OPTIMIZER_BYTES_PER_TRAINABLE * count_parameters(meta)["trainable"]
    assert set(separate.forward_memory_bytes) == {"vision", "perceiver", "cross_attn", "lm_layers", "other"}
    ms = separate.projected_seconds(Rates(100.0, 50.0, 1.0))
    assert ms["total"] == pytest.approx(ms["gemm"] + ms["attention"] + ms["memory"])
    assert ms["memory"] == pytest.approx((separate.kinds["memory"].bytes + separate.optimizer_bytes) / 1e12)


def test_bench_step_traffic_prints_one_json_line():
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_step"), "--spec", str(REPO / "launch" / "specs" / "openflamingo-3b.yaml"),
         "--tiny", "--traffic", "--rates", "400,100,2", *(a for s in TINY_MPT for a in ("--set", s))],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rates"] == {"gemm_tflops": 400.0, "attention_tflops": 100.0, "memory_tbps": 2.0}
    assert report["projected_ms"]["total"] > 0 and report["projected_samples_per_s"] > 0
    assert report["kinds"]["gemm"]["calls"] > 0 and report["top_memory_ops"]


def test_an_lm_that_reads_mask_values_gets_a_clear_error(tmp_path):
    spec = bench_spec(str(REPO / "launch" / "specs" / "openflamingo-3b.yaml"), ["engine.precision=bf16"], True, tmp_path)  # tiny llama
    with pytest.raises(ValueError, match="LlamaForCausalLM reads tensor values while it builds its attention masks"):
        count_step_traffic(spec)


def test_every_matmul_shape_is_replayed_and_timed(tmp_path):
    traffic = count_step_traffic(bench_spec(str(REPO / "launch" / "specs" / "openflamingo-3b.yaml"), TINY_MPT, True, tmp_path))
    replayable = sum(t.calls for n, t in traffic.ops.items() if n in ("mm", "addmm", "bmm"))
    timed = time_gemm_shapes(traffic, torch.device("cpu"), torch.float32, repeats=1)
    assert sum(s["calls"] for s in timed["shapes"]) == replayable > 0
    assert any(any(s["transposed"]) for s in timed["shapes"])  # weights enter F.linear transposed
    assert timed["gemm_ms"] > 0 and all(s["ms_per_call"] > 0 for s in timed["shapes"])
    replayed = sum(t.flops for t in traffic.gemm_shapes.values())
    assert timed["blas"] == "cpu" and "gemm_ms_by_blas" not in timed
    convolutions = traffic.ops["convolution"].flops + traffic.ops["convolution_backward"].flops if "convolution_backward" in traffic.ops else traffic.ops["convolution"].flops
    assert replayed + convolutions == traffic.kinds["gemm"].flops > 0


@pytest.mark.slow
def test_compiled_traffic_measures_each_kind_of_layer(capsys):
    """tools/compiled_traffic: eager and compiled steps of 1-2 LM and vision layers, each layer kind's ratio, the
    full-size projection."""
    from of_ds.perf.compiled_traffic import main

    sets = [a for s in TINY_MPT + ["engine.fuse_datasets=true"] for a in ("--set", s)]
    assert main(["--spec", str(REPO / "launch" / "specs" / "openflamingo-3b.yaml"), "--tiny", "--rows", "2,4", *sets]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["compiled_over_unfused_eager"]) == {"lm_layer", "vision_layer", "rest"}
    assert all(v > 0 for v in report["compiled_over_unfused_eager"].values())
    eager, compiled = zip(*report["measured_small_gb"].values())
    assert all(e > 0 for e in eager) and all(c > 0 for c in compiled)
    assert report["compiled_over_unfused_eager"]["rest"] < 1 and compiled[0] < eager[0]  # at least the loss fuses
    steps = report["projected_step_ms"]
    assert steps["compiled_vision_eager"] <= steps["eager"]


def test_the_replay_times_each_blas_library_and_restores_the_one_in_effect(tmp_path):
    """On a GPU, each shape runs under cuBLAS and cuBLASLt (`torch.backends.cuda.preferred_blas_library`). The
    setting is global, so a CPU exercises the bookkeeping: the library in effect first, both totals, and the setting
    as it was afterwards."""
    traffic = count_step_traffic(bench_spec(str(REPO / "launch" / "specs" / "openflamingo-3b.yaml"), TINY_MPT, True, tmp_path))
    before = torch.backends.cuda.preferred_blas_library()
    timed = time_gemm_shapes(traffic, torch.device("cpu"), torch.float32, repeats=1, compare_blas=True)
    assert torch.backends.cuda.preferred_blas_library() == before
    assert timed["blas"] == before.name.lower() and set(timed["gemm_ms_by_blas"]) == {"cublas", "cublaslt"}
    assert timed["gemm_ms"] == timed["gemm_ms_by_blas"][timed["blas"]]
    for shape in timed["shapes"]:
        assert list(shape["ms_by_blas"])[0] == timed["blas"] and shape["ms_per_call"] == shape["ms_by_blas"][timed["blas"]]
    per_library = {k: sum(s["ms_by_blas"][k] * s["calls"] for s in timed["shapes"]) for k in ("cublas", "cublaslt")}
    for k, total in per_library.items():
        assert total == pytest.approx(timed["gemm_ms_by_blas"][k], rel=1e-3, abs=0.05)


def test_the_replay_marks_shapes_a_library_refused(tmp_path, monkeypatch):
    """Where cuBLASLt refuses a shape, torch warns and runs cuBLAS: the row says so rather than passing the fallback's
    time off as cuBLASLt's. (The refusal is played by a matmul that warns as libtorch_cuda does under cuBLASLt.)"""
    from of_ds.perf import traffic as traffic_module

    def refusing_mm(a, b):
        if torch.backends.cuda.preferred_blas_library().name.lower() == "cublaslt":
            warnings.warn("bgemm_internal_cublaslt error: CUBLAS_STATUS_NOT_SUPPORTED. Will attempt to recover by calling cublas instead.")
        return torch.mm(a, b)

    monkeypatch.setitem(traffic_module.TIMED_GEMMS, "mm", refusing_mm)
    traffic = count_step_traffic(bench_spec(str(REPO / "launch" / "specs" / "openflamingo-3b.yaml"), TINY_MPT, True, tmp_path))
    with pytest.warns(UserWarning, match="recover by calling cublas"):  # still shown
        timed = time_gemm_shapes(traffic, torch.device("cpu"), torch.float32, repeats=1, compare_blas=True)
    for shape in timed["shapes"]:
        assert shape.get("cublaslt_refused_in") == (["cublaslt"] if shape["op"] == "mm" else None)
    assert timed["shapes_cublaslt_refused"] == sum(1 for s in timed["shapes"] if s["op"] == "mm") > 0


def test_multihead_attention_is_counted_as_the_fast_path_a_gpu_takes():
    """open_clip's frozen ViT runs nn.MultiheadAttention under no_grad in eval mode: on a GPU its fast path (input
    projection, one head-split pass, fused SDPA, output projection), which the meta device never takes. The count
    replays that path; it computes what the module computes, and training still takes the module's own path."""
    from torch import nn

    from of_ds.perf.traffic import _mha_fast_path

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(3, 17, 64)
    with torch.no_grad():
        assert torch.allclose(_mha_fast_path(mha, x), mha(x, x, x, need_weights=False)[0], atol=1e-5)

    def count(module, grad: bool):
        counter, meta = TrafficCounter(), torch.zeros(3, 17, 64, device="meta")
        with fused_attention_kernels(), counter, torch.set_grad_enabled(grad):
            module(meta, meta, meta, need_weights=False)
        return {name: t.calls for name, t in counter.traffic.ops.items()}

    mha.to("meta")
    fast = count(mha, grad=False)
    assert fast == {"addmm": 2, "_scaled_dot_product_efficient_attention": 1}, fast  # SDPA reads strided head views
    slow = count(mha.train(), grad=True)  # training: nn.MultiheadAttention's own path
    assert sum(slow.values()) > sum(fast.values())
