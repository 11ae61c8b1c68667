"""The loop, checkpoint manager and metrics in one process (torch engine, 1-rank gloo group, stand-in data)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from engines_standin import TINY_MODEL, StandInData, tiny_spec_dict
from of_ds.spec import RunSpec
from of_ds.train.checkpoint import CheckpointError, CheckpointManager, TrainState, complete_checkpoints


def make(tiny_tokenizer_dir, runtime, out, name="a", engine_spec=None, **sections):
    from of_ds.train.plan import resolve_plan
    from of_ds.train.trainer import build_trainer

    d = tiny_spec_dict(tiny_tokenizer_dir, str(out), engine=engine_spec or {"kind": "ddp", "precision": "fp32"}, **sections)
    d["run"]["name"] = name
    spec = RunSpec.from_dict(d)
    t = build_trainer(resolve_plan(spec, runtime.world_size, data=False, run_dir=False).with_steps(4), runtime,
                      loader=lambda tok: StandInData(spec, tok))
    return spec, t.model, t.data, t.engine, t.checkpoints, t.metrics


def resume(engine, data, checkpoints, path, spec, runtime):
    """A full resume from step folder `path` (what build_trainer does for a plan that resumes it)."""
    from of_ds.train.plan import ResumePoint
    from of_ds.train.restore import restore

    return restore(engine, data, checkpoints, ResumePoint("full", path), spec, runtime)


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


def test_wandb_offline_and_tensorboard_get_the_same_rows(tiny_tokenizer_dir, runtime, tmp_path, monkeypatch):
    """Every row reaches metrics.jsonl, wandb and TensorBoard, `Metrics.log`'s rows of other names too (a held-out
    loss); a second start in the run dir continues the wandb run of RUN_DIR/wandb_id."""
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from of_ds.train.loop import train_loop
    from of_ds.train.metrics import Metrics

    monkeypatch.setenv("WANDB_SILENT", "true")
    logging = {"every_n_steps": 2, "progress_bar": False, "wandb": {"mode": "offline", "project": "t"}, "tensorboard": True}
    spec, _, data, engine, ck, m = make(tiny_tokenizer_dir, runtime, tmp_path, "wb", logging=logging)
    train_loop(engine, data, spec, runtime, ck, m, TrainState(), 4)
    m.log({"step": 4, "val/laion/loss": 1.25})
    history = dict(m.loggers.wandb.run.summary)
    m.close()
    logged = [json.loads(line) for line in (spec.run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == {"step": 4, "val/laion/loss": 1.25} and [r["step"] for r in logged] == [2, 4, 4]
    assert history["loss"] in {r["loss"] for r in logged[:2]}  # wandb commits a step once a later one comes
    assert {"loss/mmc4", "loss/laion", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "eta_s", "tokens_seen/mmc4"} <= set(history)
    events = EventAccumulator(str(spec.run.run_dir / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/laion/loss")] == [(4, 1.25)]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(2, pytest.approx(logged[0]["loss"])), (4, pytest.approx(logged[1]["loss"]))]

    Metrics(spec, runtime, spec.run.run_dir, 4).close()  # a second start
    run_id = (spec.run.run_dir / "wandb_id").read_text().strip()
    starts = list((spec.run.run_dir / "wandb").glob("offline-run-*"))
    assert len(starts) == 2 and all(p.name.endswith("-" + run_id) for p in starts)


def test_sigterm_stops_at_a_checkpoint_of_that_step(tiny_tokenizer_dir, runtime, tmp_path, capsys):
    """A real SIGTERM to this process during step 1: the flag rides on step 2's all-reduce, the loop logs and
    checkpoints step 2 (neither a log nor a checkpoint step) and returns; the handlers are restored after."""
    import os
    import signal

    from of_ds.train.loop import train_loop
    from of_ds.train.stop import stop_on_signals

    spec, _, data, engine, ck, m = make(tiny_tokenizer_dir, runtime, tmp_path, logging={"every_n_steps": 100, "progress_bar": False},
                                        checkpoint={"every_n_steps": 100})
    observe, sent = m.observe, []

    def observe_then_signal(*args):
        observe(*args)
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))

    m.observe = observe_then_signal
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        state = train_loop(engine, data, spec, runtime, ck, m, TrainState(), 4, stop)
    assert signal.getsignal(signal.SIGTERM) is before
    assert (state.step, stop.signal, stop.agreed) == (2, "SIGTERM", True)
    assert [p.name for p in complete_checkpoints(ck.root)] == ["step-00000002"]
    assert sorted(rows(spec)) == [2] and rows(spec)[2]["samples_seen/laion"] == state.samples_seen_by_dataset["laion"] > 0
    assert "SIGTERM received: stopped at step 2, checkpoint saved" in capsys.readouterr().err


def test_repeated_sigterms_wait_for_the_step_and_a_second_ctrl_c_does_not():
    import os
    import signal

    from of_ds.train.stop import stop_on_signals

    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == "SIGTERM"
    with pytest.raises(KeyboardInterrupt), stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # the handler runs between bytecodes
            time.sleep(0.01)


def test_the_summary_counts_a_relogged_step_once(tmp_path):
    """After a resume the steps after its checkpoint are logged again: the later rows count, steps past the
    train state's are left out."""
    from of_ds.train.summary import logged_losses

    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.0},  # a crash after step 3
             {"step": 3, "loss": 2.5}, {"step": 4, "loss": 2.25}, {"step": 5, "loss": 9.0},  # resumed at 2
             {"step": 4, "val/laion/loss": 0.5},  # a row of another name: not a loss key
             {"step": 2, "val/loss": 1.5, "val/loss/laion": 1.5, "val/ppl/laion": 4.5},  # validation rows
             {"step": 4, "val/loss": 1.75, "val/loss/laion": 1.75}, {"step": 4, "val/loss": 1.25, "val/loss/laion": 1.25}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert logged_losses(tmp_path / "metrics.jsonl", 4) == {
        "loss": {"final": 2.25, "final_step": 4, "best": 2.0, "best_step": 2},
        "val/loss": {"final": 1.25, "final_step": 4, "best": 1.25, "best_step": 4},
        "val/loss/laion": {"final": 1.25, "final_step": 4, "best": 1.25, "best_step": 4},
    }


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


