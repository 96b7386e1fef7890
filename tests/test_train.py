"""``prd train`` end to end at tiny size on CPU (DeepSpeed, gloo, one thread per rank).

Runs happen in this process (each ``train`` call builds its own model, engine and prompt
stream; the process group of the first call is reused), except the two-rank run, which
goes through ``torch.distributed.run`` and the CLI. A resume in this process is still an
honest restart: the interrupted run, another whole run, and then the resumed run follow
one another, so a state leaking from one ``train`` call to the next would show up as a
diverging trajectory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAINING
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
# DeepSpeed JIT-compiles a shared-memory op on first use; keep it in the repo's cache
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

import prd.train as train_mod  # noqa: E402
from prd import checkpoint  # noqa: E402
from prd.config import Config, load  # noqa: E402
from prd.distributed import DistInfo  # noqa: E402
from prd.losses import Ramp  # noqa: E402
from prd.model import build_model  # noqa: E402
from prd.weights import load_weights  # noqa: E402

# Small enough for ~1 s per optimizer step with K = 2 (mesh branch off unless asked).
TINY = [
    *TINY_TRAINING,
    "volume.n_uniform=16",
    "mesh.enabled=false",
    *(f"teachers.{role}.resolution=16" for role in ("sd", "mvdream", "richdreamer")),
    "train.progressive_steps=2",
    "train.log_every=1",
    # the paper's setting: PETA adapters train on a frozen base that predicts eps as is
    # (here a random-init one: the tests do not build the default's pretrained tiny base)
    "student.pretrained=null",
    "student.train_base=false",
    "student.denoiser_skip=false",
    "train.optimizer=adan",
]


def tiny_cfg(*overrides: str) -> Config:
    return load([REPO / "configs" / "oracle.yaml"], [*TINY, *overrides])


def losses_of(run_dir: Path) -> list[dict[str, float]]:
    return [r["losses"] for r in checkpoint.read_metrics(run_dir)]


def export(run_dir: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint.export_path(run_dir, step)))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def optimizer_tensors(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """Every tensor of rank 0's ZeRO optimizer file (Adan moments, fp32 master weights)."""
    tag = checkpoint.tag_for(step)
    (path,) = (run_dir / checkpoint.CKPT_DIR / tag).glob("*rank_0*optim_states.pt")
    out: dict[str, torch.Tensor] = {}

    def walk(node, name):
        if torch.is_tensor(node):
            out[name] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{name}/{k}")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{name}/{i}")

    walk(torch.load(path, weights_only=False)["optimizer_state_dict"], "")
    return out


