"""The training branches and the oracle teachers agree on what is true: the exact scene,
rendered by the volume (NeuS) and mesh (marching cubes + rasterizer) branches, scores a
lower loss with every teacher than the same scene scaled by 0.9 or 1.1. A convention
mismatch between the student's renderers and the oracle's sphere tracer (a pixel-centre
offset, a flipped axis, a depth or normal encoding) would move this minimum."""

from pathlib import Path

import pytest
import torch

from prd.branches import mesh_branch, volume_branch
from prd.config import load
from prd.teacher_setup import build_teachers
from renderers.cameras import sample_cameras
from teachers.scenes import OracleField

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("branch", ["volume", "mesh"])
def test_the_exact_scene_scores_lowest_on_both_branches(branch):
    cfg = load([REPO / "configs" / "oracle.yaml"], [])
    prompts = ["a red cube", "a white torus"]
    background = torch.tensor(cfg.train.background)
    views = cfg.cameras.n_views
    teachers = build_teachers(cfg.teachers, cfg.train.background, views)
    losses = {}
    for scale in (0.9, 1.0, 1.1):
        field = OracleField(prompts, cfg.field.bound, scale=scale)
        gen = torch.Generator().manual_seed(0)
        cams = sample_cameras(len(prompts), cfg.cameras, gen)
        if branch == "volume":
            out = volume_branch(field, cams, cfg.volume, views, gen, background, 1.0)
        else:
            out = mesh_branch(field, cams, cfg.mesh, cfg.mesh_grid, background)
        for role in teachers:
            noise = torch.Generator().manual_seed(1)
            losses[role.name, scale] = role.for_branch(branch)(out.views, prompts, 0, noise).loss
    for role in teachers:
        exact = losses[role.name, 1.0].item()
        for scale in (0.9, 1.1):
            assert exact < losses[role.name, scale].item(), (role.name, scale, losses)


@pytest.mark.parametrize("repair", [True, False])
def test_an_empty_field_reaches_the_teachers_only_when_repaired(repair):
    """A field inside everywhere: with the reference's repair the mesh branch renders the
    surface just inside the grid's border (the mask covers the view's centre) and the SDF
    gets a gradient; without it the views are background and nothing flows back."""
    from renderers.field import SphereField

    class OneSphere(SphereField):
        def __len__(self):
            return 1

    cfg = load([REPO / "configs" / "oracle.yaml"], [f"mesh.repair_empty={repair}"])
    radius = torch.tensor([5.0], requires_grad=True)  # bound 0.6: no zero crossing
    gen = torch.Generator().manual_seed(0)
    cams = sample_cameras(1, cfg.cameras, gen)
    out = mesh_branch(OneSphere(radius, bound=cfg.field.bound), cams, cfg.mesh, 16, (0.5,) * 3)
    assert out.regularizers["empty_meshes"].item() == 1.0
    mid = cfg.mesh.resolution // 2
    if repair:
        assert (out.views.mask[:, mid, mid] == 1).all()
        (grad,) = torch.autograd.grad(out.views.depth.sum(), radius)
        assert grad.abs().item() > 0
    else:
        assert out.views.mask.abs().max() == 0 and not out.views.depth.requires_grad
