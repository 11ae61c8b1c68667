"""Checkpoints the original trainer writes (its own `save_checkpoint`) load into our model, for every LM family:
the same logits as the original model, frozen weights compared, key problems named."""

from __future__ import annotations

import re

import pytest
import torch

from of_ds.model.checkpoint_keys import load_openflamingo_state_dict, original_optimizer_state
from of_ds.train.untrusted import load_untrusted  # the original's files load without full unpickling

from .original_checkpoints import FAMILIES, build_ours, load_train_utils, logits_of, write_original_checkpoint


@pytest.fixture(scope="module")
def train_utils(original, original_tree):
    return load_train_utils(original_tree)


@pytest.fixture(scope="module")
def written(original, train_utils, tiny_tokenizer_dir, tmp_path_factory):
    """family -> (checkpoint path, the original model that wrote it, our model spec), written once per module."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = write_original_checkpoint(original, train_utils, tiny_tokenizer_dir, family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


def file_keys(path) -> list[str]:
    return [k.removeprefix("module.") for k in load_untrusted(path)["model_state_dict"]]


def expected_file_keys(theirs) -> set[str]:
    """What `filter_state_dict_to_trainable` leaves, derived from its rules: trainable parameters, frozen ones whose
    name contains "embed", the tied head's duplicate (not a named parameter, so never filtered); no vision tower and
    no second registration of the decoder blocks."""
    named = dict(theirs.named_parameters())
    keep = {n for n, p in named.items() if p.requires_grad or "embed" in n}
    keep |= {k for k in theirs.state_dict() if k not in named}  # duplicates of shared weights (and buffers)
    return {k for k in keep if not k.startswith("vision_encoder") and "old_decoder_blocks" not in k and "gated_cross_attn_layers" not in k}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_original_checkpoint_loads_with_the_original_logits(written, tiny_tokenizer_dir, family):
    path, theirs, spec = written(family)
    keys = file_keys(path)
    assert set(keys) == expected_file_keys(theirs)
    obj = load_untrusted(path)
    assert set(obj) == {"epoch", "model_state_dict", "optimizer_state_dict", "lr_scheduler_state_dict"}
    ours, tok = build_ours(spec)
    before = logits_of(ours, tok)
    expected = logits_of(theirs, tok, original=True)
    assert not torch.allclose(before, expected, atol=1e-3)
    report = load_openflamingo_state_dict(ours, obj)
    assert report.ok and report.frozen_differences == {}
    assert report.head_absent == (not ours.new_tokens.tied)  # the original filters an untied (frozen) head out
    got = logits_of(ours, tok)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()

    bare = build_ours(spec)[0]  # a released checkpoint.pt: the bare model_state_dict, no DDP prefix
    load_openflamingo_state_dict(bare, {k.removeprefix("module."): v for k, v in obj["model_state_dict"].items()})
    assert torch.equal(logits_of(bare, tok), got)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_frozen_differences_are_reported(written, family):
    path, theirs, spec = written(family)
    sd = {k.removeprefix("module."): v.clone() for k, v in load_untrusted(path)["model_state_dict"].items()}
    ours, _ = build_ours(spec)
    embed = next(k for k in sd if sd[k].ndim == 2 and sd[k].shape[0] == ours.new_tokens.vocab_size)
    sd[embed][0] += 0.25  # a row of the LM's own tokens
    for dup in [k for k in sd if k.endswith("lm_head.weight") and k != embed and ours.new_tokens.tied]:
        sd[dup] = sd[embed]  # a tied head's duplicate is the same tensor
    norm = next(k for k, v in theirs.state_dict().items() if k.startswith("lang_encoder") and ("norm" in k or "ln" in k) and "gated" not in k)
    sd[norm] = theirs.state_dict()[norm] + 0.5  # a frozen LM weight the original's filter removes (FSDP keeps it)
    own_norm = ours.state_dict()[norm].clone()
    with pytest.warns(UserWarning, match="frozen weight") as caught:
        report = load_openflamingo_state_dict(ours, sd)
    message = str(caught[0].message)
    assert f"{norm} (max abs difference 0.5)" in message and f"{embed} (rows of the LM's own tokens) (max abs difference 0.25)" in message
    assert set(report.frozen_differences) == {norm, f"{embed} (rows of the LM's own tokens)"}
    assert torch.equal(ours.state_dict()[norm], own_norm)  # reported, not loaded


@pytest.mark.parametrize("family", list(FAMILIES))
def test_missing_unexpected_and_misshapen_keys_are_named(written, family):
    path, _, spec = written(family)
    sd = {k.removeprefix("module."): v for k, v in load_untrusted(path)["model_state_dict"].items()}
    ours, _ = build_ours(spec)
    embed = next(k for k in sd if sd[k].ndim == 2 and sd[k].shape[0] == ours.new_tokens.vocab_size and "lm_head" not in k)
    gated = next(k for k in sd if ".gated_cross_attn_layer.attn.to_q." in k)
    for key in ("perceiver.latents", gated, embed):
        with pytest.raises(KeyError, match=rf"missing \[.*'{re.escape(key)}'"):
            load_openflamingo_state_dict(ours, {k: v for k, v in sd.items() if k != key and not (key == embed and "lm_head" in k)})
    with pytest.raises(KeyError, match=r"unexpected \['lang_encoder\.extra\.weight'\]"):
        load_openflamingo_state_dict(ours, {**sd, "lang_encoder.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=re.escape(f"{gated}: shape (3,) in the checkpoint, {tuple(sd[gated].shape)} in the model")):
        load_openflamingo_state_dict(ours, {**sd, gated: torch.zeros(3)})


def test_wrapper_names_and_an_unfiltered_file(written, tiny_tokenizer_dir):
    """FSDP and activation-checkpointing names, and a file with every weight (FSDP's filter keeps frozen ones)
    holding the original's second registrations of the decoder blocks and the vision tower."""
    _, theirs, spec = written("llama")
    full = theirs.state_dict()
    assert any("old_decoder_blocks" in k for k in full) and any("vision_encoder" in k for k in full)

    def wrapped(key: str) -> str:
        key = key.replace("lang_encoder.model.layers.", "lang_encoder._fsdp_wrapped_module.model.layers.")
        key = re.sub(r"(layers\.\d+\.)", r"\1_checkpoint_wrapped_module.", key)
        return "module." + key.replace("perceiver.", "perceiver._fsdp_wrapped_module._fsdp_wrapped_module.")

    ours, tok = build_ours(spec)
    report = load_openflamingo_state_dict(ours, {"model_state_dict": {wrapped(k): v for k, v in full.items()}})
    assert report.ok and report.frozen_differences == {} and not report.head_absent
    assert torch.allclose(logits_of(ours, tok), logits_of(theirs, tok, original=True), atol=1e-5)


def test_gpt_neox_transformers4_head_name(written):
    """transformers 4 named GPT-NeoX's head `embed_out`: the original's filter kept it, frozen ("embed")."""
    path, theirs, spec = written("gpt_neox")
    sd = load_untrusted(path)["model_state_dict"]
    head = theirs.lang_encoder.get_output_embeddings().weight.detach().clone()
    head[theirs.media_token_id] += 1.0  # the original's own (random) row for <image>, which we then use
    ours, tok = build_ours(spec)
    report = load_openflamingo_state_dict(ours, {**sd, "module.lang_encoder.embed_out.weight": head})
    assert report.ok and not report.head_absent and report.frozen_differences == {}
    slot = int(ours.new_tokens.slot_of_id[theirs.media_token_id])
    assert torch.equal(ours.new_tokens.output.weight[slot], head[theirs.media_token_id])


def test_a_file_written_with_frozen_lm_embeddings(written):
    """freeze_lm_embeddings: MPT's `wte` has no "embed" in its name, so the filter drops it; the tied head's
    duplicate stays, and serves as the input matrix. A model that trains the new tokens needs the matrix."""
    path, theirs, spec = written("mpt")
    sd = {k: v for k, v in load_untrusted(path)["model_state_dict"].items() if "wte" not in k}
    ours, tok = build_ours(spec)
    assert load_openflamingo_state_dict(ours, sd).ok  # via lm_head.weight
    assert torch.allclose(logits_of(ours, tok), logits_of(theirs, tok, original=True), atol=1e-5)
    no_matrix = {k: v for k, v in sd.items() if "lm_head" not in k}
    with pytest.raises(KeyError, match=r"lang_encoder\.transformer\.wte\.weight"):
        load_openflamingo_state_dict(build_ours(spec)[0], no_matrix)
    frozen_spec = spec.model_copy(update={"freeze_lm_embeddings": True})
    frozen, _ = build_ours(frozen_spec)
    assert load_openflamingo_state_dict(frozen, no_matrix).ok


@pytest.mark.parametrize("family", ["llama", "opt"])  # untied, tied
def test_optimizer_state_maps_to_our_parameters(written, family):
    """The original's index-keyed AdamW state, mapped through its train.py's grouping to our parameters."""
    path, theirs, spec = written(family)
    obj = load_untrusted(path)
    ours, _ = build_ours(spec)
    state = original_optimizer_state(ours, obj)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert set(state) == trainable - {"new_tokens.output.weight"}  # the original never trained a head row
    params = dict(ours.named_parameters())
    assert all(s["exp_avg"].shape == s["exp_avg_sq"].shape == params[n].shape for n, s in state.items())
    assert all(float(s["step"]) == 2 for s in state.values())
    # the original's own moments, by its parameters: the same tensors under our names
    theirs_state = {n: obj["optimizer_state_dict"]["state"][i] for i, n in enumerate(_theirs_order(theirs))}
    for name in ("perceiver.latents", next(n for n in state if ".gated_cross_attn_layer.attn.to_q." in n)):
        assert torch.equal(state[name]["exp_avg_sq"], theirs_state[name]["exp_avg_sq"]), name
    embed = next(n for n in theirs_state if "embed_tokens" in n)
    rows = ours.new_tokens.new_ids
    assert torch.equal(state["new_tokens.input.weight"]["exp_avg"], theirs_state[embed]["exp_avg"][rows])
    media, pad = (int(ours.new_tokens.slot_of_id[i]) for i in (ours.media_token_id, ours.pad_token_id))
    assert state["new_tokens.input.weight"]["exp_avg"][media].abs().sum() > 0
    assert state["new_tokens.input.weight"]["exp_avg"][pad].abs().sum() == 0  # masked in the original too

    osd = obj["optimizer_state_dict"]
    bad = {**obj, "optimizer_state_dict": {**osd, "state": {**osd["state"], 0: {**osd["state"][0], "exp_avg": torch.zeros(5)}}}}
    with pytest.raises(ValueError, match=r"optimizer state 0 \(.*gated_cross_attn_layer.*\): exp_avg has shape \(5,\)"):
        original_optimizer_state(ours, bad)
    fewer = {**obj, "optimizer_state_dict": {**osd, "param_groups": [osd["param_groups"][0]]}}
    with pytest.raises(ValueError, match="parameters, but the checkpoint's keys give"):
        original_optimizer_state(ours, fewer)


def test_carry_names_the_deepspeed_internals_it_relies_on(tmp_path):
    """The carry writes the moments through ZeRO optimizers' private attributes: a DeepSpeed without them is refused
    by name, before anything is written (the optimizer here is a class of that name, missing them)."""
    from of_ds.train.restore import _CARRY_NEEDS, _require_zero_internals

    for name, needs in _CARRY_NEEDS.items():
        import deepspeed.runtime.zero.stage3 as z3
        import deepspeed.runtime.zero.stage_1_and_2 as z12

        real = {"DeepSpeedZeroOptimizer": z12, "DeepSpeedZeroOptimizer_Stage3": z3}[name]
        cls = getattr(real, name)
        assert all(hasattr(cls, a) or a in ("optimizer", "fp32_partitioned_groups_flat", "_hp_optimizer_states_linked")
                   for a in needs), name  # methods are on the class; the rest are set in __init__
        lacking = type(name, (), {"optimizer": None})()
        with pytest.raises(RuntimeError, match=rf"relies on {needs[1]}.* of DeepSpeed's {name}.*original_optimizer: fresh"):
            _require_zero_internals(lacking, tmp_path / "checkpoint.pt")


def _theirs_order(theirs) -> list[str]:
    """The original optimizer's index order, from the original model's own parameters (not its file)."""
    named = [(n, p) for n, p in theirs.named_parameters() if p.requires_grad]
    return [n for n, _ in named if "gated_cross_attn" in n] + [n for n, _ in named if "gated_cross_attn" not in n]


def _run_spec(tokenizer_dir: str, spec, out_dir, name: str, engine: dict, carry: str, path) -> dict:
    from engines_standin import tiny_spec_dict

    d = tiny_spec_dict(tokenizer_dir, str(out_dir), engine={**engine, "precision": "fp32"},
                       checkpoint={"resume_from": str(path), "original_optimizer": carry, "every_n_steps": 2})
    d["model"] = spec.model_dump(mode="json")
    d["run"].update(name=name, max_steps=2)
    d["optim"]["warmup_steps"] = 0  # the first step moves the weights
    return d


@pytest.fixture
def standin_path():
    import sys
    from pathlib import Path

    engines = str(Path(__file__).resolve().parents[1] / "engines")
    sys.path.insert(0, engines)
    yield
    sys.path.remove(engines)


def test_carry_the_original_optimizer_under_ddp(written, tiny_tokenizer_dir, tmp_path, standin_path):
    import contextlib
    import types

    from engines_standin import StandInData

    from of_ds.engines import build_engine
    from of_ds.runtime import Runtime
    from of_ds.spec import RunSpec
    from of_ds.train.checkpoint import TrainState
    from of_ds.train.loop import train_loop
    from of_ds.train.plan import ResumePoint
    from of_ds.train.restore import load_start_weights, restore

    path, _, model_spec = written("llama")
    runtime = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")  # no process group
    after = {}
    for carry in ("fresh", "carry"):
        spec = RunSpec.from_dict(_run_spec(tiny_tokenizer_dir, model_spec, tmp_path, carry, {"kind": "ddp"}, carry, path))
        ours, tok = build_ours(model_spec)
        start = ResumePoint("weights_only", path)
        load_start_weights(ours, start, spec)
        engine = build_engine(ours, spec, runtime, 1)
        data = StandInData(spec, tok)
        restore(engine, data, None, start, spec, runtime)
        state = engine.optimizer.state
        expected = original_optimizer_state(ours, load_untrusted(path))
        if carry == "carry":
            assert torch.equal(state[ours.perceiver.latents]["exp_avg_sq"], expected["perceiver.latents"]["exp_avg_sq"])
            assert torch.equal(state[ours.new_tokens.input.weight]["exp_avg"], expected["new_tokens.input.weight"]["exp_avg"])
            assert float(state[ours.perceiver.latents]["step"]) == 2
        else:
            assert len(state) == 0
        hooks = types.SimpleNamespace(data_wait_timer=contextlib.nullcontext, should_log=lambda step: False,
                                      should_save=lambda step, total: False, observe=lambda batch, loss: None,
                                      step=lambda *a, **k: None, settle_totals=lambda state: None)
        assert train_loop(engine, data, spec, runtime, hooks, hooks, TrainState(), 1).step == 1
        after[carry] = ours.perceiver.latents.detach().clone()
    assert not torch.allclose(after["fresh"], after["carry"])  # the carried moments changed the update


@pytest.mark.slow
def test_continue_under_zero_2_and_3_then_export_back_to_the_original(written, original, tiny_tokenizer_dir, tmp_path):
    """Original checkpoints of every family continue training under ZeRO-2 or ZeRO-3 on 2 ranks (one launch), with
    the original's optimizer state carried over or fresh; the export loads into the original model, which then
    computes our logits."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from of_ds.model.checkpoint_keys import _matrix_keys
    from of_ds.train.checkpoint import find_checkpoint
    from of_ds.train.export import export_checkpoint, load_checkpoint_into_model

    from .original_checkpoints import build_original

    runs = {"llama-zero2-carry": ("llama", 2, "carry"), "llama-zero3-fresh": ("llama", 3, "fresh"),
            "mpt-zero3-carry": ("mpt", 3, "carry"), "mpt-zero2-fresh": ("mpt", 2, "fresh"),
            "mosaic_gpt-zero3-carry": ("mosaic_gpt", 3, "carry"), "gpt_neox-zero2-carry": ("gpt_neox", 2, "carry"),
            "opt-zero3-fresh": ("opt", 3, "fresh"), "llama_tied-zero2-fresh": ("llama_tied", 2, "fresh")}
    assert {f for f, _, _ in runs.values()} == set(FAMILIES)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engines"))
    try:
        jobs = {name: _run_spec(tiny_tokenizer_dir, written(f)[2], tmp_path / "runs", name, {"kind": "deepspeed", "zero_stage": z}, c, written(f)[0])
                for name, (f, z, c) in runs.items()}
    finally:
        sys.path.pop(0)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    job = Path(__file__).with_name("zero3_job.py")
    cmd = [str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", "29523", str(job), "original", str(tmp_path / "jobs.json"), str(tmp_path / "facts.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    facts = json.loads((tmp_path / "facts.json").read_text())
    for name, (family, stage, carry) in runs.items():
        assert facts[name]["steps"] == 2 and facts[name]["partitioned"] == (stage == 3), name
        assert facts[name]["moments_equal"] == (carry == "carry"), name
        path, _, model_spec = written(family)
        run_dir = tmp_path / "runs" / name
        ours, _ = load_checkpoint_into_model(find_checkpoint(run_dir))
        ours.eval()
        file_sd = load_untrusted(path)["model_state_dict"]
        assert not torch.equal(ours.perceiver.latents.detach(), file_sd["module.perceiver.latents"]), name  # it trained
        exported = torch.load(export_checkpoint(run_dir, tmp_path / f"{name}.pt"), weights_only=True)
        fresh, tok = build_ours(model_spec)
        theirs = build_original(original, fresh, model_spec.lm.config)
        result = theirs.load_state_dict(exported, strict=False)
        trainable = {n for n, p in theirs.named_parameters() if p.requires_grad}
        assert result.unexpected_keys == [] and not (trainable & set(result.missing_keys)), name
        assert _matrix_keys(ours).embed in exported
        got, expected = logits_of(ours, tok), logits_of(theirs, tok, original=True)
        assert torch.allclose(got, expected, atol=1e-5), (name, (got - expected).abs().max())
