"""configs/distill_tiny.yaml: the tiny student distilled from the three learned tiny
teachers that ``prd tiny-teachers`` writes (built here with a few-step recipe, in a
folder laid out as the launcher's), through the preset's own paths and settings."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAINING
from test_tiny_teachers import CAMERAS, FAST, FAST_BASE

import prd.tiny_teachers as tt
import prd.train as train_mod
from prd import checkpoint
from prd.config import load
from prd.teacher_setup import REFERENCE_NEGATIVE_PROMPT

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "distill_tiny.yaml"
LAUNCHER = REPO / "launch" / "distill_demo.sh"
TEACHERS = "runs/tiny_teachers"
"""Where the launcher builds the teachers (relative to the repository, as the preset's paths)."""
ROLES = ("sd", "mvdream", "richdreamer")
# Smaller renders than the preset's; every teacher setting stays the preset's.
SMALL = [
    *TINY_TRAINING,
    "volume.n_uniform=8",
    "train.batch_size=1",
    "train.steps=2",
    "train.log_every=1",
]


@pytest.fixture(scope="module")
def repo_like(tmp_path_factory):
    """A folder holding runs/tiny_teachers as the launcher builds it (few-step teachers;
    read only)."""
    root = tmp_path_factory.mktemp("distill")
    tt.build_tiny_teachers(
        root / TEACHERS, CAMERAS, FAST, base_recipe=FAST_BASE, log=lambda s: None
    )
    return root


def preset(*overrides: str):
    return load([PRESET], [*SMALL, *overrides])


def test_the_preset_reads_what_tiny_teachers_writes(repo_like):
    """Every teacher path, UNet argument, depth range and resolution of the preset is the
    one the build wrote into its manifest, at the launcher's folder."""
    assert re.search(rf"^TEACHERS={TEACHERS}$", LAUNCHER.read_text(), re.M)
    info = tt.read_manifest(repo_like / TEACHERS)
    cfg = load([PRESET], [f"prompts.file={REPO / 'configs' / 'oracle_train_prompts.txt'}"])
    t = cfg.teachers
    at = lambda key: f"{TEACHERS}/{key}"
    assert cfg.student.pretrained == t.sd.pretrained == at(info["sd"])
    assert t.mvdream.pretrained == at(info["mvdream"]["checkpoint"])
    assert t.mvdream.vae == at(info["mvdream"]["vae"])
    # MVDream reads SD's text states: the student's encoder, which is the manifest's
    assert t.mvdream.text_encoder is None and info["mvdream"]["text_encoder"] == info["sd"]
    assert t.richdreamer.pretrained == at(info["richdreamer"]["checkpoint"])
    assert t.richdreamer.text_encoder == at(info["richdreamer"]["text_encoder"])
    assert t.richdreamer.depth_radius == info["richdreamer"]["depth_radius"]
    for role in ("mvdream", "richdreamer"):
        assert dict(getattr(t, role).ldm_kwargs) == info[role]["ldm_kwargs"], role
        assert getattr(t, role).resolution == info[role]["resolution"], role
    assert t.sd.resolution == info["mvdream"]["resolution"]  # the tiny SD's 32 px
    for role in ROLES:
        assert (repo_like / getattr(t, role).pretrained).exists(), role
    # the paper's method: ASD (per-teacher shift), CFG > 1, anneals over the whole run, K = 4
    g = {role: getattr(t, role).guidance for role in ROLES}
    assert all(x.loss == "asd" and x.guidance_scale > 1 for x in g.values())
    # SD and MVDream at the probe's CFG 2 and shift 1.0, ND-MV as the paper's (CFG 20,
    # shift 0.1); only ND-MV's gradient reaches the NeuS weights (docs/distill_tiny.md)
    assert [g[r].asd_shift_ratio for r in ROLES] == [1.0, 1.0, 0.1]
    assert [g[r].guidance_scale for r in ROLES] == [2.0, 2.0, 20.0]
    assert cfg.volume.rgb_geometry_grad == 0.0 and cfg.mesh.repair_empty
    assert all(x.anneal_steps == cfg.train.steps for x in g.values())
    assert cfg.train.progressive_steps == cfg.sample.steps == 4 and cfg.mesh.enabled


def test_two_steps_on_one_rank(repo_like, tmp_path, monkeypatch):
    monkeypatch.chdir(repo_like)
    built = {}
    real = train_mod.build_teachers

    def spy(*args, **kwargs):
        built["teachers"] = real(*args, **kwargs)
        return built["teachers"]

    monkeypatch.setattr(train_mod, "build_teachers", spy)
    summary = train_mod.train(preset(), tmp_path / "run")
    roles = {r.name: r for r in built["teachers"]}
    assert list(roles) == list(ROLES)
    # the learned weights reached the run: ND-MV's UNet is the checkpoint's
    want = tt.load_teachers(repo_like / TEACHERS)["richdreamer"].unet.state_dict()
    got = roles["richdreamer"].denoiser.unet.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    for role in ("mvdream", "richdreamer"):
        assert roles[role].branches["mesh"].negative_prompt == REFERENCE_NEGATIVE_PROMPT
    assert summary["step"] == 2
    assert_finite_losses(checkpoint.read_metrics(tmp_path / "run"))


def test_two_steps_on_two_ranks(repo_like, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # this process's single-rank group must not leak into the launch
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "prd", "train", "--config", str(PRESET), "--out", str(run_dir)]
    cmd += SMALL
    done = subprocess.run(cmd, env=env, cwd=repo_like, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 2
    assert_finite_losses(checkpoint.read_metrics(run_dir))


def assert_finite_losses(records: list[dict]) -> None:
    """Every teacher scored both branches at all K = 4 steps of each of the 2 steps."""
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for role in ROLES:
            got = {k: v for k, v in r["losses"].items() if k.startswith(f"{role}/")}
            assert set(got) == {f"{role}/{b}/k{k}" for b in ("volume", "mesh") for k in range(1, 5)}
            assert all(math.isfinite(v) for v in got.values()), got
        assert 0 < r["grad_norm"] < float("inf")
