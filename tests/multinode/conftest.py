"""A two-"node" cluster on one machine: an sshd of our own on 127.0.0.1 and 127.0.0.2, reached through pdsh.

The fixture installs nothing (CI installs `openssh-server` and `pdsh`, see `.ci/run`). Without them the tests skip,
except under `CI=true`, where a missing tool is a failure. Everything it adds (`~/.ssh/config` entries, the sshd) is
undone at teardown; traffic stays on loopback.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOSTS = ("127.0.0.1", "127.0.0.2")
_MARK = "# of_ds tests/multinode (temporary; restored at teardown)"


@dataclass(frozen=True)
class LoopbackCluster:
    """Where the test sshd listens and how to launch onto it."""

    port: int
    hosts: tuple[str, ...]
    workdir: Path  # holds the .deepspeed_env; run the `deepspeed` launcher from here

    def hostfile(self, slots: int = 1) -> Path:
        """Written whole or not at all: a launch running beside may be reading it."""
        path = self.workdir / "hostfile"
        tmp = path.with_name(f".hostfile.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text("".join(f"{h} slots={slots}\n" for h in self.hosts))
        os.replace(tmp, path)
        return path

    def env(self) -> dict[str, str]:
        """The launcher's environment: venv first on PATH, the CPU accelerator, small thread counts."""
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        return env


def _require(ok: bool, why: str) -> None:
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"multinode tests need {why}; CI must provide it (see .ci/run)", pytrace=False)
    pytest.skip(f"multinode tests need {why}")


def free_port() -> int:
    """A port free on loopback now (for a rendezvous or a server about to bind it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    pending = set(HOSTS)
    while pending and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log.read_text()[-2000:]}")
        for host in sorted(pending):
            try:
                with socket.create_connection((host, port), timeout=1.0):
                    pending.discard(host)
            except OSError:
                pass
        time.sleep(0.1)
    if pending:
        raise RuntimeError(f"sshd not listening on {sorted(pending)}:{port} after {timeout_s}s: {log.read_text()[-2000:]}")


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)


def _ssh_config_block(port: int, key: Path, known_hosts: Path) -> str:
    return "\n".join(
        [
            _MARK,
            f"Host {' '.join(HOSTS)}",
            f"    Port {port}",
            f"    IdentityFile {key}",
            "    IdentitiesOnly yes",
            "    StrictHostKeyChecking no",
            f"    UserKnownHostsFile {known_hosts}",
            "    LogLevel ERROR",
            "",
            "",
        ]
    )


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory, link_demo_data) -> Path:
    """The session's demo dataset, for every run of these tests (generating it inside a launch, on rank 0 while the
    others wait, is what the README's `make demo` test runs)."""
    return link_demo_data(tmp_path_factory.mktemp("demo") / "demo_data")


@pytest.fixture(scope="session")
def slurm_run(demo_data_dir, tmp_path_factory):
    """launch/slurm_train.sh's 2-step run of the demo spec over two stand-in nodes (test_slurm.py checks it), which
    the two-node test in test_train.py then resumes over pdsh instead of training its first 2 steps anew."""
    from .launch import run_slurm

    return run_slurm(demo_data_dir, tmp_path_factory.mktemp("slurm"))


@pytest.fixture(scope="session")
def loopback_cluster(tmp_path_factory) -> LoopbackCluster:
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    _require(sshd is not None, "sshd (Debian package openssh-server)")
    _require(shutil.which("pdsh") is not None, "pdsh (Debian package pdsh)")
    _require(shutil.which("ssh") is not None and shutil.which("ssh-keygen") is not None, "ssh and ssh-keygen")
    _require(os.geteuid() == 0, "root (sshd must switch to the logged-in user)")

    base = tmp_path_factory.mktemp("sshd")
    host_key, client_key = base / "host_key", base / "client_key"
    _keygen(host_key)
    _keygen(client_key)
    (base / "authorized_keys").write_text((base / "client_key.pub").read_text())
    port = free_port()
    log = base / "sshd.log"
    config = base / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                *[f"ListenAddress {h}" for h in HOSTS],
                f"HostKey {host_key}",
                f"AuthorizedKeysFile {base / 'authorized_keys'}",
                f"PidFile {base / 'sshd.pid'}",
                "UsePAM no",
                "StrictModes no",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "",
            ]
        )
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir

    ssh_dir = Path.home() / ".ssh"
    ssh_config = ssh_dir / "config"
    created_dir = not ssh_dir.exists()
    original = ssh_config.read_text() if ssh_config.exists() else None
    ssh_dir.mkdir(mode=0o700, exist_ok=True)

    proc = subprocess.Popen([sshd, "-D", "-f", str(config), "-E", str(log)], stdin=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc, log)
        # our Host block first: ssh takes the first value it finds for each option
        ssh_config.write_text(_ssh_config_block(port, client_key, base / "known_hosts") + (original or ""))
        ssh_config.chmod(0o600)
        for host in HOSTS:
            out = subprocess.run(
                ["ssh", "-o", "BatchMode=yes", host, "echo", "ok"], capture_output=True, text=True, timeout=30
            )
            if out.stdout.strip() != "ok":
                raise RuntimeError(f"ssh to {host}:{port} failed: {out.stderr}\nsshd log: {log.read_text()[-2000:]}")
        workdir = tmp_path_factory.mktemp("launch")
        venv_bin = Path(sys.executable).parent
        # the launcher exports each KEY=VALUE line to every node; no comments or blank lines allowed there
        (workdir / ".deepspeed_env").write_text(
            f"DS_ACCELERATOR=cpu\nPATH={venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}\n"
            "OMP_NUM_THREADS=1\nGLOO_SOCKET_IFNAME=lo\n"
        )
        yield LoopbackCluster(port=port, hosts=HOSTS, workdir=workdir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if original is not None:
            ssh_config.write_text(original)
        elif ssh_config.exists():
            ssh_config.unlink()
        if created_dir:
            shutil.rmtree(ssh_dir, ignore_errors=True)