class NaNGradient(torch.autograd.Function):
    """Identity whose backward is NaN: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class NaNAt(torch.nn.Module):
    """A teacher whose loss (or only its gradient) is NaN at the given 0-based steps."""

    def __init__(self, inner: torch.nn.Module, steps: set[int], gradient_only: bool):
        super().__init__()
        self.inner, self.steps, self.gradient_only = inner, steps, gradient_only

    def forward(self, views, prompts, step, generator):
        out = self.inner(views, prompts, step, generator)
        if step in self.steps:
            bad = NaNGradient.apply(out.loss) if self.gradient_only else out.loss * float("nan")
            out = dataclasses.replace(out, loss=bad)
        return out


def nan_teachers(monkeypatch, steps: set[int], gradient_only: bool = False) -> None:
    """Make the first teacher role answer NaN at ``steps`` in the next ``train`` calls."""
    real = train_mod.build_teachers

    def build(*args, **kwargs):
        teachers = real(*args, **kwargs)
        first = teachers[0]
        first.branches = {b: NaNAt(m, steps, gradient_only) for b, m in first.branches.items()}
        return teachers

    monkeypatch.setattr(train_mod, "build_teachers", build)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """Two optimizer steps of the oracle run, both branches: the model and teachers as
    built, a copy of every model tensor before training, the run folder and summary."""
    cfg = tiny_cfg("train.steps=2", "mesh.enabled=true")
    run_dir = tmp_path_factory.mktemp("two_steps")
    built: dict = {}
    mp = pytest.MonkeyPatch()
    real_model, real_teachers = train_mod.build_model, train_mod.build_teachers

    def build_model_spy(*args, **kwargs):
        model = real_model(*args, **kwargs)
        built["model"] = model
        built["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    def build_teachers_spy(*args, **kwargs):
        built["teachers"] = real_teachers(*args, **kwargs)
        return built["teachers"]

    mp.setattr(train_mod, "build_model", build_model_spy)
    mp.setattr(train_mod, "build_teachers", build_teachers_spy)
    try:
        built["summary"] = train_mod.train(cfg, run_dir)
    finally:
        mp.undo()
    return cfg, run_dir, built


def test_two_steps_change_only_trainable_parameters(two_steps):
    cfg, run_dir, built = two_steps
    model, before = built["model"], built["before"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and len(trainable) < len(before)
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.dtype == torch.float32, name
            assert not torch.equal(p.detach(), before[name]), f"{name} did not train"
        else:
            assert torch.equal(p.detach(), before[name]), f"frozen {name} changed"
    # the mesh branch ran and every logged loss is finite
    records = checkpoint.read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert any("/mesh/" in k for k in records[0]["losses"])
    for r in records:
        assert all(torch.isfinite(torch.tensor(v)) for v in r["losses"].values()), r
        assert r["grad_norm"] is not None and 0 < r["grad_norm"] < float("inf")
    assert built["summary"] == {"step": 2, "loss": records[-1]["loss"], "nonfinite_total": 0}


def test_export_loads_into_a_fresh_model(two_steps):
    cfg, run_dir, built = two_steps
    fresh = build_model(cfg, seed=cfg.train.seed)
    load_weights(fresh, checkpoint.export_path(run_dir))
    trained = dict(built["model"].named_parameters())
    for name, p in fresh.named_parameters():
        assert torch.equal(p, trained[name]), name
    assert_same_tensors(export(run_dir), export(run_dir, 2))


def test_embedding_cache_gives_the_same_run(two_steps, tmp_path):
    cfg, run_dir, _ = two_steps
    cached = tiny_cfg("train.steps=2", "mesh.enabled=true", f"prompts.embed_cache={tmp_path / 'e'}")
    train_mod.train(cached, tmp_path / "run")
    assert losses_of(tmp_path / "run") == losses_of(run_dir)
    assert list((tmp_path / "e").glob("*.safetensors")), "the cache wrote no shard"


def test_run_folder_errors_come_before_any_heavy_work(two_steps, monkeypatch, tmp_path):
    cfg, run_dir, _ = two_steps

    def no_setup(*args, **kwargs):
        raise AssertionError("the process group was set up before the check")

    monkeypatch.setattr(train_mod.distributed, "setup", no_setup)
    with pytest.raises(ValueError, match="already holds a run.*step 2.*--resume"):
        train_mod.train(cfg, run_dir)
    other = tiny_cfg("train.steps=2", "mesh.enabled=true", "train.lr=5e-4", "volume.n_uniform=8")
    lr = re.escape(str(cfg.train.lr))
    named = rf"train\.lr: {lr} -> 0\.0005.*volume\.n_uniform: {cfg.volume.n_uniform} -> 8"
    with pytest.raises(ValueError, match=named):
        train_mod.train(other, run_dir, resume=True)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train_mod.train(cfg, tmp_path / "empty", resume=True)
    with pytest.raises(ValueError, match="zero_stage must be 1 or 2"):
        tiny_cfg("train.zero_stage=3")
    # only train.steps and logging may change on resume
    train_mod.check_resumable(
        (run_dir / "config.yaml").read_text(),
        tiny_cfg("train.steps=9", "mesh.enabled=true", "train.ckpt_every=3"),
        run_dir,
    )


def test_resume_continues_exactly(tmp_path):
    """3 steps, a kill in the middle of the next save, resume to 6 == 6 steps straight
    (the learning rate decays over steps 2-6, so the resumed run must pick up its ramp)."""
    split, straight = tmp_path / "split", tmp_path / "straight"
    decay = ("train.lr_scale.end=0.25", "train.lr_scale.steps=4", "train.lr_scale.begin=2")
    train_mod.train(tiny_cfg("train.steps=3", "train.ckpt_every=3", *decay), split)
    # the kill: the step-6 tag folder exists with partial files, ``latest`` still says 3,
    # and the metrics line of step 4 was half written
    partial = split / checkpoint.CKPT_DIR / checkpoint.tag_for(6)
    partial.mkdir()
    (partial / "trainer_rank0.pt").write_bytes(b"\x80\x04partial")
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03")
    with checkpoint.metrics_path(split).open("a") as f:
        f.write('{"step": 4, "loss": 1')
    assert checkpoint.latest_step(split) == 3

    six = tiny_cfg("train.steps=6", "train.ckpt_every=3", *decay)
    straight_summary = train_mod.train(six, straight)
    resumed = train_mod.train(six, split, resume=True)

    assert resumed == straight_summary
    assert [r["step"] for r in checkpoint.read_metrics(split)] == [1, 2, 3, 4, 5, 6]
    assert losses_of(split) == losses_of(straight)
    assert_same_tensors(export(split), export(straight))
    assert checkpoint.latest_step(split) == 6
    assert_same_tensors(optimizer_tensors(split, 6), optimizer_tensors(straight, 6))
    lr = six.train.lr
    expected = [lr, lr, lr, 0.8125 * lr, 0.625 * lr, 0.4375 * lr]  # 1 -> 0.25 over steps 2-6
    assert [r["lr"] for r in checkpoint.read_metrics(split)] == pytest.approx(expected)


def test_learning_rate_zero_from_a_step_on_freezes_the_weights(tmp_path):
    """lr_scale 1 for steps 1-2, then 0: the export of step 4 equals that of step 2."""
    zero = ("train.lr_scale.end=0.0", "train.lr_scale.begin=2", "train.optimizer=adamw")
    run = tmp_path / "run"
    train_mod.train(tiny_cfg("train.steps=4", "train.ckpt_every=2", *zero), run)
    lr = tiny_cfg().train.lr
    assert [r["lr"] for r in checkpoint.read_metrics(run)] == [lr, lr, 0.0, 0.0]
    assert_same_tensors(export(run, 4), export(run, 2))


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    """ZeRO-2: NaN at steps 2, 4, 5 (1-based) with at most 2 in a row allowed."""
    nan_teachers(monkeypatch, {1, 3, 4})
    cfg = tiny_cfg(
        "train.steps=6",
        "train.ckpt_every=1",
        "train.keep_ckpts=6",
        "train.max_nonfinite_in_row=2",
        "train.zero_stage=2",
    )
    with pytest.raises(train_mod.TrainingStopped, match="2 steps in a row.*step 5"):
        train_mod.train(cfg, tmp_path)

    records = checkpoint.read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["nonfinite_total"] for r in records] == [0, 1, 1, 2, 3]
    assert [r["grad_norm"] == float("inf") for r in records] == [False, True, False, True, True]
    # a skipped step leaves weights and Adan's state as they were; the next one trains
    assert_same_tensors(export(tmp_path, 2), export(tmp_path, 1))
    assert_same_tensors(optimizer_tensors(tmp_path, 2), optimizer_tensors(tmp_path, 1))
    trained = export(tmp_path, 3)
    still = {k for k, v in export(tmp_path, 2).items() if torch.equal(v, trained[k])}
    # the grid-deformation head gets no gradient with the mesh branch off
    assert all(k.startswith("decoder.deform_mlp.") for k in still), still
    assert_same_tensors(export(tmp_path, 4), export(tmp_path, 3))
    # stopped before saving step 5: the checkpoint of step 4 is the latest and resumes
    assert checkpoint.latest_step(tmp_path) == 4
    assert not (tmp_path / checkpoint.CKPT_DIR / checkpoint.tag_for(5)).exists()
    monkeypatch.undo()
    summary = train_mod.train(cfg, tmp_path, resume=True)
    assert summary["step"] == 6 and summary["nonfinite_total"] == 2
    assert [r["step"] for r in checkpoint.read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_finite_loss_nonfinite_gradient_skipped_on_zero_stage_1(tmp_path, monkeypatch):
    nan_teachers(monkeypatch, {1}, gradient_only=True)
    cfg = tiny_cfg("train.steps=2", "train.ckpt_every=1", "train.keep_ckpts=2")
    cfg.train.zero_stage = 1
    summary = train_mod.train(cfg, tmp_path)
    assert summary["nonfinite_total"] == 1 and math.isfinite(summary["loss"])
    assert_same_tensors(export(tmp_path, 2), export(tmp_path, 1))
    assert_same_tensors(optimizer_tensors(tmp_path, 2), optimizer_tensors(tmp_path, 1))


def test_two_ranks_zero2(tmp_path, tiny_sd_folder):
    """torch.distributed.run with 2 CPU ranks (gloo, ZeRO-2), the SD teacher on the
    student's base folder: both ranks' states are saved, ranks draw disjoint prompts, the
    SD losses are finite, and the fp32 weights gathered from both ranks' optimizer
    partitions equal rank 0's export; DeepSpeed's CPU shared-memory op is never built or
    loaded (``prd.distributed._skip_shm_comm``)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # this process's single-rank group must not leak into the launch
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "prd", "train", "--config", str(REPO / "configs" / "oracle.yaml")]
    cmd += ["--out", str(run_dir), *TINY, "train.steps=2", "train.zero_stage=2"]
    cmd += sd_teacher(tiny_sd_folder)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 2
    assert "shm_comm" not in done.stdout + done.stderr
    for r in checkpoint.read_metrics(run_dir):
        assert all(math.isfinite(r["losses"][f"sd/volume/k{k}"]) for k in (1, 2)), r

    cfg = load_cfg_of(run_dir)
    tag_dir = run_dir / checkpoint.CKPT_DIR / checkpoint.tag_for(2)
    seen = []
    for rank in (0, 1):
        state = torch.load(tag_dir / f"trainer_rank{rank}.pt", weights_only=False)
        stream = train_mod.make_stream(cfg, DistInfo(rank, 2, rank, torch.device("cpu")))
        seen.append([p for _ in range(2) for p in stream.next_batch()])
        assert state["stream"] == stream.state_dict()
        assert len(list(tag_dir.glob(f"*rank_{rank}_*optim_states.pt"))) == 1
    assert not set(seen[0]) & set(seen[1])

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    gathered = get_fp32_state_dict_from_zero_checkpoint(
        str(run_dir / checkpoint.CKPT_DIR), tag=checkpoint.tag_for(2)
    )
    exported = export(run_dir)
    assert_same_tensors({k: gathered[k] for k in exported}, exported)


