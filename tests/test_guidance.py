"""Guidance losses: autograd gradients against their documented closed forms, schedules
against their formulas, and the oracle as a usable teacher (descent on free pixels)."""

import math

import pytest
import torch

from renderers.cameras import orbit_cameras
from teachers import guidance as G
from teachers.base import Views
from teachers.noise import NoiseSchedule
from teachers.oracle import OracleMVDream, OracleRichDreamer, OracleSD
from teachers.roles import MultiViewNormalDepth
from teachers.scenes import render_scenes, scene_color

SCHED = NoiseSchedule()
T = torch.tensor([50, 50, 50, 50, 500, 500, 500, 500, 950, 950, 950, 950])  # 3 objects x 4 views


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _grad(loss_fn, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(x), x)
    return g


def test_noise_schedule_matches_diffusers():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert torch.allclose(SCHED.alphas_cumprod.float(), ref.alphas_cumprod, atol=1e-6)
    x0, noise, t = _rand(3, 4, 8, 8), _rand(3, 4, 8, 8, seed=1), torch.tensor([0, 400, 999])
    assert torch.allclose(SCHED.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-5)


@pytest.mark.parametrize("uniform", [False, True])
def test_sds_gradient_closed_form(uniform):
    x, ec, eu, noise = (_rand(12, 3, 8, 8, seed=i) for i in range(4))
    s, c = 7.5, 0.3
    got = _grad(lambda v: G.sds_loss(v, ec, eu, noise, T, SCHED, s, uniform, c), x)
    ab = SCHED.alphas_cumprod[T].float().view(-1, 1, 1, 1)
    w = 1.0 if uniform else 1 - ab
    want = c * w * (eu + s * (ec - eu) - noise)
    assert torch.allclose(got, want, atol=1e-5)


def test_x0_gradient_closed_form_with_rescale():
    x, ec, eu, noise = (_rand(12, 3, 8, 8, seed=i) for i in range(4))
    s, c, phi = 20.0, 0.7, 0.5
    got = _grad(lambda v: G.x0_loss(v, ec, eu, noise, T, SCHED, s, 4, phi, c)[0], x)
    # Naive reference, object by object.
    want = torch.empty_like(x)
    for o in range(3):
        sl = slice(4 * o, 4 * o + 4)
        ab = float(SCHED.alphas_cumprod[T[4 * o]])
        x_t = math.sqrt(ab) * x[sl] + math.sqrt(1 - ab) * noise[sl]
        e = eu[sl] + s * (ec[sl] - eu[sl])
        x0 = (x_t - math.sqrt(1 - ab) * e) / math.sqrt(ab)
        x0_c = (x_t - math.sqrt(1 - ab) * ec[sl]) / math.sqrt(ab)
        factor = (x0_c.std() + 1e-8) / (x0.std() + 1e-8)
        x0 = phi * x0 * factor + (1 - phi) * x0
        want[sl] = c * (x[sl] - x0)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("norm", ["image", "object", "none"])
def test_asd_gradient_closed_form(norm):
    x, ec, eu, e2 = (_rand(12, 4, 8, 8, seed=i) for i in range(4))
    s, c, eps = 20.0, 0.25, 0.1
    got = _grad(lambda v: G.asd_loss(v, ec, eu, e2, T, SCHED, s, norm, eps, 4, c), x)
    ab = SCHED.alphas_cumprod[T].float().view(-1, 1, 1, 1)
    a, sig = ab.sqrt(), (1 - ab).sqrt()
    e1 = eu + s * (ec - eu)
    if norm == "none":
        want = c * (e1 - e2)
    else:
        m = (x - (x - sig * e1) / a).abs().mean(dim=(1, 2, 3))
        if norm == "object":
            m = m.view(3, 4).mean(1).repeat_interleave(4)
        want = c * (sig / a) * (e1 - e2) / (m.view(-1, 1, 1, 1) + eps)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    # Shift ratio 0 (second eps = conditional eps): a classifier-score direction.
    got0 = _grad(lambda v: G.asd_loss(v, ec, eu, ec, T, SCHED, s, "none", eps, 4, 1.0), x)
    assert torch.allclose(got0, (s - 1) * (ec - eu), atol=1e-4)


def test_gradient_through_normal_depth_packing():
    """dL/d depth = c * g_depth * d(packed depth)/d depth = -2 c g mask / (far - near)."""
    cams = orbit_cameras(torch.arange(4) * 90.0, 10.0, 1.5)
    r = render_scenes(["cube"] * 4, torch.ones(4, 3), cams, 16)
    role = MultiViewNormalDepth(radius=0.5)
    depth = r.depth.clone().requires_grad_(True)
    ec, eu, e2 = (_rand(4, 4, 16, 16, seed=i) for i in range(3))
    t = torch.full((4,), 300)
    views = Views(r.rgb, r.mask, depth, r.normal, cams, 4)
    x = role.encode(views, 16)
    loss = G.asd_loss(x, ec, eu, e2, t, SCHED, 5.0, "image", 0.1, 4, 0.5)
    (got,) = torch.autograd.grad(loss, depth)
    a, sig = math.sqrt(SCHED.alphas_cumprod[300]), math.sqrt(1 - SCHED.alphas_cumprod[300])
    e1 = eu + 5.0 * (ec - eu)
    m = (x.detach() - (x.detach() - sig * e1) / a).abs().mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
    g = 0.5 * (sig / a) * (e1 - e2) / (m + 0.1)
    want = -2 * g[:, 3] * r.mask / (2 * 0.5 * math.sqrt(3))
    assert torch.allclose(got, want, atol=1e-5)


