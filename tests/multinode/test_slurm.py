"""launch/slurm_train.sh on one machine: stand-in `srun`/`scontrol` start one task per "node", and each task runs
the real `deepspeed --no_ssh --node_rank` path of the script into the real trainer (the `slurm_run` fixture; the
two-node test in test_train.py resumes that run over pdsh)."""

import pytest

pytestmark = pytest.mark.slow


def test_slurm_script_runs_one_launcher_per_node(slurm_run):
    assert slurm_run.rc == 0, slurm_run.output[-5000:]
    assert slurm_run.hostfile == "127.0.0.1 slots=1\n127.0.0.2 slots=1\n"
    assert slurm_run.node_addresses == {0: "127.0.0.1", 1: "127.0.0.2"}
    assert slurm_run.step2_complete
    print(f"slurm script run: {slurm_run.seconds:.0f}s")
