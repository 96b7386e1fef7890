"""train.precision bf16 (prd.precision): frozen networks bf16, everything that trains fp32.

Two runs of ``prd train`` at tiny size from the same seed, fp32 and bf16, with the SD
teacher on the student's base (so a frozen teacher is there to be bf16): after their steps
the bf16 run's trainable parameters, gradients and optimizer state are fp32, its frozen
student and teacher weights bf16, and its losses track the fp32 run's.
"""

from __future__ import annotations

import pytest
import torch
from test_train import sd_teacher, tiny_cfg

import prd.train as train_mod
from prd import checkpoint, precision

# bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per value); the tiny run's
# losses pass through the bf16 UNet, decoder, VAE encoder and teacher UNet. Measured here,
# step 1 (the same weights in both runs): terms within 1.6e-3, grad norm 7e-3. Step 2
# follows an Adan step, whose first update is about lr x sign(g): gradient entries near 0
# take the other sign, so single terms drift further (eikonal 7e-2), the total 4e-4.
STEP1_RTOL, GRAD_NORM_RTOL, STEP2_TOTAL_RTOL = 1e-2, 5e-2, 2e-2


def run(precision_name: str, tmp_path, folder):
    """Two steps of K = 1 (mesh branch on); returns the model, the optimizer and teachers built,
    and the metrics lines."""
    built: dict = {}
    mp = pytest.MonkeyPatch()
    real = {n: getattr(train_mod, n) for n in ("build_model", "build_teachers", "make_optimizer")}

    def spy(name):
        def wrapped(*args, **kwargs):
            built[name] = real[name](*args, **kwargs)
            return built[name]

        return wrapped

    for name in real:
        mp.setattr(train_mod, name, spy(name))
    cfg = tiny_cfg(
        "train.steps=2",
        "train.progressive_steps=1",
        "mesh.enabled=true",
        f"train.precision={precision_name}",
        *sd_teacher(folder),
    )
    try:
        train_mod.train(cfg, tmp_path / precision_name)
    finally:
        mp.undo()
    return built, checkpoint.read_metrics(tmp_path / precision_name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_sd_folder):
    tmp = tmp_path_factory.mktemp("precision")
    return {p: run(p, tmp, tiny_sd_folder) for p in ("fp32", "bf16")}


def test_bf16_stores_frozen_weights_in_bf16_and_trains_in_fp32(runs):
    built, records = runs["bf16"]
    model, opt, (role,) = built["build_model"], built["make_optimizer"], built["build_teachers"]
    assert [r["step"] for r in records] == [1, 2]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and frozen
    for name, p in trainable.items():
        assert p.dtype == torch.float32, name
    # the student's frozen base: UNet, VAE decoder, text encoder
    for name, p in frozen.items():
        assert p.dtype == torch.bfloat16, name
    assert any(n.startswith("student.text_encoder.") for n in frozen)
    # the teacher's own weights (its VAE; its UNet is the student's, checked above)
    vae = role.denoiser.vae
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    # the optimizer DeepSpeed wraps: ZeRO's flat partitions and Adan's moments, all fp32
    params = [p for g in opt.param_groups for p in g["params"]]
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    assert params and len(states) >= 3 * len(params)  # Adan: exp_avg, exp_avg_sq, exp_avg_diff
    assert {t.dtype for t in params + states if t.is_floating_point()} == {torch.float32}


def test_bf16_losses_track_the_fp32_run(runs):
    (_, fp32), (_, bf16) = runs["fp32"], runs["bf16"]
    assert [r["step"] for r in fp32] == [r["step"] for r in bf16] == [1, 2]
    (a1, a2), (b1, b2) = fp32, bf16
    assert a1["losses"].keys() == b1["losses"].keys()
    for key, value in a1["losses"].items():
        assert b1["losses"][key] == pytest.approx(value, rel=STEP1_RTOL), key
    assert b1["grad_norm"] == pytest.approx(a1["grad_norm"], rel=GRAD_NORM_RTOL)
    for key in ("total/k1",):
        assert b2["losses"][key] == pytest.approx(a2["losses"][key], rel=STEP2_TOTAL_RTOL), key
    # the fp32 run really is fp32 (the comparison is not of two bf16 runs)
    fp32_model = runs["fp32"][0]["build_model"]
    assert {p.dtype for p in fp32_model.parameters()} == {torch.float32}


def test_frozen_dtype_and_the_trainable_check():
    assert precision.frozen_dtype("fp32") == torch.float32
    assert precision.frozen_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        precision.frozen_dtype("fp16")
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    m[0].requires_grad_(False).to(torch.bfloat16)
    assert precision.check_trainable_fp32(m) == 6
    m[1].to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"1\.weight is torch.bfloat16"):
        precision.check_trainable_fp32(m)
    with precision.autocast("bf16", "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with precision.autocast("fp32", "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
