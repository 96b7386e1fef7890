"""The launchers, run: torchrun restarts after kill -9 (in training and in a checkpoint
save) end in the weights of an uninterrupted run, bit for bit; two torchrun "nodes" on one
machine (c10d rendezvous on localhost) and launch/slurm.sbatch under a simulated SLURM
give the weights of 2 processes on one node. CPU, gloo, 2 ranks, tiny."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from launching import STANDALONE_2, clean_env, prd_train, run, run_args, torchrun
from test_train import REPO, assert_same_tensors, export

from prd import checkpoint
from prd.distributed import _free_port


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted reference: 2 ranks on one node, 3 steps, a checkpoint a step."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run(torchrun(*STANDALONE_2, "-m", "prd") + prd_train(run_dir), clean_env())
    return run_dir


def test_kill_9_in_a_save_and_in_training_loses_nothing(straight, tmp_path):
    """launch/torchrun.sh, 2 ranks: rank 0 dies while saving step 2 (DeepSpeed's files
    written, no manifest, latest at 1); in the restarted group rank 1 dies as step 3
    begins (tests/crash_site plans the kills). torchrun restarts the group twice; the final
    weights and every step's losses equal the uninterrupted run's."""
    run_dir, marks = tmp_path / "run", tmp_path / "marks"
    marks.mkdir()
    env = clean_env(
        PYTHON=sys.executable,
        NPROC="2",
        MAX_RESTARTS="2",
        PYTHONPATH=str(REPO / "tests" / "crash_site"),
        PRD_KILLS="save:2:0,step:3:1",
        PRD_KILL_MARKS=str(marks),
    )
    done = run(["bash", str(REPO / "launch" / "torchrun.sh"), *run_args(run_dir)], env)
    assert sorted(p.name for p in marks.iterdir()) == ["save-2-0", "step-3-1"]
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 3
    assert_same_tensors(export(run_dir), export(straight))
    got, ref = checkpoint.read_metrics(run_dir), checkpoint.read_metrics(straight)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert [r["losses"] for r in got] == [r["losses"] for r in ref]
    # keep_ckpts 2 (default): the last two whole checkpoints stay
    tags = sorted(p.name for p in (run_dir / checkpoint.CKPT_DIR).glob("step_*"))
    assert tags == [checkpoint.tag_for(2), checkpoint.tag_for(3)]


def test_two_nodes_on_one_machine_give_the_same_weights(straight, tmp_path):
    """torchrun --nnodes 2 --node_rank 0|1, one process each, c10d rendezvous on
    localhost: the weights of step 2 of 2 processes on one node."""
    run_dir, port = tmp_path / "run", str(_free_port())
    rdzv = ("--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "t")
    nodes = [
        subprocess.Popen(
            torchrun("--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "1", *rdzv)
            + ["-m", "prd", *prd_train(run_dir, "train.steps=2")],
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (0, 1)
    ]
    for p in nodes:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    assert_same_tensors(export(run_dir), export(straight, 2))


SRUN = """#!/usr/bin/env bash
# stand-in srun: the job's SLURM_NNODES tasks (one per node), started here
set -u
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" > "$SRUN_LOGS/task$i.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
"""
SCONTROL = """#!/usr/bin/env bash
# stand-in scontrol: `scontrol show hostnames LIST` -> one host a line (all this machine)
for ((i = 0; i < SLURM_NNODES; i++)); do echo localhost; done
"""


def test_slurm_sbatch_under_a_simulated_slurm(straight, tmp_path):
    """launch/slurm.sbatch copied to a spool folder (as sbatch does) and run from another
    submit directory with a relative --out, SLURM_* variables of a 2-node CPU job, and
    stand-in srun / scontrol that start the tasks on this machine."""
    bin_dir, spool, submit, logs = (tmp_path / d for d in ("bin", "spool", "submit", "logs"))
    for d in (bin_dir, spool, submit, logs):
        d.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script = spool / "slurm_script"
    shutil.copy(REPO / "launch" / "slurm.sbatch", script)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env = clean_env(
        # the job's environment: its venv active (first on PATH)
        PATH=os.pathsep.join((str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"])),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node-[001-002]",
        SLURM_NNODES="2",
        SLURM_SUBMIT_DIR=str(submit),
        MASTER_PORT=str(_free_port()),
        PRD_REPO=str(REPO),
        SRUN_LOGS=str(logs),
    )
    env.pop("PYTHONPATH")  # the script must find the code through PRD_REPO
    env.pop("CUDA_VISIBLE_DEVICES", None)
    args = run_args(Path("runs/slurm"), "train.steps=2")  # relative: to the submit dir
    done = subprocess.run(
        ["bash", str(script), *args],
        env=env,
        cwd=submit,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tasks = "".join(p.read_text()[-2000:] for p in sorted(logs.iterdir()))
    assert done.returncode == 0, done.stderr[-2000:] + tasks
    assert "job 4242, 2 nodes x 1 processes" in done.stderr and "shared storage" in done.stderr
    assert_same_tensors(export(submit / "runs" / "slurm"), export(straight, 2))


STUB = """#!/usr/bin/env bash
# a stand-in interpreter: records how it was called
echo "$0 $*" >> "$CALLS"
"""


def test_launch_scripts_run_the_given_python_not_a_bare_one(tmp_path):
    """The demo script (as `make demo PYTHON=...` calls it) and torchrun.sh run every step
    with $PYTHON; a bare python or python3 on PATH would fail the run."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for name, text in (("mypython", STUB), ("python", "#!/bin/sh\nexit 97\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    shutil.copy(bin_dir / "python", bin_dir / "python3")
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", CALLS=str(calls))
    for key in ("PYTHON", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"):
        env.pop(key, None)  # a PYTHON of an outer `make test PYTHON=...` run must not leak in
    make = subprocess.run(
        ["make", "-n", "demo", f"PYTHON={bin_dir / 'mypython'}", f"RUN={tmp_path / 'run'}"],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    (demo_line,) = [ln for ln in make.stdout.splitlines() if "oracle_demo.sh" in ln]
    subprocess.run(["bash", "-c", demo_line], cwd=REPO, env=env, check=True, timeout=60)
    steps = calls.read_text().splitlines()
    assert all(s.startswith(str(bin_dir / "mypython")) for s in steps)
    joined = "\n".join(steps)
    for step in ("torch.distributed.run", "--resume auto", "prd sample", "bench.oracle_quality"):
        assert step in joined, step
    calls.unlink()
    torchrun_sh = ["bash", str(REPO / "launch" / "torchrun.sh"), "--out", "x"]
    subprocess.run(
        torchrun_sh, env={**env, "PYTHON": str(bin_dir / "mypython"), "NPROC": "1"}, check=True
    )
    (launch,) = [s for s in calls.read_text().splitlines() if "torch.distributed.run" in s]
    assert "--max-restarts 3 -m prd train --resume auto --out x" in launch
    # without PYTHON: the active environment's python (first on PATH), here the stub
    (bin_dir / "python").write_text(STUB)
    calls.unlink()
    subprocess.run(torchrun_sh, env={**env, "NPROC": "1"}, check=True)
    assert all(s.startswith(str(bin_dir / "python ")) for s in calls.read_text().splitlines())