def load_cfg_of(run_dir: Path) -> Config:
    from prd.configio import load_config_text

    return load_config_text(Config, (run_dir / "config.yaml").read_text())


def test_metrics_truncation_keeps_steps_up_to_the_checkpoint(tmp_path):
    lines = [json.dumps({"step": s, "loss": float(s)}) for s in (1, 2, 3)]
    checkpoint.metrics_path(tmp_path).write_text("\n".join(lines) + '\n{"step": 4')
    checkpoint.truncate_metrics(tmp_path, 2)
    assert checkpoint.read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]
    checkpoint.truncate_metrics(tmp_path, 0)
    assert checkpoint.read_metrics(tmp_path) == []
    shutil.rmtree(tmp_path)
    checkpoint.truncate_metrics(tmp_path, 0)  # no run folder yet: nothing to do


def test_every_parameter_gets_a_gradient_and_the_loss_is_unchanged():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))
    loss = (a**2).sum()
    anchored = train_mod.reaching_every_parameter(loss, [a, b])
    assert anchored.item() == loss.item()
    anchored.backward()
    assert torch.equal(a.grad, 2 * a.detach())  # d/da sum(a^2)
    assert b.grad is not None and torch.equal(b.grad, torch.zeros(2, 2))


def test_ramp_holds_start_until_begin_then_moves_linearly_to_end():
    ramp = Ramp(start=1.0, end=0.1, steps=50, begin=55)
    assert [ramp.at(s) for s in (0, 55, 80, 105, 500)] == pytest.approx([1.0, 1.0, 0.55, 0.1, 0.1])
    assert Ramp(2.0, 0.5, steps=0, begin=3).at(2) == 2.0 and Ramp(2.0, 0.5, 0, 3).at(3) == 0.5
    with pytest.raises(ValueError, match="begin must be >= 0"):
        Ramp(begin=-1)


