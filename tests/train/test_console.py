"""RUN_DIR/train.log: rank 0's console, the other ranks' stderr prefixed by their rank, an error's traceback."""

from __future__ import annotations

import sys

import pytest
import torch

from of_ds.runtime import Runtime
from of_ds.train.console import console_log


def runtime(rank: int) -> Runtime:
    return Runtime(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"), backend="gloo")


def test_rank_0_copies_its_console_and_another_rank_its_warnings(tmp_path, capsys):
    with console_log(tmp_path, runtime(0)) as open_file:
        print("step 1/4 | loss 5.0")
        assert not (tmp_path / "train.log").exists()  # held until the run dir is settled
        assert open_file() == tmp_path / "train.log"
        print("a warning", file=sys.stderr)
    with console_log(tmp_path, runtime(1)) as open_file:
        open_file()
        print("rank 1's own step line")
        print("a warning\nin two lines", file=sys.stderr, end="")
        print(", ended", file=sys.stderr)
        kept = sys.stderr  # as a logging handler made during the run would keep it
    kept.write("after the run\n")  # the console only, no error
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert lines[0].startswith("[of_ds] ") and lines[0].endswith(": a start on 2 rank(s)")
    assert lines[1:] == ["step 1/4 | loss 5.0", "a warning", "[rank 1] a warning", "[rank 1] in two lines, ended"]
    out = capsys.readouterr()
    assert "rank 1's own step line" in out.out and "after the run" in out.err  # the console still gets everything


def test_an_error_leaves_its_traceback(tmp_path):
    with pytest.raises(ValueError), console_log(tmp_path, runtime(1)) as open_file:
        open_file()
        raise ValueError("data.datasets[0].shards: no such file")
    log = (tmp_path / "train.log").read_text()
    assert "[rank 1] Traceback (most recent call last):" in log
    assert "[rank 1] ValueError: data.datasets[0].shards: no such file" in log


def test_a_start_that_never_settles_its_run_dir_writes_nothing_there(tmp_path):
    """A start refused before the run dir is settled (a refused resume) leaves it as it was."""
    with pytest.raises(ValueError), console_log(tmp_path / "run", runtime(0)):
        print("model.perceiver.depth: 2 -> 1 (refused)")
        raise ValueError("refused")
    assert not (tmp_path / "run").exists()
