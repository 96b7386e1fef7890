"""The progressive loop of ``prd train`` (the paper's Algorithm 1) at K = 4, recorded from
a tiny run: what the student receives at each step k, which gradient the optimizer applies
and how often it steps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

import prd.train as train_mod  # noqa: E402
from prd import checkpoint  # noqa: E402
from prd.config import load  # noqa: E402
from prd.model import PRDModel  # noqa: E402

K, STEPS = 4, 2
OVERRIDES = [
    f"prompts.file={REPO / 'configs' / 'oracle_train_prompts.txt'}",
    "volume.resolution=16",
    "volume.patch_size=8",
    "volume.global_size=8",
    "volume.n_uniform=16",
    "volume.n_importance=0",
    "mesh.enabled=false",
    "teachers.sd.resolution=16",
    "teachers.mvdream.resolution=16",
    "teachers.richdreamer.resolution=16",
    f"train.progressive_steps={K}",
    f"train.steps={STEPS}",
    "train.batch_size=1",
    "train.torch_threads=1",
    "train.image_every=0",
    "student.pretrained=null",
    "student.denoiser_skip=false",
    "train.optimizer=adamw",
]


class RecordingModel(PRDModel):
    """The built model, rebuilt from its parts: records every student call (inputs, x0 and
    the trainable weights it ran with). Its field MLPs are frozen, so every trained
    weight's gradient flows through the triplanes it returns (which the test records)."""

    def __init__(self, model: PRDModel):
        super().__init__(model.student, model.decoder, model.background)
        self.decoder.requires_grad_(False)
        self.calls: list[dict] = []
        self.taps: tuple[torch.Tensor, torch.Tensor] | None = None

    def field(self, geometry, texture):
        # identity taps between the engine's outputs and the renders: the gradient of a
        # loss w.r.t. them is its gradient w.r.t. the triplanes, and taking it stops short
        # of the hooks DeepSpeed puts on the engine's outputs
        self.taps = (geometry.view_as(geometry), texture.view_as(texture))
        return super().field(*self.taps)

    def forward(self, z_t, t, text):
        x0, geometry, texture = super().forward(z_t, t, text)
        self.calls.append(
            {
                "z_t": z_t.detach().clone(),
                "z_t_requires_grad": z_t.requires_grad,
                "t": t.clone(),
                "text": text.detach().clone(),
                "x0": x0.detach().clone(),
                "weights": [p.detach().clone() for p in self.parameters() if p.requires_grad],
            }
        )
        return x0, geometry, texture


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps the gradient of every step it takes."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.seen: list[torch.Tensor] = []

    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        self.seen.append(torch.cat([g.detach().reshape(-1).clone() for g in grads]))
        return super().step(closure)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    cfg = load([REPO / "configs" / "oracle.yaml"], OVERRIDES)
    run_dir = tmp_path_factory.mktemp("progressive")
    rec: dict = {}
    real_build, real_anchor = train_mod.build_model, train_mod.reaching_every_parameter

    def build_model(*args, **kwargs):
        rec["model"] = RecordingModel(real_build(*args, **kwargs))
        return rec["model"]

    def make_optimizer(cfg, params):
        rec["optimizer"] = RecordingAdamW(params, lr=cfg.train.lr)
        return rec["optimizer"]

    def anchor(loss, params):
        # the step's own loss gradient w.r.t. the triplanes, before DeepSpeed scales the
        # loss for accumulation (not w.r.t. the weights: ZeRO's gradient hooks sit there)
        model = rec["model"]
        model.calls[-1]["d_planes"] = torch.autograd.grad(loss, model.taps, retain_graph=True)
        return real_anchor(loss, params)

    mp = pytest.MonkeyPatch()
    mp.setattr(train_mod, "build_model", build_model)
    mp.setattr(train_mod, "make_optimizer", make_optimizer)
    mp.setattr(train_mod, "reaching_every_parameter", anchor)
    try:
        train_mod.train(cfg, run_dir)
    finally:
        mp.undo()
    return cfg, run_dir, rec


