"""The learned background: its hash encoding against closed forms, its read-out against
the formula, and both render branches compositing over it."""

import pytest
import torch

from prd.background import HASH_PRIMES, BackgroundConfig, HashEncoding, LearnedBackground
from prd.branches import mesh_branch, volume_branch
from prd.triplane import color_activation
from renderers.cameras import CameraSampling, pixel_rays, sample_cameras
from renderers.field import SphereField
from renderers.mesh import MeshRenderConfig
from renderers.volume import VolumeConfig, render_views


def test_dense_levels_interpolate_a_linear_table_exactly_and_coarse_levels_hash():
    """A table holding a linear function of its corner's grid coordinates reads back that
    function at any point (trilinear blends are exact on linear functions); a level too
    fine for its table indexes Instant-NGP's hash of the corner."""
    enc = HashEncoding(levels=3, features=1, log2_size=9, base=2, finest=8)
    assert enc.resolutions == [2, 4, 8]  # 3^3 and 5^3 corners fit 512 rows, 9^3 do not
    a = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    enc = enc.double()
    with torch.no_grad():
        for level in (0, 1):
            n = enc.resolutions[level] + 1
            ijk = torch.stack(torch.meshgrid(*[torch.arange(n)] * 3, indexing="ij"), -1)
            rows = enc.index(ijk.reshape(-1, 3), level)
            enc.tables[level][rows, 0] = ijk.reshape(-1, 3).double() @ a + 0.5
    x = torch.rand(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = enc(x)
    for level in (0, 1):
        want = (x * enc.resolutions[level]) @ a + 0.5
        torch.testing.assert_close(out[:, level], want)
    corner = torch.tensor([[3, 7, 5]])
    want = (3 * HASH_PRIMES[0] ^ 7 * HASH_PRIMES[1] ^ 5 * HASH_PRIMES[2]) % 512
    assert enc.index(corner, 2).item() == want


def test_colour_is_the_hypernetwork_readout_of_the_encoding():
    torch.manual_seed(0)
    cfg = BackgroundConfig(levels=4, log2_table_size=10, max_resolution=32, hidden=8)
    bg = LearnedBackground(cfg, text_dim=6)
    dirs = torch.nn.functional.normalize(torch.randn(2, 7, 3), dim=-1)
    text = torch.randn(2, 6)
    fresh = bg(dirs, text)
    assert (fresh - 0.5).abs().max() < 1e-3  # tables start at +-1e-4: grey
    for table in bg.encoding.tables:
        torch.nn.init.normal_(table, std=1.0)
    weights = bg.hypernet(text).view(2, 8, 3)  # 4 levels x 2 features
    want = color_activation(bg.encoding((dirs + 1) / 2) @ weights, "sigmoid_mipnerf")
    got = bg.bind(text)(dirs)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got[0], got[1])  # another prompt, another background
    with pytest.raises(ValueError, match="background"):
        bg(dirs[0], text)


def test_both_branches_composite_over_the_learned_background():
    """Rays that miss the object show the background of their own direction, in the volume
    and mesh branch alike; its parameters get gradients from both."""
    torch.manual_seed(0)
    bg = LearnedBackground(BackgroundConfig(levels=4, log2_table_size=10, hidden=8), 5)
    for table in bg.encoding.tables:
        torch.nn.init.normal_(table, std=1.0)
    backdrop = bg.bind(torch.randn(1, 5))

    class Ball(SphereField):
        def __len__(self):
            return 1

    field = Ball(torch.tensor([0.1]))
    cams = sample_cameras(1, CameraSampling(), torch.Generator().manual_seed(0))
    vol_cfg = VolumeConfig(resolution=16, patch_size=8, global_size=8, n_uniform=16)
    gen = torch.Generator().manual_seed(1)
    vol = volume_branch(field, cams, vol_cfg, 4, gen, backdrop, 1.0).views
    mesh = mesh_branch(field, cams, MeshRenderConfig(resolution=16), 16, backdrop).views
    _, dirs = pixel_rays(cams, 16, 16)
    truth = backdrop(dirs.reshape(1, -1, 3)).reshape(4, 16, 16, 3)
    # the volume renderer at full resolution (the branch pastes a patch on an upsampled
    # coarse grid), and the mesh branch: pixels off the object show their own direction's
    full = render_views(field, cams, vol_cfg, 4, gen, mode="full", background=backdrop).images
    # (the mesh renderer clamps its colours to [0, 1])
    pairs = ((full.rgb, full.opacity[..., 0], truth), (mesh.rgb, mesh.mask, truth.clamp(0, 1)))
    for rgb, mask, want in pairs:
        empty = mask < 1e-6
        assert empty.float().mean() > 0.5
        torch.testing.assert_close(rgb[empty], want[empty])
    for views in (vol, mesh):
        grads = torch.autograd.grad(views.rgb.sum(), list(bg.parameters()), allow_unused=True)
        assert any(g is not None and g.abs().max() > 0 for g in grads)


def test_the_model_feeds_the_background_clip_pooled_text():
    """PRDModel.backdrop binds the background to each prompt's state at its end-of-text
    token: CLIP's pooled output, as the reference's "global" text embedding."""
    from pathlib import Path

    from prd.config import load
    from prd.model import build_model

    cfg = load([Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"])
    model = build_model(cfg, seed=0)
    prompts = ["a red cube", "a yellow cone on a much longer prompt than the other"]
    student = model.student
    ids = student.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        pooled = student.text_encoder(ids.input_ids).pooler_output
        text = student.encode_text(prompts)
    dirs = torch.nn.functional.normalize(torch.randn(2, 5, 3), dim=-1)
    got = model.backdrop(prompts, text, torch.tensor([0.5, 0.5, 0.5]))(dirs)
    torch.testing.assert_close(got, model.background(dirs, pooled))
    assert model.background.hypernet[0].weight.dtype == torch.float32
    constant = torch.tensor([0.5, 0.5, 0.5])
    model.background = None  # the model's own object: the constant passes through
    assert model.backdrop(prompts, text, constant) is constant
