"""NeuS volume rendering of a field (Wang et al. 2021, "NeuS: Learning Neural Implicit
Surfaces by Volume Rendering for Multi-view Reconstruction").

Along a ray x(t) = o + t d (|d| = 1) NeuS turns the SDF f into opacities through the
logistic CDF Phi_s(x) = sigmoid(s x) (paper eq. 13):

    alpha_i = max((Phi_s(f(x(t_i))) - Phi_s(f(x(t_{i+1})))) / Phi_s(f(x(t_i))), 0)

Here s is fixed (docs/reference.md: inverse standard deviation about 100).
The renderer evaluates the
field once per section [t_i, t_{i+1}], at its midpoint m_i, and estimates the SDF at both
section ends from the first-order expansion f(m_i) -+ c_i delta_i / 2, with c_i the
directional derivative <grad f(m_i), d> clamped to <= 0 (only entering the surface makes
opacity; the paper's section estimate with the cosine fully annealed). For an exactly linear
SDF along the ray this is exact, and the transmittance telescopes to
Phi_s(f(end)) / Phi_s(f(start)).

Everything is done in log space: log(1 - alpha_i) = min(log Phi_s(f_next) - log Phi_s(f_prev),
0) and the transmittance is exp of its exclusive cumulative sum, which stays finite
and differentiable deep inside or far outside the surface (no 0/0 guard epsilon).

Samples per ray (docs/reference.md): ``n_uniform`` stratified samples on the ray's interval, then
``n_importance`` samples drawn (without gradient) by inverse-CDF sampling of the weights
that a coarse pass gives from the SDF at the uniform samples; all samples are then merged,
sorted and rendered with gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from renderers.cameras import Cameras, pixel_rays
from renderers.field import Field, sdf_and_normal
from renderers.grad_scale import scale_grad

WHITE = (1.0, 1.0, 1.0)
"""Background of a render that passes none (training passes its ``train.background``)."""


@dataclass(frozen=True)
class VolumeConfig:
    """NeuS renderer settings; defaults are the reference's (docs/reference.md, "Volume branch")."""

    n_uniform: int = 128
    """Stratified samples per ray over its interval (also the coarse pass)."""
    n_importance: int = 64
    """Samples per ray drawn from the coarse pass' weights."""
    near: float = 0.1
    """Smallest ray distance marched (world units)."""
    far: float = 4.0
    """Largest ray distance marched (world units)."""
    inv_std: float = 100.0
    """Fixed s of NeuS' logistic CDF sigmoid(s * sdf); larger means sharper surfaces."""
    resolution: int = 128
    """Side of the full square ray grid (pixels)."""
    patch_size: int = 40
    """Side of the full-resolution patch rendered per view in patch mode (<= resolution,
    checked when rendering patches so that full-grid previews may use any resolution)."""
    global_size: int = 42
    """Side of the coarse grid covering the whole image per view in patch mode."""
    chunk_rays: int = 4096
    """Rays per object rendered at once; bounds memory when no graph is kept (or with
    ``checkpoint_chunks``)."""
    checkpoint_chunks: bool = False
    """With gradients on, keep only each chunk's outputs and recompute its samples (field
    features, MLP activations, normals) in backward (``torch.utils.checkpoint``): the
    graph's memory becomes one chunk's plus the per-sample outputs, for one more field
    evaluation per sample in backward. The same values and gradients."""
    clip_to_bound: bool = True
    """March only where [near, far] meets the field's cube [-bound, bound]^3."""
    color_min_weight: float = 0.0
    """Evaluate colour only at samples whose weight exceeds this (others count as black,
    an error of at most their summed weight); 0 evaluates everywhere (exact)."""
    rgb_geometry_grad: float = 1.0
    """Scale of the gradient that the rendered colour passes to the geometry (the NeuS
    weights and opacity it is composited with); the colours' own gradient, and the mask,
    depth and normals, are untouched. 1: the reference's. Below 1 the RGB teachers move
    the surface less than the normal-depth teacher does, as the reference's mesh branch
    scales its SDF gradients by 0.001."""

    def __post_init__(self):
        if self.n_uniform < 2:
            raise ValueError(f"n_uniform must be >= 2, got {self.n_uniform}")
        if self.n_importance < 0:
            raise ValueError(f"n_importance must be >= 0, got {self.n_importance}")
        if not 0.0 <= self.near < self.far:
            raise ValueError(f"need 0 <= near < far, got near={self.near}, far={self.far}")
        if self.inv_std <= 0:
            raise ValueError(f"inv_std must be > 0, got {self.inv_std}")
        if self.resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.global_size < 1:
            raise ValueError(f"global_size must be >= 1, got {self.global_size}")
        if not 0.0 <= self.color_min_weight < 1.0:
            raise ValueError(f"color_min_weight must lie in [0, 1), got {self.color_min_weight}")
        if not 0.0 <= self.rgb_geometry_grad <= 1.0:
            raise ValueError(f"rgb_geometry_grad must lie in [0, 1], got {self.rgb_geometry_grad}")
        if self.chunk_rays < 1:
            raise ValueError(f"chunk_rays must be >= 1, got {self.chunk_rays}")


