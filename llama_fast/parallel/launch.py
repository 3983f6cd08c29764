"""Starting the ranks of a tensor-parallel job on this machine.

`llama-fast generate --tp N` re-runs itself under torchrun (`torchrun_command`), which starts N processes
with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (a free port: --standalone), kills the others when one
fails and returns the first failure's exit code. `run_ranks` does the same for tests and benchmarks without
torchrun's agent: a free port, one subprocess per rank, a deadline, and every process it started killed by
its PID when the deadline passes or one rank fails.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


def torchrun_command(world: int, module_args: list[str], threads: int | None = None) -> tuple[list[str], dict]:
    """(argv, env) running `python -m <module_args>` on `world` ranks under torchrun. OMP_NUM_THREADS is the
    threads per rank (torchrun's default is 1 when it starts several ranks)."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            "-m", *module_args]
    return argv, env


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it; another process could take it before the ranks
    bind it, which makes their rendezvous fail loudly, not hang)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    rank: int
    returncode: int | None      # None: killed (at the deadline, or by a signal)
    output: str


def run_ranks(argv: list[str], world: int, timeout: float, threads: int = 1, env: dict | None = None,
              cwd: str | None = None, grace: float = 10.0) -> list[RankResult]:
    """Runs `argv` as ranks 0..world-1 of one process group (env:// rendezvous on a free local port), each
    with `threads` CPU threads, and waits at most `timeout` seconds in all. When a rank fails, the others get
    `grace` seconds to report the same error, then every rank still running is killed (by PID, with its
    process group); so are all of them at the deadline. -> each rank's exit code and output (stdout + stderr)."""
    port = free_port()
    procs, logs = [], []
    base = dict(os.environ if env is None else env)
    try:
        for rank in range(world):
            rank_env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                        "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                        "OMP_NUM_THREADS": str(threads)}
            log = tempfile.TemporaryFile("w+")
            logs.append(log)
            procs.append(subprocess.Popen(argv, env=rank_env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                          start_new_session=True))
        deadline = time.monotonic() + timeout
        give_up = None
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if give_up is None and any(p.poll() not in (None, 0) for p in procs):
                give_up = time.monotonic() + grace      # the others should raise the same error soon
            if give_up is not None and time.monotonic() > give_up:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                _kill(p)
    results = []
    for rank, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        results.append(RankResult(rank, p.returncode if p.returncode is not None and p.returncode >= 0 else None,
                                  log.read()))
        log.close()
    return results


def _kill(p: subprocess.Popen) -> None:
    """Kills rank `p` and whatever it started (its own session), by PID."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        p.kill()
    p.wait()
