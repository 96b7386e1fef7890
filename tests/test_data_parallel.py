"""Data parallelism: 2 ranks x batch b make the same update as 1 rank x batch 2b, and a
collective times out (train.collective_timeout) instead of hanging on a dead rank."""

from __future__ import annotations

import subprocess
import sys
import time

import torch
from equivalence_probe import one_update
from launching import STANDALONE_2, clean_env, run, torchrun
from test_train import REPO

from prd.distributed import _free_port


def test_two_ranks_of_b_update_as_one_rank_of_2b(tmp_path):
    """The gradient averaged over ranks (AdamW's first moment after one step is 0.1 x it)
    and the updated weights agree within float tolerance; the optimizer state is the
    consolidated one, gathered from both ranks' ZeRO-2 partitions."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    one_update(4, one)
    probe = str(REPO / "tests" / "equivalence_probe.py")
    run(torchrun(*STANDALONE_2, probe, str(two), "2"), clean_env())
    a, b = torch.load(one), torch.load(two)
    assert a.keys() == b.keys() and len(a) > 10
    moved = 0
    for name in a:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            x, y = a[name][key], b[name][key]
            scale = x.abs().max().item()
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-5 * scale + 1e-12), (name, key)
        moved += bool(a[name]["exp_avg"].abs().max() > 0)
    assert moved > len(a) // 2  # the loss reaches most parameters


PROBE = """
import os, sys, time, torch
from prd import distributed
distributed.setup("cpu", timeout=float(sys.argv[1]))
if torch.distributed.get_rank() == 1:
    time.sleep(120)  # a rank that hangs without dying: the launcher sees nothing
t0 = time.perf_counter()
try:
    torch.distributed.all_reduce(torch.ones(3))
except Exception as exc:
    print(f"raised after {time.perf_counter() - t0:.1f} s: {type(exc).__name__}: {exc}", flush=True)
    os._exit(5)  # the broken group's threads may abort a normal interpreter exit
"""


def test_a_collective_times_out_instead_of_hanging(tmp_path):
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = clean_env()
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        # 8 s: also the rendezvous timeout, so it must cover the ranks' start-up skew
        cmd = [sys.executable, "-c", PROBE, "8"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    t0 = time.perf_counter()
    out, _ = procs[0].communicate(timeout=100)
    waited = time.perf_counter() - t0
    procs[1].kill()
    procs[1].wait()
    assert procs[0].returncode == 5, out
    seconds = float(out.split("raised after ")[1].split(" s")[0])
    assert 7.5 < seconds < 40 and waited < 90, out
