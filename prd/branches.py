"""Dual rendering (docs/rendering.md): the volume and mesh branches of one progressive
step, each turned into the ``teachers.base.Views`` that the teachers score.

Volume branch: NeuS in patch mode; the coarse global grid is upsampled to the full ray
grid and the full-resolution patch pasted over it (so the teacher sees one full image in
which the patch carries sharp gradients). Its colour gradient is scaled by a decaying
factor; its per-sample SDF gradients feed the eikonal loss, its opacity the sparsity loss.

Mesh branch: marching cubes on the deformable grid, rasterized RGB / mask / depth /
normals; SDF gradients arriving through it are scaled (docs/reference.md, "Mesh branch": 0.001).

``render_branches`` runs both for one progressive step and ``score_branches`` hands their
views to every teacher: the training loop (``prd.train``) and the full-size benchmark
(``bench.full_size``) share them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from prd.losses import eikonal_loss, sparsity_loss
from renderers.cameras import Cameras, pixel_rays
from renderers.grad_scale import scale_grad
from renderers.isosurface import evaluate_grid, extract_surface
from renderers.mesh import MeshRenderConfig, render_mesh
from renderers.raster import get_backend
from renderers.volume import ViewMaps, VolumeConfig, render_views
from teachers.base import GuidanceOut, Views

if TYPE_CHECKING:
    from prd.config import Config
    from prd.teacher_setup import RoleTeachers


@dataclass
class BranchOut:
    views: Views
    regularizers: dict[str, torch.Tensor]


def paste_patch(coarse: torch.Tensor, patch: torch.Tensor, offsets: torch.Tensor, res: int):
    """(N, g, g, C) coarse grid upsampled to (N, res, res, C) with the (N, p, p, C) patch
    pasted at ``offsets`` (N, 2) = (row, col) of its top-left pixel."""
    n, p = patch.shape[0], patch.shape[1]
    full = F.interpolate(
        coarse.permute(0, 3, 1, 2), size=(res, res), mode="bilinear", align_corners=False
    ).permute(0, 2, 3, 1)
    span = torch.arange(p, device=patch.device)
    rows = (offsets[:, 0:1] + span)[:, :, None].expand(n, p, p)
    cols = (offsets[:, 1:2] + span)[:, None, :].expand(n, p, p)
    views = torch.arange(n, device=patch.device)[:, None, None].expand(n, p, p)
    return full.index_put((views, rows, cols), patch)


def _z_scale(cameras: Cameras, res: int, rows=None, cols=None) -> torch.Tensor:
    """(N, h, w, 1) cosine between each pixel's ray and the view axis: ray distance times
    it is the camera-space z-depth that ``Views.depth`` holds."""
    _, d = pixel_rays(cameras, res, res, rows=rows, cols=cols)
    axis = -cameras.c2w[:, :3, 2]  # the viewing direction
    return (d * axis[:, None, None, :]).sum(-1, keepdim=True)


def _surface_depth(maps: ViewMaps, cos: torch.Tensor) -> torch.Tensor:
    return maps.depth / maps.opacity.clamp_min(1e-4) * cos


def volume_branch(
    field,
    cameras: Cameras,
    cfg: VolumeConfig,
    views_per_object: int,
    generator: torch.Generator,
    background: torch.Tensor,
    color_grad_scale: float,
) -> BranchOut:
    """NeuS patch render of B objects -> Views at cfg.resolution, plus eikonal/sparsity.
    background: an RGB colour (3,) or a learned background (``LearnedBackground.bind``)."""
    vol = render_views(
        field, cameras, cfg, views_per_object, generator, mode="patch", background=background
    )
    res, g = cfg.resolution, cfg.global_size
    coarse_idx = (torch.arange(g, device=cameras.device, dtype=cameras.c2w.dtype) + 0.5) * res / g
    cos_g = _z_scale(cameras, res, coarse_idx - 0.5, coarse_idx - 0.5)
    cos_full = _z_scale(cameras, res)
    p = cfg.patch_size
    span = torch.arange(p, device=cameras.device)
    n = len(cameras)
    rows = (vol.offsets[:, 0:1] + span)[:, :, None].expand(n, p, p)
    cols = (vol.offsets[:, 1:2] + span)[:, None, :].expand(n, p, p)
    cos_p = cos_full[torch.arange(n)[:, None, None], rows, cols]

    def full(coarse: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        return paste_patch(coarse, patch, vol.offsets, res)

    rgb = full(vol.coarse.rgb, vol.images.rgb)
    views = Views(
        rgb=scale_grad(rgb, color_grad_scale),
        mask=full(vol.coarse.opacity, vol.images.opacity)[..., 0],
        depth=full(_surface_depth(vol.coarse, cos_g), _surface_depth(vol.images, cos_p))[..., 0],
        normal=F.normalize(full(vol.coarse.normal, vol.images.normal), dim=-1, eps=1e-6),
        cameras=cameras,
        views_per_object=views_per_object,
    )
    regs = {
        "eikonal": eikonal_loss(vol.rays.grad_norm, vol.rays.ray_valid),
        "sparsity": sparsity_loss(vol.rays.opacity),
    }
    return BranchOut(views, regs)


def mesh_branch(field, cameras: Cameras, cfg: MeshRenderConfig, grid: int, background) -> BranchOut:
    """Marching cubes (grid^3, differentiable vertices) + rasterized views -> Views.

    SDF and deformation gradients arriving through the vertices are scaled by
    cfg.grad_scale (docs/reference.md: 0.001); the texture field's gradient is not. An object whose
    SDF has no zero crossing gets the reference's repaired surface (cfg.repair_empty) or
    renders as background; ``empty_meshes`` counts them either way."""
    n_obj = len(field)
    with torch.no_grad():
        values = evaluate_grid(
            field, grid, n_objects=n_obj, deformation=False, device=cameras.c2w.device
        )
    meshes = extract_surface(
        field,
        grid,
        n_objects=n_obj,
        grid=values,
        with_grad=True,
        repair_empty=cfg.repair_empty,
        method=cfg.isosurface,
    )
    verts = [scale_grad(m.verts, cfg.grad_scale) for m in meshes]
    faces = [m.faces for m in meshes]
    out = render_mesh(
        verts,
        faces,
        field,
        cameras,
        cfg.resolution,
        get_backend(cfg.backend),
        background=background if callable(background) else tuple(float(c) for c in background),
        view_chunk=cfg.view_chunk,
    )
    cover = out.mask.clamp_min(1e-4)
    depth = out.far - out.depth / cover * (out.far - out.near)
    views = Views(
        rgb=out.rgb,
        mask=out.mask,
        depth=depth,
        normal=F.normalize(out.normal, dim=-1, eps=1e-6),
        cameras=cameras,
        views_per_object=len(cameras) // n_obj,
    )
    return BranchOut(
        views, {"empty_meshes": torch.tensor(float(sum(m.empty or m.repaired for m in meshes)))}
    )


def render_branches(
    field,
    cameras: Cameras,
    cfg: Config,
    generator: torch.Generator,
    background,
    step: int,
    on_branch: Callable[[str], None] | None = None,
) -> dict[str, BranchOut]:
    """One progressive step's renders: {"volume": ..., "mesh": ...} (the mesh branch when
    cfg.mesh.enabled), in that order, the volume branch's colour gradient scaled by
    cfg.train.volume_color_grad at ``step``. ``on_branch(name)`` after each (a benchmark's
    phase hook)."""
    volume = volume_branch(
        field,
        cameras,
        cfg.volume,
        cfg.cameras.n_views,
        generator,
        background,
        cfg.train.volume_color_grad.at(step),
    )
    branches = {"volume": volume}
    if on_branch:
        on_branch("volume")
    if cfg.mesh.enabled:
        branches["mesh"] = mesh_branch(field, cameras, cfg.mesh, cfg.mesh_grid, background)
        if on_branch:
            on_branch("mesh")
    return branches


@dataclass
class Scores:
    """Every teacher's loss on every branch of one progressive step."""

    loss: torch.Tensor
    """() what to backpropagate: the gradients of the sum of the teachers' losses."""
    value: torch.Tensor
    """() that sum (detached), added in the order of ``losses``."""
    losses: dict[tuple[str, str], torch.Tensor]
    """(teacher, branch) -> that teacher's loss on that branch (detached)."""
    outputs: dict[tuple[str, str], GuidanceOut]
    """(teacher, branch) -> the teacher's whole answer, when asked (``keep_outputs``: to
    show its target, which a latent teacher decodes on access)."""