@dataclass
class VolumeRender:
    """Per-ray NeuS outputs for B objects with R rays each and S = n_uniform + n_importance
    samples per ray. Colours and normals are composited over the background / zero."""

    rgb: torch.Tensor
    """(B, R, 3) colour over the background, in [0, 1]."""
    opacity: torch.Tensor
    """(B, R) 1 - transmittance through the ray = sum(w) up to rounding, in [0, 1]."""
    depth: torch.Tensor
    """(B, R) sum(w * t): expected ray distance composited over 0 (divide by opacity for
    the distance to the surface)."""
    normal: torch.Tensor
    """(B, R, 3) sum(w * n): world-space unit normals composited over 0 (unit length where
    opacity is 1)."""
    t: torch.Tensor
    """(B, R, S) ray distances of the section midpoints where the field was evaluated."""
    weights: torch.Tensor
    """(B, R, S) NeuS weights w = T * alpha."""
    sdf: torch.Tensor
    """(B, R, S) SDF at the samples (for a sparsity loss)."""
    grad_norm: torch.Tensor
    """(B, R, S) |grad sdf| at the samples (for the eikonal loss)."""
    ray_valid: torch.Tensor
    """(B, R) bool: the ray meets the marched region; mask regularizers with it."""


def ray_interval(origins, dirs, cfg: VolumeConfig, bound: float | None):
    """Ray distances (t_near, t_far), each (B, R), of [near, far] met with the cube
    [-bound, bound]^3 (slab test); rays that miss get an empty interval t_far = t_near,
    which renders as transparent. ``bound=None`` keeps [near, far]."""
    t_near = torch.full_like(origins[..., 0], cfg.near)
    t_far = torch.full_like(origins[..., 0], cfg.far)
    if bound is not None:
        # A zero component would give 0 * inf = nan at a slab face; a tiny one is harmless.
        safe = torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)
        t0 = (-bound - origins) / safe
        t1 = (bound - origins) / safe
        t_near = torch.maximum(t_near, torch.minimum(t0, t1).amax(dim=-1))
        t_far = torch.minimum(t_far, torch.maximum(t0, t1).amin(dim=-1))
    t_far = torch.maximum(t_far, t_near)
    return t_near, t_far


def _uniforms(shape, generator, like: torch.Tensor) -> torch.Tensor:
    """U[0, 1) numbers drawn on the generator's device (CPU for the default), so results
    do not depend on where the rays live."""
    dev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(shape, generator=generator, device=dev, dtype=torch.float64)
    return u.to(device=like.device, dtype=like.dtype)


def _log_transmittance_steps(f_prev: torch.Tensor, f_next: torch.Tensor, s: float):
    """log(1 - alpha) = min(log Phi_s(f_next) - log Phi_s(f_prev), 0), elementwise."""
    return (F.logsigmoid(s * f_next) - F.logsigmoid(s * f_prev)).clamp(max=0.0)


