"""The loop, checkpoint manager and metrics in one process (torch engine, 1-rank gloo group, stand-in data)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engines_standin import TINY_MODEL, StandInData, tiny_spec_dict
from of_ds.spec import RunSpec
from of_ds.train.checkpoint import CheckpointError, CheckpointManager, TrainState, complete_checkpoints


def make(tiny_tokenizer_dir, runtime, out, name="a", engine_spec=None, **sections):
    from of_ds.engines import build_engine
    from of_ds.model import build_flamingo
    from of_ds.train.metrics import Metrics
    from of_ds.train.session import seed_everything

    d = tiny_spec_dict(tiny_tokenizer_dir, str(out), engine=engine_spec or {"kind": "ddp", "precision": "fp32"}, **sections)
    d["run"]["name"] = name
    spec = RunSpec.from_dict(d)
    seed_everything(spec.run.seed)
    model, _, tok = build_flamingo(spec.model)
    data = StandInData(spec, tok)
    engine = build_engine(model, spec, runtime, total_steps=4)
    ck = CheckpointManager(spec.run.run_dir, spec.checkpoint.keep_last, spec.checkpoint.every_n_steps, runtime)
    return spec, model, data, engine, ck, Metrics(spec, runtime, spec.run.run_dir, 4)


def rows(spec):
    return {r["step"]: r for r in map(json.loads, (spec.run.run_dir / "metrics.jsonl").read_text().splitlines())}


def test_exact_resume_and_checkpoint_files(tiny_tokenizer_dir, runtime, tmp_path):
    from of_ds.train.loop import train_loop

    spec, _, data, engine, ck, m = make(tiny_tokenizer_dir, runtime, tmp_path, "full", checkpoint={"every_n_steps": 1, "keep_last": 2})
    state = train_loop(engine, data, spec, runtime, ck, m, TrainState(), 4)
    assert state.step == 4 and state.step_in_epoch == 4
    assert [p.name for p in complete_checkpoints(ck.root)] == ["step-00000003", "step-00000004"]  # keep last 2
    assert (ck.root / "latest").read_text().strip() == "step-00000004"
    step3 = ck.root / "step-00000003"
    assert {"model.pt", "optim.pt", "scheduler.pt", "spec.yaml", "meta.json", "COMPLETE"} <= {p.name for p in step3.iterdir()}
    assert (step3 / "rank_state" / "rank00000.pt").is_file()
    full = rows(spec)
    assert set(full[4]) >= {"loss", "loss/laion", "loss/mmc4", "lr", "grad_norm", "samples_per_s", "tokens_per_s",
                            "step_time_s", "data_wait_s", "eta_s", "peak_mem_gib", "epoch", "skipped_steps"}

    # a second run picks up the step-3 checkpoint; a torn step-5 folder (no COMPLETE) is ignored
    spec2, model2, data2, engine2, ck2, m2 = make(tiny_tokenizer_dir, runtime, tmp_path, "resumed")
    shutil.copytree(step3, ck2.root / "step-00000003")
    (ck2.root / "step-00000005").mkdir()
    assert ck2.latest().name == "step-00000003"
    from of_ds.train.session import resume

    state2 = resume(engine2, data2, ck2, ck2.latest(), spec2, runtime)
    assert (state2.step, state2.step_in_epoch) == (3, 3)
    train_loop(engine2, data2, spec2, runtime, ck2, m2, state2, 4)
    got = rows(spec2)
    assert sorted(got) == [4]
    for k in ("loss", "loss/laion", "loss/mmc4", "grad_norm", "lr"):
        assert got[4][k] == full[4][k], k
    assert not (ck2.root / "step-00000005").exists()  # the torn folder went with the next save


def test_a_pretrained_lm_trains_with_its_dropout_and_resumes_exactly(tiny_tokenizer_dir, runtime, tmp_path):
    """`from_pretrained` gives an LM in eval mode; the engine puts the model in train mode, as the original's loop
    does, so the LM's dropout is on during training; a resumed run still repeats the uninterrupted one's losses
    (the checkpoint holds every rank's RNG)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from of_ds.train.loop import train_loop
    from of_ds.train.session import resume

    config = AutoConfig.for_model(**TINY_MODEL["lm"]["config"], attention_dropout=0.5)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "lm")
    lm = {"name_or_path": str(tmp_path / "lm"), "config": None}
    every = {"every_n_steps": 1, "keep_last": 4}
    spec, model, data, engine, ck, m = make(tiny_tokenizer_dir, runtime, tmp_path, "full", model={"lm": lm}, checkpoint=every)
    assert model.training and model.lang_encoder.training and not model.vision_encoder.training
    data.set_epoch(0)
    batch = next(iter(data))["mmc4"]
    with torch.no_grad():
        twice = [float(model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                             num_images=batch["num_images"]).loss) for _ in range(2)]
    assert twice[0] != twice[1]  # dropout is on
    train_loop(engine, data, spec, runtime, ck, m, TrainState(), 4)
    full = rows(spec)

    spec2, _, data2, engine2, ck2, m2 = make(tiny_tokenizer_dir, runtime, tmp_path, "resumed", model={"lm": lm})
    shutil.copytree(ck.root / "step-00000002", ck2.root / "step-00000002")
    state = resume(engine2, data2, ck2, ck2.latest(), spec2, runtime)
    train_loop(engine2, data2, spec2, runtime, ck2, m2, state, 4)
    got = rows(spec2)
    for step in (3, 4):
        assert got[step]["loss"] == full[step]["loss"] and got[step]["grad_norm"] == full[step]["grad_norm"], step