def score_branches(
    branches: dict[str, BranchOut],
    teachers: list[RoleTeachers],
    prompts: list[str],
    step: int,
    generator: torch.Generator,
    early_grads: bool = True,
    keep_outputs: bool = False,
    on_score: Callable[[str, str], None] | None = None,
    offload: bool = False,
) -> Scores:
    """Every teacher on every branch (branch by branch, teachers in order: the order they
    draw from ``generator``); ``on_score(teacher, branch)`` after each call.

    early_grads: each teacher sees detached copies of the renders, and the gradient of its
    loss with respect to them is taken right after its call, which frees the teacher's
    graph (e.g. its checkpointed VAE encoder's); ``loss`` carries it on as
    sum(render x gradient), whose gradients are the teachers' (to float rounding). Only
    one teacher graph is then alive at a time instead of all of them until the backward.
    False: ``loss`` is the sum of the losses themselves.

    offload (``teachers.offload``): teacher by teacher instead, each on every branch in
    order, so a role with host-held weights (``RoleTeachers.host``) is copied to the
    device once, before its first call, and dropped from it after its last gradient. The
    random numbers then come in that order: the same draws as scoring each teacher alone
    in turn, not the branch-by-branch run's. A kept output's target is decoded while its
    teacher is on the device. Needs early_grads (ValueError): a graph kept to the
    backward would hold the device copies of the weights."""
    if offload and not early_grads:
        raise ValueError(
            "teachers.offload needs each teacher's gradient taken right after its call "
            "(early_grads=True): a teacher graph kept until the backward holds its weights "
            "on the device"
        )
    device = next(iter(branches.values())).views.rgb.device
    loss = torch.zeros((), device=device)
    value = torch.zeros((), device=device)
    losses, outputs = {}, {}
    if offload:
        calls = [(t, b) for t in teachers for b in branches]
    else:
        calls = [(t, b) for b in branches for t in teachers]
    for i, (teacher, branch) in enumerate(calls):
        host = teacher.host if offload else None
        if host is not None and not host.resident:
            host.to_device()
        views = branches[branch].views
        names = [n for n in ("rgb", "mask", "depth", "normal") if getattr(views, n).requires_grad]
        score = teacher.for_branch(branch)
        if early_grads:
            cut = {n: getattr(views, n).detach().requires_grad_(True) for n in names}
            g = score(dataclasses.replace(views, **cut), prompts, step, generator)
            if g.loss.requires_grad:
                grads = torch.autograd.grad(g.loss, list(cut.values()), allow_unused=True)
                for n, d in zip(names, grads, strict=True):
                    if d is not None:
                        loss = loss + (getattr(views, n) * d).sum()
        else:
            g = score(views, prompts, step, generator)
            loss = loss + g.loss
        key = (teacher.name, branch)
        losses[key] = g.loss.detach()
        value = value + losses[key]
        if keep_outputs:
            if host is not None:  # decode now: the VAE leaves the device below
                target = g.target
                g = dataclasses.replace(g, to_image=lambda _x0, target=target: target)
            outputs[key] = g
        if on_score:
            on_score(*key)
        if host is not None and (i + 1 == len(calls) or calls[i + 1][0] is not teacher):
            host.to_host()  # its last gradient is taken: the device copy goes
    return Scores(loss, value, losses, outputs)