def _weights(log1m_alpha: torch.Tensor):
    """NeuS / volume weights T_i * alpha_i from log(1 - alpha) along the last dim, and the
    opacity 1 - T_end (exactly within [0, 1], unlike the rounded sum of the weights)."""
    cum = torch.cumsum(log1m_alpha, dim=-1)
    log_t = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)
    return torch.exp(log_t) * -torch.expm1(log1m_alpha), -torch.expm1(cum[..., -1])


def sample_pdf(edges: torch.Tensor, weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF samples of a piecewise-constant density.

    edges: (..., K+1) increasing bin edges; weights: (..., K) >= 0 bin masses (a small
    floor keeps empty rays uniform); u: (..., n) in [0, 1). Returns (..., n) positions,
    sorted where u is sorted. Not differentiable (used under no_grad).
    """
    w = weights + 1e-5
    pdf = w / w.sum(dim=-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[..., :1]), torch.cumsum(pdf, dim=-1)], dim=-1)
    k = weights.shape[-1]
    idx = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True).clamp(1, k)
    c_lo, c_hi = cdf.gather(-1, idx - 1), cdf.gather(-1, idx)
    e_lo, e_hi = edges.gather(-1, idx - 1), edges.gather(-1, idx)
    span = c_hi - c_lo
    frac = torch.where(span > 1e-12, (u - c_lo) / span.clamp(min=1e-12), torch.zeros_like(u))
    return e_lo + frac.clamp(0.0, 1.0) * (e_hi - e_lo)


def _colors(field, pts: torch.Tensor, w: torch.Tensor, min_weight: float) -> torch.Tensor:
    """(B, N, 3) colours at pts (B, N, 3); with min_weight > 0 only samples of weight
    above it are evaluated (padded to the same count per object), the rest are 0."""
    if min_weight <= 0.0:
        return field.color(pts)
    b = pts.shape[0]
    keep = w.detach().reshape(b, -1) > min_weight
    k = int(keep.sum(dim=1).max())
    out = torch.zeros_like(pts)
    if k == 0:
        return out
    # Kept samples first (stable: in ray order); other objects' padding is real samples.
    idx = torch.argsort(keep.to(torch.uint8), dim=1, descending=True, stable=True)[:, :k]
    idx3 = idx[..., None].expand(-1, -1, 3)
    return out.scatter(1, idx3, field.color(pts.gather(1, idx3)))


def _march(field, o, d, t_near, t_far, jitter, u_imp, background, cfg, create_graph):
    """Render one chunk: o, d (B, R, 3); t_near, t_far (B, R); jitter (B, R, n_uniform) in
    [0, 1) (0.5 = midpoints); u_imp (B, R, n_importance); background (B, R, 3)."""
    b, r, _ = o.shape
    s = cfg.inv_std
    span = (t_far - t_near)[..., None]
    steps = torch.arange(cfg.n_uniform, device=o.device, dtype=o.dtype)
    t_uni = t_near[..., None] + span * (steps + jitter) / cfg.n_uniform  # (B,R,Nu)
    at = lambda t: (o[:, :, None, :] + d[:, :, None, :] * t[..., None]).reshape(b, -1, 3)

    if cfg.n_importance > 0:
        # Coarse pass (no gradient): the paper's discrete alpha between uniform samples.
        with torch.no_grad():
            f_uni = field.sdf(at(t_uni)).reshape(b, r, -1)
            w_uni, _ = _weights(_log_transmittance_steps(f_uni[..., :-1], f_uni[..., 1:], s))
            t_imp = sample_pdf(t_uni, w_uni, u_imp)
        t_all, _ = torch.sort(torch.cat([t_uni, t_imp], dim=-1), dim=-1)
    else:
        t_all = t_uni
    t_all = t_all.detach()
    # Sections [t_i, t_{i+1}], the last one closed by t_far; evaluated at midpoints.
    ends = torch.cat([t_all[..., 1:], t_far[..., None]], dim=-1)
    delta = (ends - t_all).clamp(min=0.0)
    mid = t_all + 0.5 * delta
    pts = at(mid)

    grad_on = torch.is_grad_enabled()
    # with grad on, the SDF keeps its graph; the gradient keeps one only with create_graph
    f, grad = sdf_and_normal(field, pts, create_graph=create_graph and grad_on)
    if not grad_on:
        f, grad = f.detach(), grad.detach()
    f = f.reshape(b, r, -1)
    grad = grad.reshape(b, r, -1, 3)

    slope = (grad * d[:, :, None, :]).sum(dim=-1).clamp(max=0.0)  # d f / d t, entering only
    f_prev = f - 0.5 * slope * delta
    f_next = f + 0.5 * slope * delta
    w, opacity = _weights(_log_transmittance_steps(f_prev, f_next, s))
    rgb = _colors(field, pts, w, cfg.color_min_weight).reshape(b, r, -1, 3)
    grad_norm = grad.norm(dim=-1)
    unit = grad / grad_norm.clamp(min=1e-12)[..., None]
    w_rgb, opacity_rgb = w, opacity
    if cfg.rgb_geometry_grad != 1.0:
        w_rgb = scale_grad(w, cfg.rgb_geometry_grad)
        opacity_rgb = scale_grad(opacity, cfg.rgb_geometry_grad)
    return VolumeRender(
        rgb=(w_rgb[..., None] * rgb).sum(dim=-2) + (1.0 - opacity_rgb)[..., None] * background,
        opacity=opacity,
        depth=(w * mid).sum(dim=-1),
        normal=(w[..., None] * unit).sum(dim=-2),
        t=mid,
        weights=w,
        sdf=f,
        grad_norm=grad_norm,
        ray_valid=t_far > t_near,
    )


def _checkpointed_march(field, *args) -> VolumeRender:
    """``_march`` whose activations are recomputed in backward (``checkpoint_chunks``);
    it draws no random numbers, so the recomputation is exact."""
    names = list(VolumeRender.__dataclass_fields__)

    def run(*xs):
        out = _march(field, *xs)
        return tuple(getattr(out, k) for k in names)

    outs = torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)
    return VolumeRender(**dict(zip(names, outs, strict=True)))


def _background(background, like: torch.Tensor) -> torch.Tensor:
    """Background (None: white) broadcast to like's (B, R, 3), in like's dtype and device;
    ValueError unless its values lie in [0, 1]."""
    if background is None:
        background = WHITE
    bg = torch.as_tensor(background, dtype=like.dtype, device=like.device)
    if bg.shape[-1:] != (3,) or not bool(((bg >= 0) & (bg <= 1)).all()):
        raise ValueError(f"background must be RGB values in [0, 1], got {background}")
    if bg.ndim == 2:  # (B, 3): one colour per object
        bg = bg[:, None, :]
    try:
        return bg.expand(like.shape)
    except RuntimeError as err:
        raise ValueError(
            f"background of shape {tuple(bg.shape)} does not broadcast to rays {tuple(like.shape)}"
        ) from err


def render_rays(
    field: Field,
    origins: torch.Tensor,
    dirs: torch.Tensor,
    cfg: VolumeConfig,
    background=None,
    generator: torch.Generator | None = None,
    create_graph: bool = True,
) -> VolumeRender:
    """NeuS render of B objects' rays.

    origins, dirs: (B, R, 3) world space, dirs of unit length, in the field's dtype/device;
    ray set b is drawn with object b. background: None (white), (3,), (B, 3) or
    (B, R, 3) RGB in [0, 1]. generator: jitters the uniform samples and the importance
    draws; None renders deterministically (bin midpoints, evenly spaced quantiles).
    create_graph: keep the SDF gradients (normals, eikonal, NeuS' slope) differentiable, as
    training needs; ignored under torch.no_grad. Rays are chunked by ``cfg.chunk_rays``;
    random numbers are drawn for all rays first, so results do not depend on the chunking.
    """
    if origins.shape != dirs.shape or origins.ndim != 3 or origins.shape[-1] != 3:
        raise ValueError(
            f"origins and dirs must both be (B, R, 3), got {tuple(origins.shape)} "
            f"and {tuple(dirs.shape)}"
        )
    b, r, _ = origins.shape
    bg = _background(background, origins)
    t_near, t_far = ray_interval(origins, dirs, cfg, field.bound if cfg.clip_to_bound else None)
    if generator is None:
        jitter = torch.full((b, r, cfg.n_uniform), 0.5, dtype=origins.dtype, device=origins.device)
        q = torch.arange(cfg.n_importance, dtype=origins.dtype, device=origins.device) + 0.5
        u_imp = (q / max(cfg.n_importance, 1)).expand(b, r, -1)
    else:
        jitter = _uniforms((b, r, cfg.n_uniform), generator, origins)
        q = torch.arange(cfg.n_importance, dtype=origins.dtype, device=origins.device)
        u_imp = (q + _uniforms((b, r, cfg.n_importance), generator, origins)) / max(
            cfg.n_importance, 1
        )
    per_ray = (origins, dirs, t_near, t_far, jitter, u_imp, bg)
    march = _march
    if cfg.checkpoint_chunks and torch.is_grad_enabled():
        march = _checkpointed_march
    parts = [
        march(field, *(x[:, lo : lo + cfg.chunk_rays] for x in per_ray), cfg, create_graph)
        for lo in range(0, r, cfg.chunk_rays)
    ]
    if len(parts) == 1:
        return parts[0]
    names = VolumeRender.__dataclass_fields__
    return VolumeRender(**{k: torch.cat([getattr(p, k) for p in parts], dim=1) for k in names})


@dataclass
class ViewMaps:
    """Per-view images, (N, h, w, C), row 0 at the top (``renderers.cameras``)."""

    rgb: torch.Tensor
    """(N, h, w, 3) colour over the background, in [0, 1]."""
    opacity: torch.Tensor
    """(N, h, w, 1) in [0, 1]."""
    depth: torch.Tensor
    """(N, h, w, 1) expected ray distance composited over 0 (world units)."""
    depth_normalized: torch.Tensor
    """(N, h, w, 1) in [0, 1]: (far_c - t) / (far_c - near_c) composited over 0, with
    near_c, far_c = |camera| -+ bound * sqrt(3) (the cube's extent seen from the camera,
    as RichDreamer's depth); 1 is near, 0 far and background. Teachers map it x2-1."""
    normal: torch.Tensor
    """(N, h, w, 3) camera-space normals (x right, y up, z backward) composited over 0."""


@dataclass
class VolumeImages:
    """``render_views`` result: the rendered grid(s) and the per-ray data behind them."""

    images: ViewMaps
    """Mode "full": the resolution x resolution grid; mode "patch": the full-resolution
    patch_size x patch_size window of each view."""
    coarse: ViewMaps | None
    """Mode "patch": the global_size x global_size grid covering each whole view."""
    offsets: torch.Tensor | None
    """Mode "patch": (N, 2) long, (row, column) of each patch's top-left pixel in the
    full grid."""
    rays: VolumeRender
    """The B objects' per-ray render (sdf and grad_norm feed the sparsity / eikonal
    losses); rays of object b are its views' images flattened in order (patch then
    coarse per view in patch mode)."""


def _maps(out: VolumeRender, cameras: Cameras, n: int, h: int, w: int, bound: float, idx):
    """Cut a (B, V*R_v) render into view images; idx selects each view's rays of R_v."""
    view = lambda x: x.reshape(n, -1, *x.shape[2:])[:, idx]
    opacity, depth = view(out.opacity), view(out.depth)
    w2c_rot = cameras.c2w[:, :3, :3].transpose(1, 2)
    normal = torch.einsum("nij,nrj->nri", w2c_rot, view(out.normal))
    dist = cameras.position.norm(dim=-1)[:, None]
    near_c, far_c = dist - bound * math.sqrt(3.0), dist + bound * math.sqrt(3.0)
    depth_n = (far_c * opacity - depth) / (far_c - near_c)
    img = lambda x: x.reshape(n, h, w, -1)
    return ViewMaps(img(view(out.rgb)), img(opacity), img(depth), img(depth_n), img(normal))


def render_views(
    field: Field,
    cameras: Cameras,
    cfg: VolumeConfig,
    views_per_object: int,
    generator: torch.Generator | None = None,
    mode: Literal["full", "patch"] = "full",
    background=None,
    patch_offsets: torch.Tensor | None = None,
    create_graph: bool = True,
) -> VolumeImages:
    """NeuS images of B objects, ``views_per_object`` views each.

    cameras: B * views_per_object cameras, views of one object contiguous (as
    ``sample_cameras``), in the field's dtype/device. background: None (white), (3,) or (N, 3) per
    view, or a callable mapping each object's ray directions (B, R, 3) to colours
    (B, R, 3) (a learned background). generator: sample jitter and patch positions; None
    renders deterministically and draws patch positions from torch's global generator.
    patch_offsets: (N, 2) (row, col) patch corners to use instead of random ones (patch
    mode).
    """
    n, v, res = len(cameras), views_per_object, cfg.resolution
    if v < 1 or n % v:
        raise ValueError(f"{n} cameras are not a whole number of objects of {v} views")
    dev, dt = cameras.device, cameras.c2w.dtype
    if mode == "full":
        o, d = pixel_rays(cameras, res, res)
        o, d = o.reshape(n, -1, 3), d.reshape(n, -1, 3)
        offsets = None
    elif mode == "patch":
        p, g = cfg.patch_size, cfg.global_size
        if p > res:
            raise ValueError(f"patch_size={p} exceeds the ray grid's resolution={res}")
        if patch_offsets is None:
            cpu = generator.device if generator is not None else torch.device("cpu")
            offsets = torch.randint(0, res - p + 1, (n, 2), generator=generator, device=cpu)
        else:
            offsets = torch.as_tensor(patch_offsets)
            if offsets.shape != (n, 2) or bool(((offsets < 0) | (offsets > res - p)).any()):
                raise ValueError(
                    f"patch_offsets must be (N={n}, 2) in [0, {res - p}], got {offsets.tolist()}"
                )
        offsets = offsets.to(device=dev, dtype=torch.long)
        # Patches first: each view's own window of the full grid, ray by ray.
        o_full, d_full = pixel_rays(cameras, res, res)
        span = torch.arange(p, device=dev)
        rows = (offsets[:, 0:1] + span)[:, :, None]
        cols = (offsets[:, 1:2] + span)[:, None, :]
        views = torch.arange(n, device=dev)[:, None, None]
        o_p, d_p = o_full[views, rows, cols], d_full[views, rows, cols]
        coarse = (torch.arange(g, device=dev, dtype=dt) + 0.5) * res / g - 0.5
        o_g, d_g = pixel_rays(cameras, res, res, rows=coarse, cols=coarse)
        o = torch.cat([o_p.reshape(n, -1, 3), o_g.reshape(n, -1, 3)], dim=1)
        d = torch.cat([d_p.reshape(n, -1, 3), d_g.reshape(n, -1, 3)], dim=1)
    else:
        raise ValueError(f'mode must be "full" or "patch", got {mode!r}')

    b = n // v
    if callable(background):
        bg = background(d.reshape(b, -1, 3))
    else:
        bg = _background(background, o)  # per view
    out = render_rays(
        field,
        o.reshape(b, -1, 3),
        d.reshape(b, -1, 3),
        cfg,
        background=bg.reshape(b, -1, 3),
        generator=generator,
        create_graph=create_graph,
    )
    if mode == "full":
        images = _maps(out, cameras, n, res, res, field.bound, slice(None))
        return VolumeImages(images, None, None, out)
    images = _maps(out, cameras, n, p, p, field.bound, slice(0, p * p))
    coarse_maps = _maps(out, cameras, n, g, g, field.bound, slice(p * p, None))
    return VolumeImages(images, coarse_maps, offsets, out)
