"""The README, tried as a new user would: every command in its ```bash blocks runs, verbatim, in a fresh copy of
the repository, and what it promises is on disk afterwards (checkpoints, metrics, the PNG, a caption).

`make test` itself is the command that runs this suite, so it is the one command not run from here.
"""

import concurrent.futures
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOT_RUN_HERE = {"make test"}  # it is what runs this test


def readme_commands() -> list[str]:
    """Every command line of every ```bash block, in order (continuation lines joined)."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"^\s*```bash\n(.*?)^\s*```", text, flags=re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def chains(commands: list[str]) -> list[list[str]]:
    """`commands` as chains that may run side by side: a command that names a file under runs/demo/ that an
    earlier one named (the export that writes it, then the generate that reads it) follows it in its chain."""
    out, owner = [], {}
    for command in commands:
        files = [a for a in shlex.split(command) if a.startswith("runs/demo/")]
        chain = next((owner[f] for f in files if f in owner), None)
        if chain is None:
            chain = []
            out.append(chain)
        chain.append(command)
        owner |= dict.fromkeys(files, chain)
    return out


def fresh_copy(dest: Path) -> Path:
    """The files a clone has (tracked and not ignored), nothing built: no runs, no demo data, no venv."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True, capture_output=True
    ).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    # The venv this test runs in is the one `make` would build; keep make from rebuilding it.
    for name in ("setup.cfg", "pyproject.toml"):
        os.utime(dest / name, (0, 0))
    return dest


def test_readme_commands_are_all_known():
    commands = readme_commands()
    assert commands[:2] == ["make demo", "make test"], "the README must open with its two commands"
    assert "tools/generate runs/demo --image demo_data/photos/chelsea.jpg" in commands
    # what the fresh-clone test runs side by side: the generate that reads an export runs after it
    export = "tools/export_checkpoint runs/demo runs/demo/export.safetensors"
    generate = "tools/generate runs/demo/export.safetensors --image demo_data/photos/chelsea.jpg"
    assert [export, generate] in chains(commands)
    assert all(len(chain) == 1 for chain in chains(commands) if export not in chain)


@pytest.mark.slow
def test_readme_commands_run_verbatim_in_a_fresh_clone(tmp_path, shared_demo_data, demo_data_digest):
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "deepspeed").exists():
        pytest.skip(f"{venv} is not the project venv (no deepspeed launcher)")
    (venv / ".installed").touch()
    work = fresh_copy(tmp_path / "of_ds")
    (work / ".venv").symlink_to(venv)  # what the first `make demo` would have built
    # A new user's shell: the venv is not on PATH, no test-only variables.
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not p.startswith(str(venv)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "VIRTUAL_ENV", "OMP_NUM_THREADS"))} | {"PATH": path}

    def run(command: str) -> tuple[str, float]:
        start = time.time()
        proc = subprocess.run(command, shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"README command failed ({proc.returncode}): {command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout, time.time() - start

    first, *rest = [c for c in dict.fromkeys(readme_commands()) if c not in NOT_RUN_HERE]
    assert first == "make demo"
    # Two workers (a process each, on two cores). The commands that touch nothing of the demo's (no "demo" in them:
    # the recipes' dry runs) run beside `make demo`, on the core its rank 1 leaves idle while rank 0 generates the
    # demo data. The others wait for the demo and then run as independent chains (see `chains`), each in order.
    outputs = {}

    def run_chain(chain: list[str]) -> None:
        for command in chain:
            outputs[command] = run(command)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        beside = [pool.submit(run_chain, [c]) for c in rest if "demo" not in c]
        outputs[first] = run(first)
        after = [pool.submit(run_chain, chain) for chain in chains([c for c in rest if "demo" in c])]
        for done in beside + after:
            done.result()
    outputs = {c: outputs[c] for c in [first, *rest]}  # the README's order, for the timings below
    print("\n".join(f"{took:6.1f} s  {command}" for command, (_, took) in outputs.items()))

    demo_out, demo_seconds = outputs["make demo"]
    if demo_seconds > 300:  # a note, not a failure: the time depends on what else the machine runs
        warnings.warn(f"the demo took {demo_seconds:.0f} s; the README promises a few minutes")
    run_dir = work / "runs" / "demo"
    assert "[of_ds] run dir:" in demo_out
    # the demo's ranks split the cores between them (a new user's shell sets no OMP_NUM_THREADS)
    cores = len(os.sched_getaffinity(0))
    threads = {json.loads(p.read_text())["torch_threads"] for p in (run_dir / "ranks").glob("rank*.json")}
    assert threads == {max(1, cores // 2)}, threads
    # the demo data `make demo` generated (in its rank 0) is the session's (two other processes at once), byte for byte
    assert demo_data_digest(work / "demo_data") == demo_data_digest(shared_demo_data.path)
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*") if (p / "COMPLETE").is_file())
    assert steps, "no complete checkpoint"
    every = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in every if "loss" in r]
    assert rows[-1]["step"] == int(steps[-1].split("-")[1])
    assert {"loss", "loss/laion", "loss/mmc4", "lr", "samples_per_s"} <= set(rows[-1])
    assert rows[-1]["loss"] < rows[0]["loss"], "the demo model did not learn"
    val = [r for r in every if "val/loss" in r]
    assert [r["step"] for r in val] == [100, 200, 300, 400]
    assert val[-1]["val/loss"] < val[0]["val/loss"], "the demo's validation loss did not fall"
    assert (run_dir / "samples" / "step-00000400.jsonl").is_file() and (run_dir / "samples.html").is_file()

    caption_out, _ = outputs["tools/generate runs/demo --image demo_data/photos/chelsea.jpg"]
    greedy = re.search(r"^greedy:\s*(.*)$", caption_out, flags=re.M)
    assert greedy and greedy.group(1).strip(), f"empty caption:\n{caption_out}"

    png = run_dir / "run.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "export.pt").is_file()
    report = json.loads((work / "shards" / "mmc4" / "convert_report.json").read_text())
    assert report["documents_written"] == report["documents_read"] > 0