def test_regularization_weights_the_terms_by_their_ramps_and_drops_zero_weights():
    ramps = ["train.eikonal.start=0.5", "train.eikonal.end=0.0", "train.eikonal.steps=10"]
    t = load(
        [REPO / "configs/tiny.yaml"], [*ramps, "train.sparsity.start=2.0", "train.sparsity.end=2.0"]
    ).train
    eik = torch.tensor(3.0, requires_grad=True)
    regs = {"eikonal": eik, "sparsity": torch.tensor(5.0)}
    # step 4 of 10: eikonal weight 0.5 * (1 - 0.4) = 0.3
    assert train_mod.regularization(regs, t, 4).item() == pytest.approx(0.3 * 3.0 + 2.0 * 5.0)
    late = train_mod.regularization(regs, t, 10)  # the eikonal ramp has reached 0
    assert late.item() == 10.0 and not late.requires_grad


def sd_teacher(folder: Path) -> list[str]:
    """The SD teacher from ``folder``, which is also the student's base; the multi-view
    roles off (as ``prd train --config configs/oracle.yaml teachers.sd.source=pretrained``)."""
    return [
        f"student.pretrained={folder}",
        "teachers.sd.source=pretrained",
        f"teachers.sd.pretrained={folder}",
        "teachers.sd.guidance.guidance_scale=7.5",  # the CFG path, negative prompt ""
        "teachers.mvdream.enabled=false",
        "teachers.richdreamer.enabled=false",
    ]