def test_an_epoch_not_a_multiple_of_the_accumulation_says_what_is_left_out(tiny_tokenizer_dir, runtime, tmp_path, capsys):
    from of_ds.train.loop import train_loop

    spec, _, data, engine, ck, m = make(tiny_tokenizer_dir, runtime, tmp_path, optim={"grad_accum_steps": 4})
    state = train_loop(engine, data, spec, runtime, ck, m, TrainState(), 2)  # 6 micro-steps an epoch: 1 step, 2 left
    assert (state.epoch, state.step_in_epoch) == (1, 1)
    assert "the last 2 micro-batch(es) of each epoch are not trained" in capsys.readouterr().out


def test_world_size_change_is_a_clear_error(tiny_tokenizer_dir, runtime, tmp_path):
    spec, _, data, engine, ck, m = make(tiny_tokenizer_dir, runtime, tmp_path)
    path = ck.save(engine, TrainState(step=1, step_in_epoch=1), spec, {"data": data.state_dict()})
    meta = json.loads((path / "meta.json").read_text())
    meta.update(world_size=8, engine="deepspeed", zero_stage=2)
    (path / "meta.json").write_text(json.dumps(meta))
    engine.can_reshape = False  # as a ZeRO-1/2/3 engine
    with pytest.raises(CheckpointError, match="written by 8 ranks but this run has 1"):
        ck.load(engine, path)
    (path / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ck.load(engine, path)


def test_non_finite_loss_skips_the_update(tiny_tokenizer_dir, runtime, tmp_path):
    from of_ds.train.loop import optimizer_step

    spec, model, data, engine, ck, m = make(tiny_tokenizer_dir, runtime, tmp_path)
    data.set_epoch(0)
    batch = next(iter(data))
    batch["mmc4"]["pixel_values"][0] = float("nan")
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    for g in engine.optimizer.param_groups:  # past the warmup's lr=0 so that an applied update would show
        g["lr"] = 1e-2
    stats = optimizer_step(engine, iter([batch]), {"laion": 0.2, "mmc4": 1.0}, runtime, m)
    assert stats.skipped
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, before[k]), k
    stats = optimizer_step(engine, iter(data), {"laion": 0.2, "mmc4": 1.0}, runtime, m)
    assert not stats.skipped and any(not torch.equal(v, before[k]) for k, v in model.trainable_state_dict().items())


@pytest.mark.parametrize("engine", [{"kind": "ddp", "precision": "fp32"}, {"kind": "deepspeed", "precision": "bf16", "zero_stage": 2}])
def test_resume_from_an_unfused_checkpoint_keeps_the_fused_kernel(tiny_tokenizer_dir, runtime, tmp_path, engine):
    """A checkpoint's optimizer groups carry the saving run's `fused` flag (False here; None from CPU runs before
    fused AdamW was used there). Loading it must not switch this run's kernel off: the on-device skip needs it."""
    from of_ds.train.loop import optimizer_step, train_loop

    spec, _, data, eng, ck, m = make(tiny_tokenizer_dir, runtime, tmp_path, "unfused", engine, optim={"fused": False})
    train_loop(eng, data, spec, runtime, ck, m, TrainState(), 2)
    saved = ck.root / "step-00000002"
    spec, model, data, eng, ck, m = make(tiny_tokenizer_dir, runtime, tmp_path, "fused", engine)
    ck.load(eng, saved)
    inner = getattr(eng, "inner_optimizer", None) or eng.optimizer
    assert all(g["fused"] for g in inner.param_groups)
    data.set_epoch(0)
    batches = iter(data)
    assert not optimizer_step(eng, batches, {"laion": 0.2, "mmc4": 1.0}, runtime, m).skipped
    batch = next(batches)
    batch["mmc4"]["pixel_values"][0] = float("nan")
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    assert optimizer_step(eng, iter([batch]), {"laion": 0.2, "mmc4": 1.0}, runtime, m).skipped
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, before[k]), k


