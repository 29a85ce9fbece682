"""A throwaway SLURM cluster on this machine, for the end-to-end tests of slurm/*.sbatch.

`start_cluster(root)` runs munged, slurmctld and two slurmd ("node1" and "node2", both on 127.0.0.1, so a job
with `--nodes=2` really starts one task per "node") with every config, key, socket, state and log file under
`root`; `cluster.stop()` cancels the jobs and stops the daemons. Nothing outside `root` is read or written,
so it can run beside a real installation, and ports are picked free at start.

Settings that differ from a production slurm.conf, and why:
    ProctrackType=proctrack/linuxproc   no cgroup delegation in containers; it still tracks every descendant
                                        (torchrun's workers run in their own sessions), which is what
                                        signal delivery and step cleanup need
    cred_expire=10                      a requeued job waits cred_expire + 1 s before it may start again
                                        (default 120 s)
    KillWait=60                         the grace between SIGTERM and SIGKILL: time to write a checkpoint
    SlurmdParameters=config_overrides   each slurmd claims the CPUs written here, not the machine's count
Requires root (slurmd starts job steps as the submitting user) and the Debian packages slurm-wlm and munge.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
NODES = ("node1", "node2")
T = TypeVar("T")
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here (to skip with), or None."""
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None]
    if missing:
        return (
            f"SLURM/munge binaries not found ({', '.join(missing)}); "
            "install with `apt-get install slurm-wlm munge` (.ci/run does)"
        )
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd launches job steps as the submitting user)"
    return None


class SlurmError(RuntimeError):
    """A SLURM command failed or a job did not reach the expected state in time."""


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    munge_socket: Path
    daemons: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The environment for SLURM client commands (and so for the jobs they submit)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *command: str, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> str:
        result = subprocess.run(
            command, env=dict(env or self.env), cwd=cwd, capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0:
            raise SlurmError(f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()}")
        return result.stdout

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` as dicts (JobState, Restarts, StartTime, ...): one per task of an array."""
        records = []
        for line in self.run("scontrol", "show", "job", "--oneliner", job_id).splitlines():
            pairs = (item.partition("=") for item in line.split())
            records.append({key: value for key, sep, value in pairs if sep})
        return records

    def job(self, job_id: str) -> dict[str, str]:
        return self.jobs(job_id)[0]

    def state(self, job_id: str) -> str:
        return self.job(job_id)["JobState"]

    def array_states(self, job_id: str) -> list[str]:
        return [record["JobState"] for record in self.jobs(job_id)]

    def wait_finished(self, job_id: str, timeout: float) -> dict[str, str]:
        """Wait until every task of the job (or array) has finished; return the job's fields."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.array_states(job_id)
            if states and all(state in FINISHED_STATES for state in states):
                return self.job(job_id)
            time.sleep(1)
        raise SlurmError(f"job {job_id} not finished after {timeout:.0f} s: {self.array_states(job_id)}")

    def wait_for(self, what: str, condition: Callable[[], T], timeout: float, poll: float = 1.0) -> T:
        """Poll `condition()` until it returns something truthy; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(poll)
        raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}")

    def stop(self) -> None:
        """Cancel every job and wait for it to end, then stop the daemons (SIGTERM, SIGKILL after 10 s)."""
        try:
            self.run("scancel", "--quiet", "--user", "root")
            self.wait_for("cancelled jobs to end", lambda: not self.run("squeue", "--noheader").strip(), 90)
        except (SlurmError, subprocess.TimeoutExpired):
            pass  # the controller is already gone, or a job ignored SIGKILL: stop the daemons regardless
        for process in reversed(self.daemons):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.daemons):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.daemons.clear()


def start_cluster(root: Path, cpus_per_node: int = 4, timeout: float = 30.0) -> SlurmCluster:
    """Start munged, slurmctld and a slurmd per node in NODES, all under `root`; wait until nodes are idle."""
    reason = unavailable_reason()
    if reason:
        raise SlurmError(reason)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)  # munged refuses a key or socket in a folder others can write to
    for folder in ("state", "spool"):
        (root / folder).mkdir(exist_ok=True)
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o700, exist_ok=True)
    key = munge_dir / "munge.key"
    if not key.exists():
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
    cluster = SlurmCluster(root=root, conf=root / "slurm.conf", munge_socket=munge_dir / "munge.sock")
    try:
        munged = [
            "munged",
            "--foreground",
            "--force",
            f"--key-file={key}",
            f"--socket={cluster.munge_socket}",
        ]
        munged += [f"--{name}-file={munge_dir / f'munged.{name}'}" for name in ("pid", "log", "seed")]
        cluster.daemons.append(_spawn(root, "munged", munged))
        _wait_for_path(cluster.munge_socket, timeout)
        cluster.conf.write_text(
            slurm_conf(root, cluster.munge_socket, _free_ports(2 + len(NODES)), cpus_per_node)
        )
        conf = str(cluster.conf)
        cluster.daemons.append(_spawn(root, "slurmctld", ["slurmctld", "-D", "-f", conf], cluster.env))
        for node in NODES:
            cluster.daemons.append(
                _spawn(root, f"slurmd-{node}", ["slurmd", "-D", "-f", conf, "-N", node], cluster.env)
            )
        cluster.wait_for("idle nodes", lambda: _all_idle(cluster), timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def slurm_conf(root: Path, munge_socket: Path, ports: Sequence[int], cpus_per_node: int) -> str:
    controller_port, slurmd_port, *node_ports = ports
    lines = [
        "ClusterName=semi-llie-test",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={controller_port}",
        f"SlurmdPort={slurmd_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket},cred_expire=10",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool' / '%n'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd-%n.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SchedulerType=sched/builtin",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SlurmdParameters=config_overrides",
        "MpiDefault=none",
        "ReturnToService=2",
        "JobRequeue=1",
        "KillWait=60",
        "MinJobAge=600",
        "SchedulerParameters=sched_interval=2",
    ]
    for node, port in zip(NODES, node_ports, strict=True):
        lines.append(
            f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={cpus_per_node} RealMemory=4000 State=UNKNOWN"
        )
    lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def _spawn(
    root: Path, name: str, command: list[str], env: Mapping[str, str] | None = None
) -> subprocess.Popen:
    # Foreground daemons are children of the test, so teardown can stop exactly the processes it started.
    log = open(root / f"{name}.stderr", "wb")  # stays open for the daemon's lifetime
    return subprocess.Popen(
        command, env=dict(env or os.environ), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _all_idle(cluster: SlurmCluster) -> bool:
    states = cluster.run("sinfo", "--noheader", "--Node", "--format=%T").split()
    return len(states) == len(NODES) and all(state == "idle" for state in states)


def _wait_for_path(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SlurmError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.1)


def _free_ports(count: int) -> list[int]:
    """Ports the kernel reports free now (held open together so they are distinct)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
