"""bench.full_size: the early-teacher-gradient lever changes memory, not gradients."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.full_size import PhaseLog, build, full_config, model_report, one_step

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "student.arch=tiny",
    "student.triplane_channels=8",
    "field.channels=8",
    "field.hidden=16",
    "volume.resolution=16",
    "volume.patch_size=8",
    "volume.global_size=8",
    "volume.n_uniform=16",
    "volume.n_importance=0",
    "mesh_grid=16",
    "mesh.resolution=16",
    "teachers.sd.resolution=16",
    "teachers.mvdream.resolution=16",
    "teachers.richdreamer.resolution=16",
    "train.batch_size=1",
]


class Recorder:
    """An optimizer stand-in that keeps the gradients of the step."""

    def __init__(self, params):
        self.params, self.grads = list(params), None

    def step(self):
        self.grads = [None if p.grad is None else p.grad.clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def test_early_teacher_gradients_give_the_same_gradients_and_losses():
    cfg = full_config([REPO / "configs" / "oracle.yaml"], TINY)
    model, teachers, _, _ = build(cfg, PhaseLog(echo=False))
    params = [p for p in model.parameters() if p.requires_grad]
    runs = []
    for early in (False, True):
        rec = Recorder(params)
        losses = one_step(
            cfg, model, teachers, rec, PhaseLog(echo=False), early_teacher_grads=early
        )
        runs.append((losses, rec.grads))
    (loss_a, grad_a), (loss_b, grad_b) = runs
    assert loss_a == loss_b and len(loss_a) == 6  # 3 oracle roles x 2 branches
    reached = 0
    for a, b in zip(grad_a, grad_b, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
            reached += bool(a.abs().sum() > 0)
    assert reached > len(params) // 2


def test_model_report_counts_each_network_once_and_skips_oracles():
    cfg = full_config([REPO / "configs" / "oracle.yaml"], TINY)
    model, teachers, _, _ = build(cfg, PhaseLog(echo=False))
    report = model_report(model, teachers)
    assert not any(name.startswith("teacher") for name in report)  # oracles have no weights
    counted = sum(r["parameters"] for r in report.values())
    assert counted == sum(p.numel() for p in model.parameters())