def _teacher_expected_draws(cfg, step, n_groups, group, shape, seed):
    g = torch.Generator().manual_seed(seed)
    t = G.sample_timesteps(cfg, step, n_groups, g).repeat_interleave(group)
    return t, torch.randn(shape, generator=g)


@pytest.mark.parametrize("scale,reduction", [(3.0, "sum"), (1.0, "sum"), (3.0, "mean")])
def test_teacher_gradient_through_single_view_role(scale, reduction):
    """OracleSD scores view 2 of each object only; d loss / d rgb = 2 c g on those views,
    c = 4*64*64 / (3*16*16) per object summed over the 2 objects (the reference's
    reduction), half that for their mean. At CFG 1 the guided eps is the conditional one,
    so the unconditional pass is skipped."""
    cfg = G.GuidanceConfig(
        loss="sds", guidance_scale=scale, reference_numel=4 * 64 * 64, object_reduction=reduction
    )
    teacher = OracleSD(cfg, resolution=16, view_offset=2)
    passes = []
    teacher.denoiser.register_forward_hook(lambda m, args, out: passes.append(list(args[2])))
    cams = orbit_cameras(torch.arange(8) * 90.0, 15.0, 1.5)
    rgb = torch.rand(8, 16, 16, 3, generator=torch.Generator().manual_seed(3))
    rgb.requires_grad_(True)
    ones = torch.ones(8, 16, 16)
    views = Views(rgb, ones, ones, torch.zeros(8, 16, 16, 3), cams, 4)
    prompts = ["a red cube", "a blue torus"]
    out = teacher(views, prompts, 100, torch.Generator().manual_seed(7))
    assert passes == [prompts + ["", ""] if scale != 1.0 else prompts]  # one batched pass
    (got,) = torch.autograd.grad(out.loss, rgb)
    t, noise = _teacher_expected_draws(cfg, 100, 2, 1, (2, 3, 16, 16), 7)
    assert torch.equal(out.timesteps, t)
    x = rgb.detach()[[2, 6]].permute(0, 3, 1, 2) * 2 - 1
    x_t = SCHED.add_noise(x, noise, t)
    den = teacher.denoiser
    sel = cams.index(torch.tensor([2, 6]))
    ec, eu = den(x_t, t, prompts, sel), den(x_t, t, ["", ""], sel)
    c = 4 * 64 * 64 / (3 * 16 * 16) / (2 if reduction == "mean" else 1)
    g = c * (1 - SCHED.alpha_bar(t, x)) * (eu + scale * (ec - eu) - noise)
    want = torch.zeros_like(rgb)
    want[[2, 6]] = 2 * g.permute(0, 2, 3, 1)
    assert torch.allclose(got, want, atol=1e-4)
    assert out.target.shape == (2, 16, 16, 3)


def test_schedules():
    cfg = G.GuidanceConfig(guidance_scale=20.0, guidance_scale_end=10.0, anneal_steps=20000)
    assert G.timestep_range(cfg, 0) == (500, 980)
    assert G.timestep_range(cfg, 10000) == (260, 980)
    assert G.timestep_range(cfg, 20000) == G.timestep_range(cfg, 50000) == (20, 980)
    assert G.guidance_scale_at(cfg, 0) == 20.0 and G.guidance_scale_at(cfg, 5000) == 17.5
    assert G.guidance_scale_at(cfg, 40000) == 10.0
    assert G.guidance_scale_at(G.GuidanceConfig(guidance_scale=7.5), 9999) == 7.5
    g = torch.Generator().manual_seed(0)
    t = G.sample_timesteps(cfg, 0, 4000, g)
    assert t.min() >= 500 and t.max() <= 980 and len(t.unique()) > 400
    shared = G.sample_timesteps(G.GuidanceConfig(per_sample_t=False), 0, 5, g)
    assert len(shared.unique()) == 1 and shared.shape == (5,)
    tp = G.shifted_timesteps(t, 500, 0.5, True, g)
    assert (tp >= t).all() and (tp <= t + 0.5 * (t - 500)).all() and tp.max() <= 999
    assert torch.equal(G.shifted_timesteps(t, 500, 0.0, True, g), t)
    want = (t + (0.5 * (t - 500)).long()).clamp(max=999)
    assert torch.equal(G.shifted_timesteps(t, 500, 0.5, False, g), want)
    with pytest.raises(ValueError, match="loss"):
        G.GuidanceConfig(loss="vsd")
    with pytest.raises(ValueError, match="max_t"):
        G.GuidanceConfig(max_t=100)


