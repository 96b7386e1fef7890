"""Oracle scenes and denoiser against closed forms: ray-sphere intersection, exact distances,
exact eps of a known noise, and the vocabulary mean rendered scene by scene."""

import math

import pytest
import torch

from renderers.cameras import orbit_cameras, pixel_rays
from teachers.base import Views, assert_frozen
from teachers.noise import NoiseSchedule
from teachers.oracle import (
    ALL_PROMPTS,
    COLORS,
    HELDOUT_PROMPTS,
    SHAPES,
    TRAIN_PROMPTS,
    OracleDenoiser,
    OracleField,
    OracleMVDream,
    OracleRichDreamer,
    OracleSD,
    sample_surface,
    scene_color,
    scene_sdf,
)
from teachers.roles import MultiViewNormalDepth, MultiViewRGB, SingleViewRGB
from teachers.scenes import render_scenes


def _cams(n=4, el=20.0, dist=1.5):
    return orbit_cameras(torch.arange(n) * 360.0 / n + 10.0, el, dist)


def test_prompt_split_and_errors():
    assert len(TRAIN_PROMPTS) == 30 and len(HELDOUT_PROMPTS) == 6 and len(ALL_PROMPTS) == 36
    assert set(TRAIN_PROMPTS).isdisjoint(HELDOUT_PROMPTS)
    assert HELDOUT_PROMPTS[0] == "a red sphere" and HELDOUT_PROMPTS[5] == "a purple capsule"
    assert torch.allclose(scene_color("a yellow cone"), torch.tensor([0.95, 0.85, 0.1]))
    with pytest.raises(ValueError, match="'teal'"):
        scene_sdf("a teal cube")
    with pytest.raises(ValueError, match="'pyramid'"):
        scene_sdf("a red pyramid")
    with pytest.raises(ValueError, match="'pyramid'"):
        OracleDenoiser(SingleViewRGB(), NoiseSchedule()).encode_text(["a red pyramid"])


def test_sphere_silhouette_depth_normals():
    cams = _cams()
    size = 64
    r = render_scenes(["sphere"] * 4, torch.tensor([[0.9, 0.1, 0.1]] * 4), cams, size)
    # Analytic ray-sphere intersection (radius 0.4 at the origin).
    o, d = pixel_rays(cams, size, size)
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - 0.4**2)
    inside = disc > 0
    t = -b - disc.clamp(min=0).sqrt()
    hit = r.mask > 0.5
    iou = (hit & inside).sum() / (hit | inside).sum()
    assert iou > 0.98
    p = o + t[..., None] * d
    forward = -cams.c2w[:, :3, 2]
    z_depth = ((p - o) * forward[:, None, None, :]).sum(-1)
    both = hit & inside
    assert (r.depth[both] - z_depth[both]).abs().max() < 1e-4
    n_world = torch.nn.functional.normalize(p, dim=-1)
    n_cam = torch.einsum("bji,bhwj->bhwi", cams.c2w[:, :3, :3], n_world)
    assert (r.normal[both] - n_cam[both]).abs().max() < 1e-3
    assert (r.normal[both][:, 2] > -1e-3).all()  # visible normals face the camera (+z)
    assert torch.allclose(r.rgb[both], torch.tensor([0.9, 0.1, 0.1]))
    assert torch.allclose(r.rgb[~hit], torch.tensor([0.5, 0.5, 0.5]))