def test_student_sees_the_timesteps_and_renoised_detached_x0(recorded):
    _, _, rec = recorded
    calls = rec["model"].calls
    assert len(calls) == K * STEPS
    ab = rec["model"].student.alphas_cumprod.double()
    for s in range(STEPS):
        step = calls[s * K : (s + 1) * K]
        assert [c["t"].unique().tolist() for c in step] == [[999], [749], [499], [249]]
        for c in step:
            assert torch.equal(c["text"], step[0]["text"])
            assert not c["z_t_requires_grad"]
        # k = 1 starts from unit Gaussian noise
        assert 0.9 < step[0]["z_t"].std().item() < 1.1
        seen = [step[0]["z_t"].double()]
        for prev, cur in zip(step[:-1], step[1:]):
            a = ab[cur["t"][0]]
            x0_prev = prev["x0"].double()
            # z_t = sqrt(ab) x0_prev + sqrt(1 - ab) n: the noise n implied by the inputs
            noise = (cur["z_t"].double() - a.sqrt() * x0_prev) / (1 - a).sqrt()
            assert 0.9 < noise.std().item() < 1.1 and abs(noise.mean().item()) < 0.1
            # fresh: unrelated to earlier noise and to the student's own eps (DDIM reuses it)
            a_prev = ab[prev["t"][0]]
            eps_prev = (prev["z_t"].double() - a_prev.sqrt() * x0_prev) / (1 - a_prev).sqrt()
            for other in [*seen, eps_prev]:
                corr = torch.corrcoef(torch.stack([noise.flatten(), other.flatten()]))[0, 1]
                assert abs(corr.item()) < 0.15, corr
            seen.append(noise)


def weight_gradient(model: RecordingModel, call: dict) -> list[torch.Tensor]:
    """One step k's own gradient w.r.t. the trained weights, recomputed by hand: the
    student rerun on the recorded inputs with the recorded weights, back from the
    recorded triplane gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, w in zip(params, call["weights"]):
            p.copy_(w)
    _, geometry, texture = PRDModel.forward(model, call["z_t"], call["t"], call["text"])
    grads = torch.autograd.grad(
        (geometry, texture), params, grad_outputs=call["d_planes"], allow_unused=True
    )
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def test_one_optimizer_step_per_k_steps_with_the_mean_gradient(recorded):
    cfg, run_dir, rec = recorded
    calls, applied = rec["model"].calls, rec["optimizer"].seen
    fresh = RecordingModel(train_mod.build_model(cfg, seed=cfg.train.seed))
    per_k = [weight_gradient(fresh, c) for c in calls]
    assert len(applied) == STEPS
    records = checkpoint.read_metrics(run_dir)
    for s in range(STEPS):
        # the K forwards of an optimizer step run with the same weights; the next step's
        # with new ones
        for c in calls[s * K + 1 : (s + 1) * K]:
            assert all(torch.equal(a, b) for a, b in zip(c["weights"], calls[s * K]["weights"]))
        if s:
            before, after = calls[(s - 1) * K]["weights"], calls[s * K]["weights"]
            assert not all(torch.equal(a, b) for a, b in zip(before, after))
        # the applied gradient is (1/K) times the sum of the K steps' own gradients
        grads = per_k[s * K : (s + 1) * K]
        mean = torch.cat([sum(g[i] for g in grads).reshape(-1) / K for i in range(len(grads[0]))])
        assert mean.abs().max() > 0
        got = applied[s][: mean.numel()]
        torch.testing.assert_close(got, mean, rtol=1e-4, atol=1e-9)
        assert not applied[s][mean.numel() :].any()  # ZeRO's alignment padding, if any
        assert records[s]["grad_norm"] == pytest.approx(mean.norm().item(), rel=1e-4)