@pytest.mark.parametrize(
    "cfg",
    [
        G.GuidanceConfig(loss="x0", guidance_scale=1.0, reference_numel=4096),
        G.GuidanceConfig(loss="asd", guidance_scale=1.0, asd_shift_ratio=0.5, reference_numel=4096),
    ],
    ids=["x0", "asd"],
)
def test_oracle_mvdream_descent_recovers_ground_truth(cfg):
    cams = orbit_cameras(torch.arange(4) * 90.0 + 30.0, 15.0, 1.5)
    prompt = "a yellow cone"
    gt = render_scenes(["cone"] * 4, scene_color(prompt).expand(4, 3), cams, 32).rgb
    teacher = OracleMVDream(cfg, resolution=32)
    rgb = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    rgb.requires_grad_(True)
    opt = torch.optim.SGD([rgb], lr=1.0)
    gen = torch.Generator().manual_seed(1)
    ones = torch.ones(4, 32, 32)
    err0 = (rgb - gt).abs().mean().item()
    for _ in range(25):
        views = Views(rgb, ones, ones, torch.zeros(4, 32, 32, 3), cams, 4)
        loss = teacher(views, [prompt], 2000, gen).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    err = (rgb - gt).abs().mean().item()
    assert err < err0 / 5, (err0, err)


def test_richdreamer_teacher_runs_on_views_and_target_is_image():
    cams = orbit_cameras(torch.arange(4) * 90.0, 15.0, 1.5)
    r = render_scenes(["torus"] * 4, torch.ones(4, 3), cams, 32)
    views = Views(r.rgb, r.mask, r.depth, r.normal, cams, 4)
    out = OracleRichDreamer()(views, ["a white torus"], 0, torch.Generator().manual_seed(0))
    assert out.target.shape == (4, 32, 32, 4) and out.timesteps.shape == (1,)
    assert out.target.min() >= 0 and out.target.max() <= 1 and torch.isfinite(out.loss)


class _ShrinkDenoiser(torch.nn.Module):
    """eps = 0.3 x_t + the prompt's index: a fixed, text-dependent noise predictor."""

    def encode_text(self, prompts):
        return torch.tensor([float(len(p)) for p in prompts])

    def forward(self, x_t, t, cond, cameras):
        return 0.3 * x_t + 0.01 * cond.view(-1, 1, 1, 1)


@pytest.mark.parametrize("latent_grad", ["encoder", "decoder"])
def test_latent_grad_modes_closed_form(latent_grad):
    """A linear VAE z = A x per pixel, D(z) = A^-1 z: the x0 loss's latent gradient
    c (z - z0) reaches the image as c A^T (z - z0) through the encoder, and as
    c (D(z) - D(z0)) = c A^-1 (z - z0) with ``latent_grad`` "decoder" (the pixel-space x0
    loss against the decoded target); A is not orthogonal, so the two differ."""
    from teachers.distill import DistillationTeacher
    from teachers.roles import SingleViewRGB

    a = torch.tensor([[1.0, 0.5, 0.0], [0.0, 2.0, 0.3], [0.2, 0.0, 0.7]])
    a_inv = torch.linalg.inv(a)
    mix = lambda m, x: torch.einsum("ij,njhw->nihw", m, x)
    cfg = G.GuidanceConfig(loss="x0", guidance_scale=1.0, recon_std_rescale=0.0,
                           latent_grad=latent_grad)  # fmt: skip
    teacher = DistillationTeacher(
        "toy", SingleViewRGB(), _ShrinkDenoiser(), cfg, resolution=8,
        encode=lambda x, gen: mix(a, x), decode=lambda z: mix(a_inv, z),
    )  # fmt: skip
    cams = orbit_cameras(torch.arange(2) * 90.0, 15.0, 1.5)
    rgb = torch.rand(2, 8, 8, 3, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    ones = torch.ones(2, 8, 8)
    views = Views(rgb, ones, ones, torch.zeros(2, 8, 8, 3), cams, 1)
    prompts = ["a red cube", "a cone"]
    out = teacher(views, prompts, 0, torch.Generator().manual_seed(5))
    (got,) = torch.autograd.grad(out.loss, rgb)
    t, noise = _teacher_expected_draws(cfg, 0, 2, 1, (2, 3, 8, 8), 5)
    z = mix(a, rgb.detach().permute(0, 3, 1, 2) * 2 - 1)
    z_t = SCHED.add_noise(z, noise, t)
    eps = 0.3 * z_t + 0.01 * torch.tensor([10.0, 6.0]).view(-1, 1, 1, 1)
    z0 = SCHED.x0_from_eps(z_t, eps, t)
    assert torch.allclose(out.x0, z0, atol=1e-5)
    back = a.T if latent_grad == "encoder" else a_inv
    want = 2 * mix(back, z - z0).permute(0, 2, 3, 1)  # c = 1: no reference size, one view
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    other = a_inv if latent_grad == "encoder" else a.T
    assert not torch.allclose(got, 2 * mix(other, z - z0).permute(0, 2, 3, 1), rtol=0.05)


def test_latent_grad_unknown_is_named():
    with pytest.raises(ValueError, match="latent_grad"):
        G.GuidanceConfig(latent_grad="pixels")
