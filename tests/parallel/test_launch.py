"""llama_fast.parallel.launch.run_ranks: the deadline and the clean-up every multi-process test relies on."""
from __future__ import annotations

import sys
import time

from llama_fast.parallel.launch import run_ranks


def _alive(pid: int) -> bool:
    """Running (a zombie, killed but not yet reaped by whoever inherited it, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_ranks_see_their_rank_and_a_shared_port():
    code = "import os; print(os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['MASTER_PORT'])"
    results = run_ranks([sys.executable, "-c", code], 2, timeout=60)
    assert [r.returncode for r in results] == [0, 0]
    fields = [r.output.split() for r in results]
    assert [f[:2] for f in fields] == [["0", "2"], ["1", "2"]] and fields[0][2] == fields[1][2]


def test_a_hung_rank_is_killed_at_the_deadline_with_what_it_started(tmp_path):
    # each rank starts a child of its own and then hangs: both must be gone when run_ranks returns
    code = ("import os, subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"open(os.path.join({str(tmp_path)!r}, os.environ['RANK']), 'w').write(f'{{os.getpid()}} {{c.pid}}'); "
            "time.sleep(600)")
    start = time.monotonic()
    results = run_ranks([sys.executable, "-c", code], 2, timeout=8)
    assert time.monotonic() - start < 60
    assert [r.returncode for r in results] == [None, None]
    for rank in ("0", "1"):
        pids = [int(p) for p in (tmp_path / rank).read_text().split()]
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)      # a killed child of a killed rank is reaped by init
        assert not any(_alive(p) for p in pids), f"rank {rank} left {pids} running"


def test_when_one_rank_fails_the_others_are_not_waited_for():
    code = "import os, sys, time; sys.exit(3) if os.environ['RANK'] == '1' else time.sleep(600)"
    start = time.monotonic()
    results = run_ranks([sys.executable, "-c", code], 2, timeout=120, grace=0.5)
    assert time.monotonic() - start < 60
    assert results[1].returncode == 3 and results[0].returncode is None