INSIDE = {
    "sphere": (0.0, 0.0, 0.0),
    "cube": (0.0, 0.0, 0.0),
    "cylinder": (0.0, 0.0, 0.0),
    "cone": (0.0, 0.0, -0.2),
    "torus": (0.3, 0.0, 0.0),
    "capsule": (0.0, 0.0, 0.3),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_sdf_exact_on_samples_and_signs(shape):
    prompt = f"a red {shape}"
    sdf = scene_sdf(prompt)
    g = torch.Generator().manual_seed(0)
    pts, colors = sample_surface(prompt, 20000, g)
    assert pts.shape == (20000, 3) and torch.allclose(colors, torch.tensor([0.9, 0.1, 0.1]))
    assert sdf(pts).abs().max() < 1e-5
    assert sdf(torch.tensor(INSIDE[shape])) < -0.05
    assert sdf(torch.tensor([1.5, -1.0, 1.0])) > 1.0
    # Exactness: |sdf| is the distance to the surface (dense samples: spacing ~0.01).
    q = (torch.rand(300, 3, generator=g) * 2 - 1) * 0.7
    nearest = torch.cdist(q.double(), pts.double()).min(dim=1).values
    s = sdf(q.double()).abs()
    assert (s <= nearest + 1e-6).all()  # never overestimates the distance
    assert (nearest - s).max() < 0.03


def test_oracle_field_matches_scene_sdf():
    field = OracleField(["a red torus", "a blue cone"])
    p = torch.rand(2, 50, 3) - 0.5
    assert torch.allclose(field.sdf(p)[1], scene_sdf("a blue cone")(p[1]))
    assert torch.allclose(field.color(p)[0], torch.tensor([0.9, 0.1, 0.1]))
    assert len(field) == 2
    # a sphere of radius 0.4 scaled by 1.25: radius 0.5, still a distance field
    big = OracleField(["a red sphere"], scale=1.25)
    assert torch.allclose(big.sdf(p[:1]), p[0].norm(dim=-1)[None] - 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="scale must be > 0"):
        OracleField(["a red sphere"], scale=0.0)


ROLES = [SingleViewRGB(), MultiViewRGB(), MultiViewNormalDepth(radius=0.5)]


@pytest.mark.parametrize("role", ROLES, ids=lambda r: type(r).__name__)
def test_oracle_eps_exact(role):
    schedule = NoiseSchedule()
    oracle = OracleDenoiser(role, schedule)
    cams = _cams()
    size = 16
    prompts = ["a green torus", "a green torus", "a blue cube", "a blue cube"]
    x0 = oracle.ground_truth(prompts, cams, size)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([10, 300, 700, 990])
    x_t = schedule.add_noise(x0, noise, t)
    eps = oracle(x_t, t, prompts, cams)
    assert (eps - noise).abs().max() < 1e-4
    # Unconditional: eps w.r.t. the mean over all 36 scenes, rendered one by one.
    total = torch.zeros_like(x0)
    for p in ALL_PROMPTS:
        total += oracle.ground_truth([p] * 4, cams, size)
    mean = total / 36
    eps_u = oracle(x_t, t, [""] * 4, cams)
    expected = schedule.eps_from_x0(x_t, mean, t)
    assert (eps_u - expected).abs().max() < 1e-3


def test_normal_depth_packing_closed_form():
    cams = _cams(dist=1.6)
    role = MultiViewNormalDepth(radius=0.5)
    r = render_scenes(["sphere"] * 4, torch.ones(4, 3), cams, 33)
    x = role.encode(Views(r.rgb, r.mask, r.depth, r.normal, cams, 4), 33)
    # Centre pixel: depth 1.6 - 0.4, normal (0, 0, 1); a corner is background.
    near, far = 1.6 - 0.5 * math.sqrt(3), 1.6 + 0.5 * math.sqrt(3)
    want = (far - 1.2) / (far - near) * 2 - 1
    assert torch.allclose(x[:, 3, 16, 16], torch.full((4,), want), atol=2e-3)
    assert torch.allclose(x[:, :3, 16, 16], torch.tensor([0.0, 0.0, 1.0]).expand(4, 3), atol=2e-3)
    assert torch.allclose(x[:, :, 0, 0], torch.tensor([0.0, 0.0, 1.0, -1.0]).expand(4, 4))
    # x is flipped: a pixel right of centre sees a normal with camera x > 0, packed < 0.
    assert (x[:, 0, 16, 22] < -0.3).all() and (r.normal[:, 16, 22, 0] > 0.3).all()


def test_assert_frozen_accepts_frozen_parameters_and_names_a_trainable_one():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model.requires_grad_(False)
    assert_frozen(model, "frozen")  # parameters, none trainable: passes
    model[1].bias.requires_grad_(True)
    with pytest.raises(ValueError, match=r"'bad' has 1 trainable parameters \(e.g. '1.bias'\)"):
        assert_frozen(model, "bad")
    names = [t.name for t in (OracleSD(), OracleMVDream(), OracleRichDreamer())]
    assert names == ["oracle_sd", "oracle_mvdream", "oracle_richdreamer"]


# the vocabulary's albedos (unlit, so a head-on render shows them exactly)
EXPECTED_RGB = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.1, 0.2, 0.9),
    "yellow": (0.95, 0.85, 0.1),
    "white": (0.95, 0.95, 0.95),
    "purple": (0.6, 0.2, 0.8),
}


def test_each_colour_word_is_the_truth_the_sd_oracle_shows():
    """The SD oracle's clean image of "a <colour> cube" seen head-on: the colour's albedo at
    the centre, the background in a corner, both packed to [-1, 1]."""
    assert set(COLORS) == set(EXPECTED_RGB)
    denoiser = OracleSD(background=(0.5, 0.5, 0.5)).denoiser
    cams = orbit_cameras(torch.zeros(len(EXPECTED_RGB)), 0.0, 1.5)
    prompts = [f"a {c} cube" for c in EXPECTED_RGB]
    x0 = denoiser.ground_truth(prompts, cams, 16)  # (6, 3, 16, 16)
    want = torch.tensor(list(EXPECTED_RGB.values())) * 2 - 1
    torch.testing.assert_close(x0[:, :, 8, 8], want)
    torch.testing.assert_close(x0[:, :, 0, 0], torch.zeros(6, 3))
