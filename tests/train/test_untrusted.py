"""Checkpoint files from elsewhere are read as tensors and plain containers only: a file whose unpickling would run
code is refused, naming the file and the opt-in, before anything of it runs."""

import json
from pathlib import Path

import pytest
import torch

from of_ds.train.untrusted import UnsafeCheckpointError, check_checkpoint_dir, load_untrusted


class RunsCode:
    """Unpickling this calls Path.touch on `marker`: any code could stand there."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, marker: Path) -> Path:
    torch.save({"model_state_dict": {"perceiver.latents": torch.zeros(2)}, "payload": RunsCode(marker)}, path)
    return path


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = plant(tmp_path / "checkpoint.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"checkpoint\.pt.*checkpoint\.allow_pickle: true") as e:
        load_untrusted(path)
    assert "Unsupported global: GLOBAL getattr" in str(e.value)  # what the file asked for
    assert not marker.exists()
    load_untrusted(path, allow_pickle=True)  # the opt-in unpickles fully: the planted code runs
    assert marker.exists()


def test_plain_checkpoints_load(tmp_path):
    sd = {"a": torch.ones(3), "nested": {"step": 4, "betas": (0.9, 0.999), "names": ["x"]}, "none": None}
    torch.save(sd, tmp_path / "ok.pt")
    got = load_untrusted(tmp_path / "ok.pt")
    assert torch.equal(got["a"], sd["a"]) and got["nested"] == sd["nested"] and got["none"] is None


REPO = Path(__file__).resolve().parents[2]


def test_every_entry_point_refuses_a_planted_file(tmp_path):
    from of_ds.generate_cli import load_weights
    from of_ds.spec import RunSpec
    from of_ds.train.export import read_trainable_weights
    from of_ds.train.plan import find_resume_point
    from of_ds.train.restore import load_original_checkpoint

    marker = tmp_path / "ran"
    pt = plant(tmp_path / "checkpoint.pt", marker)
    # checkpoint.resume_from=<checkpoint.pt>: refused before the model sees it
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle"):
        load_original_checkpoint(torch.nn.Module(), pt)
    # another run's step folder (resume_from, tools/export_checkpoint): every .pt in it is checked
    step = tmp_path / "run" / "checkpoints" / "step-00000002"
    (step / "rank_state").mkdir(parents=True)
    torch.save({"module": {}}, step / "mp_rank_00_model_states.pt")
    plant(step / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    (step / "meta.json").write_text(json.dumps({"engine": "deepspeed", "zero_stage": 2, "world_size": 1}))
    (step / "COMPLETE").write_text("")
    with pytest.raises(UnsafeCheckpointError, match="zero_pp_rank_0"):
        check_checkpoint_dir(step)
    spec = RunSpec.from_yaml(REPO / "launch/specs/demo.yaml", [f"checkpoint.resume_from={step}", f"run.output_dir={tmp_path}"])
    with pytest.raises(UnsafeCheckpointError, match="zero_pp_rank_0"):
        find_resume_point(spec)  # a full resume: before the engine unpickles the folder
    with pytest.raises(UnsafeCheckpointError, match="--allow-pickle"):
        read_trainable_weights(step)  # tools/export_checkpoint, a weights-only start
    with pytest.raises(UnsafeCheckpointError, match="--allow-pickle"):
        load_weights(torch.nn.Module(), pt)  # tools/generate on a .pt
    assert not marker.exists()