def test_activation_checkpointing_same_loss_and_grads(tiny_tokenizer_dir, runtime, tmp_path):
    from of_ds.engines.base import weighted_losses

    spec, model, data, engine, ck, m = make(tiny_tokenizer_dir, runtime, tmp_path)
    data.set_epoch(0)
    batch = next(iter(data))
    out = []
    for enabled in (False, True):
        model.set_activation_checkpointing(enabled)
        model.zero_grad()
        loss = weighted_losses(model, batch, {"laion": 0.2, "mmc4": 1.0}, torch.device("cpu"))["loss"]
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert out[0][0] == out[1][0]
    assert out[0][1].keys() == out[1][1].keys()
    for n in out[0][1]:
        torch.testing.assert_close(out[0][1][n], out[1][1][n], rtol=1e-6, atol=1e-7, msg=n)


def test_plot_run_reads_the_metrics(tiny_tokenizer_dir, runtime, tmp_path):
    from of_ds.train.loop import train_loop
    from of_ds.train.plot import plot_run

    spec, _, data, engine, ck, m = make(tiny_tokenizer_dir, runtime, tmp_path, logging={"every_n_steps": 2, "progress_bar": False})
    train_loop(engine, data, spec, runtime, ck, m, TrainState(), 4)
    assert sorted(rows(spec)) == [2, 4]
    assert plot_run(spec.run.run_dir).is_file()


def test_wandb_offline_gets_the_same_rows(tiny_tokenizer_dir, runtime, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from of_ds.train.loop import train_loop

    monkeypatch.setenv("WANDB_SILENT", "true")
    spec, _, data, engine, ck, m = make(tiny_tokenizer_dir, runtime, tmp_path, "wb",
                                        logging={"every_n_steps": 2, "progress_bar": False, "wandb": {"mode": "offline", "project": "t"}})
    train_loop(engine, data, spec, runtime, ck, m, TrainState(), 4)
    history = dict(m.wandb.summary)
    m.close()
    assert history["loss"] in {r["loss"] for r in rows(spec).values()}
    assert {"loss/mmc4", "loss/laion", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "eta_s"} <= set(history)
    assert list((spec.run.run_dir / "wandb").glob("offline-run-*"))


def test_keep_best_keeps_the_lowest_validation_loss_besides_the_last(tiny_tokenizer_dir, runtime, tmp_path):
    """checkpoint.keep_best: the step with the lowest validation loss (meta.json's val_loss, given to the loop by
    the validation hook) stays besides the newest keep_last, and checkpoints/best names it; a later better one
    replaces it."""
    from of_ds.train.loop import train_loop

    spec, _, data, engine, ck, m = make(tiny_tokenizer_dir, runtime, tmp_path, "best", checkpoint={"every_n_steps": 1, "keep_last": 1})
    ck.keep_best = True
    val = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5}
    train_loop(engine, data, spec, runtime, ck, m, TrainState(), 4, validation=lambda engine, step: val[step])
    assert [p.name for p in complete_checkpoints(ck.root)] == ["step-00000002", "step-00000004"]
    assert (ck.root / "best").read_text().strip() == "step-00000002"
    assert json.loads((ck.root / "step-00000002" / "meta.json").read_text())["val_loss"] == 1.0
    assert ck.latest().name == "step-00000004"  # resume still takes the newest
    assert CheckpointManager.best(complete_checkpoints(ck.root)).name == "step-00000002"


def test_samples_go_to_a_file_and_a_wandb_table(tmp_path, monkeypatch):
    """SampleSet.write: RUN_DIR/samples/step-N.jsonl, each prompt's images once under samples/images/, and with
    wandb on a `samples` table (wandb offline here)."""
    wandb = pytest.importorskip("wandb")
    import io

    from PIL import Image

    from of_ds.train.samples import Prompt, SampleSet

    def png(color) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), color).save(buf, format="PNG")
        return buf.getvalue()

    monkeypatch.setenv("WANDB_SILENT", "true")
    prompts = [Prompt("caption", "k0", "<image>", "a red square", [png((200, 0, 0))]),
               Prompt("interleaved", "d0", "<image>one.<image>", "two.", [png((0, 200, 0)), png((0, 0, 200))])]
    samples = SampleSet.__new__(SampleSet)
    samples.prompts, samples.run_dir = prompts, tmp_path
    records = [{"step": 5, "kind": p.kind, "key": p.key, "images": SampleSet._image_names(i, p), "prompt": p.text,
                "reference": p.reference, "output": f"out {i}"} for i, p in enumerate(prompts)]
    run = wandb.init(project="t", mode="offline", dir=str(tmp_path))
    try:
        path = samples.write(records, 5, run)
    finally:
        run.finish()
    (table,) = (tmp_path / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json")
    table = json.loads(table.read_text())
    assert table["columns"] == ["kind", "image", "prompt", "reference", "output"]
    assert [row[-1] for row in table["data"]] == ["out 0", "out 1"]
    assert path == tmp_path / "samples" / "step-00000005.jsonl"
    assert [json.loads(line)["output"] for line in path.read_text().splitlines()] == ["out 0", "out 1"]
    assert sorted(p.name for p in (tmp_path / "samples" / "images").iterdir()) == ["0-0.jpg", "1-0.jpg", "1-1.jpg"]