def train_keeping_teachers(cfg: Config, run_dir: Path) -> tuple[dict, list]:
    """``train(cfg, run_dir)`` -> (its summary, the teachers it built)."""
    built = {}
    real = train_mod.build_teachers

    def spy(*args, **kwargs):
        built["teachers"] = real(*args, **kwargs)
        return built["teachers"]

    mp = pytest.MonkeyPatch()
    mp.setattr(train_mod, "build_teachers", spy)
    try:
        summary = train_mod.train(cfg, run_dir)
    finally:
        mp.undo()
    return summary, built["teachers"]


def test_sd_teacher_on_the_students_base_trains_both_branches(tmp_path, tiny_sd_folder):
    cfg = tiny_cfg("train.steps=2", "mesh.enabled=true", *sd_teacher(tiny_sd_folder))
    summary, (role,) = train_keeping_teachers(cfg, tmp_path / "run")
    assert role.name == "sd" and role.denoiser.borrowed is not None  # the student's UNet
    assert all(t.denoiser is role.denoiser for t in role.branches.values())
    records = checkpoint.read_metrics(tmp_path / "run")
    assert summary["step"] == 2 and [r["step"] for r in records] == [1, 2]
    for r in records:
        sd_losses = {k: v for k, v in r["losses"].items() if k.startswith("sd/")}
        assert set(sd_losses) == {f"sd/{b}/k{k}" for b in ("volume", "mesh") for k in (1, 2)}
        assert all(math.isfinite(v) and v > 0 for v in sd_losses.values()), sd_losses
        assert 0 < r["grad_norm"] < float("inf")


def test_weight_folders_are_checked_before_the_process_group(
    tmp_path, tiny_sd_folder, monkeypatch, capsys
):
    """A missing subfolder of the student's or the teacher's folder, or the paper preset
    without a base, stops ``prd train`` with status 2 before the process group starts."""
    from prd import cli

    def no_setup(*args, **kwargs):
        raise AssertionError("the process group was set up before the check")

    monkeypatch.setattr(train_mod.distributed, "setup", no_setup)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_folder, broken, ignore=shutil.ignore_patterns("text_encoder"))
    oracle = str(REPO / "configs" / "oracle.yaml")
    args = ["train", "--config", oracle, "--out", str(tmp_path / "run"), *TINY]
    for key in ("student.pretrained", "teachers.sd.pretrained"):
        assert cli.main([*args, *sd_teacher(tiny_sd_folder), f"{key}={broken}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"prd train: error: {key}:") and str(broken) in err, err
        missing = err.split("is missing")[1].split(";")[0]
        assert "text_encoder/model.safetensors" in missing and "unet/config.json" not in missing
    sd21 = ["train", "--config", str(REPO / "configs" / "sd21.yaml"), "--out", str(tmp_path / "r")]
    assert cli.main([*sd21, TINY[0]]) == 2
    assert "student.allow_random_sd21=true" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "r").exists()