def test_samples_go_to_a_file_a_wandb_table_and_tensorboard(tmp_path, monkeypatch):
    """SampleSet.write: RUN_DIR/samples/step-N.jsonl, each prompt's images once under samples/images/, and with
    wandb on a `samples` table (wandb offline here), with TensorBoard on each prompt's image and a text table."""
    pytest.importorskip("wandb")
    import io

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from of_ds.train.loggers import Loggers

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
    spec = RunSpec.from_yaml(Path(__file__).resolve().parents[2] / "launch" / "specs" / "demo.yaml", [f"run.output_dir={tmp_path}", "logging.wandb.mode=offline", "logging.wandb.project=t",
                                         "logging.tensorboard=true"])
    loggers = Loggers(spec, tmp_path, 10, is_main=True)
    try:
        path = samples.write(records, 5, loggers)
    finally:
        loggers.close()
    (table,) = (tmp_path / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json")
    table = json.loads(table.read_text())
    assert table["columns"] == ["kind", "image", "prompt", "reference", "output"]
    assert [row[-1] for row in table["data"]] == ["out 0", "out 1"]
    assert path == tmp_path / "samples" / "step-00000005.jsonl"
    assert [json.loads(line)["output"] for line in path.read_text().splitlines()] == ["out 0", "out 1"]
    assert sorted(p.name for p in (tmp_path / "samples" / "images").iterdir()) == ["0-0.jpg", "1-0.jpg", "1-1.jpg"]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples/0")] == [5] and [e.step for e in events.Images("samples/1")] == [5]
    (text,) = events.Tensors("samples/text_summary")
    assert text.step == 5 and b"out 1" in text.tensor_proto.string_val[0] and b"a red square" in text.tensor_proto.string_val[0]
