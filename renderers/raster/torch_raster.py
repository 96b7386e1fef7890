"""Pure-torch rasterization and attribute interpolation with nvdiffrast's conventions.

Rasterization runs in two passes:

1. Visibility, without gradients: every triangle is tested against the pixel centres of
   its screen bounding box, in chunks of at most ``chunk_pairs`` (triangle, pixel) pairs
   so that memory stays bounded; the nearest fragment per pixel wins through one
   ``scatter_reduce(amin)`` on a 64-bit key (depth bits above, triangle index below, so
   depth ties go to the lower triangle index).
2. Barycentrics, with gradients: for the covered pixels only, the perspective-correct
   barycentrics of the winning triangle are recomputed from the clip positions, so u, v
   and z/w are differentiable with respect to ``pos`` while coverage is not.

Both passes use homogeneous 2D rasterization (Olano and Greer 1997): with the matrix
``M`` whose columns are the vertices' clip (x, y, w), the weights ``a = M^-1 (X, Y, 1)``
of an NDC pixel centre (X, Y) are the perspective-correct barycentrics scaled by
``1 / w`` of the surface point. A pixel is covered iff all three are >= 0, which also
handles triangles crossing the w = 0 plane without clipping: their part behind the
camera gets weights of mixed sign. Fragments with z/w outside [-1, 1] are discarded
(OpenGL's near/far clipping); triangles edge-on to the eye (det M = 0) are skipped.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_PAIRS = 1 << 20
"""(triangle, pixel) pairs tested at once: ~100 MB of temporaries in float32."""

_NO_HIT = torch.iinfo(torch.int64).max


def as_batched_pos(pos: torch.Tensor) -> torch.Tensor:
    """(V, 4) or (B, V, 4) clip positions -> (B, V, 4); a 2D input is one image."""
    if pos.ndim == 2:
        pos = pos[None]
    if pos.ndim != 3 or pos.shape[-1] != 4:
        raise ValueError(f"pos must be (V, 4) or (B, V, 4) clip positions, got {tuple(pos.shape)}")
    if not pos.is_floating_point():
        raise ValueError(f"pos must be a floating-point tensor, got {pos.dtype}")
    return pos


def check_tri(tri: torch.Tensor, n_verts: int) -> torch.Tensor:
    """Validate (F, 3) integer triangle indices and return them as int64."""
    if tri.ndim != 2 or tri.shape[1] != 3:
        raise ValueError(f"tri must be (F, 3), got {tuple(tri.shape)}")
    if tri.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"tri must be int32 (or int64), got {tri.dtype}")
    tri = tri.long()
    if tri.numel() and (int(tri.min()) < 0 or int(tri.max()) >= n_verts):
        raise ValueError(f"tri indices must lie in [0, {n_verts}), got [{tri.min()}, {tri.max()}]")
    return tri


def _sortable_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 with the same order (IEEE bits, negatives' magnitude flipped)."""
    bits = x.float().contiguous().view(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits.long()


def _visible_triangle(pos: torch.Tensor, tri: torch.Tensor, height: int, width: int, chunk: int):
    """Index of the nearest triangle per pixel, (B, H*W) int64, -1 on background.

    Pixel (row r, column c) has its centre at NDC (2(c+0.5)/W - 1, 2(r+0.5)/H - 1): row 0
    is the bottom of the image.
    """
    n_b, n_f = pos.shape[0], tri.shape[0]
    v = pos.double()[:, tri]  # (B,F,3,4)
    cols = v[..., [0, 1, 3]]  # (B,F,3,3): vertex j's homogeneous 2D point (x, y, w)
    # Rows of M^-1 (M = [P0 P1 P2] as columns) are the cross products of the other two.
    cof = torch.stack(
        [torch.linalg.cross(cols[:, :, (i + 1) % 3], cols[:, :, (i + 2) % 3]) for i in range(3)],
        dim=2,
    )  # (B,F,3,3)
    det = (cols[:, :, 0] * cof[:, :, 0]).sum(-1)  # (B,F)
    w = v[..., 3]
    ok = (det != 0) & (w > 0).any(-1)
    safe_det = torch.where(det != 0, det, torch.ones_like(det))
    coef = cof / safe_det[..., None, None]  # a_i = coef_i . (X, Y, 1)
    zcoef = (v[..., 2:3] * coef).sum(2)  # z/w = sum_i z_i a_i, (B,F,3)
    coef = torch.cat([coef, zcoef[:, :, None]], dim=2)  # (B,F,4,3)

    # Pixel bounding boxes; a triangle with a vertex at w <= 0 may cover any pixel.
    all_front = (w > 0).all(-1)
    w_safe = torch.where(w > 0, w, torch.ones_like(w))
    px = (v[..., 0] / w_safe + 1) * (width / 2) - 0.5
    py = (v[..., 1] / w_safe + 1) * (height / 2) - 0.5
    zs = v[..., 2] / w_safe
    x0 = torch.where(all_front, px.amin(-1).floor(), torch.zeros_like(det)).clamp(min=0)
    x1 = torch.where(all_front, px.amax(-1).ceil(), torch.full_like(det, width - 1))
    y0 = torch.where(all_front, py.amin(-1).floor(), torch.zeros_like(det)).clamp(min=0)
    y1 = torch.where(all_front, py.amax(-1).ceil(), torch.full_like(det, height - 1))
    x1, y1 = x1.clamp(max=width - 1), y1.clamp(max=height - 1)
    depth_out = all_front & ((zs > 1).all(-1) | (zs < -1).all(-1))
    ok = ok & (x1 >= x0) & (y1 >= y0) & ~depth_out
    bw = (x1 - x0 + 1).clamp(min=0)
    area = torch.where(ok, bw * (y1 - y0 + 1).clamp(min=0), torch.zeros_like(det)).long()

    # Fold pixel -> NDC and the bbox origin into the affine coefficients (float64), so the
    # float32 evaluation below works on small local offsets (no cancellation).
    ax = coef[..., 0] * (2.0 / width)
    ay = coef[..., 1] * (2.0 / height)
    c = coef[..., 2] + coef[..., 0] * (1.0 / width - 1) + coef[..., 1] * (1.0 / height - 1)
    c = c + ax * x0[..., None] + ay * y0[..., None]
    lin = torch.stack([ax, ay, c], dim=-1).float().reshape(n_b * n_f, 12)

    area = area.reshape(-1)
    keep = area.nonzero().squeeze(1)
    best = torch.full((n_b * height * width,), _NO_HIT, dtype=torch.int64, device=pos.device)
    if keep.numel() == 0:
        return torch.full((n_b, height * width), -1, dtype=torch.int64, device=pos.device)
    area_k = area[keep]
    start = torch.cumsum(area_k, 0) - area_k
    chunk_id = start // chunk
    bounds = torch.searchsorted(chunk_id, torch.unique_consecutive(chunk_id)).tolist()
    bounds.append(keep.numel())
    bw_k = bw.reshape(-1)[keep].long()
    base_k = (
        torch.div(keep, n_f, rounding_mode="floor") * (height * width)
        + y0.reshape(-1)[keep].long() * width
        + x0.reshape(-1)[keep].long()
    )
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        a = area_k[lo:hi]
        rep = torch.repeat_interleave(torch.arange(hi - lo, device=pos.device), a)
        local = torch.arange(rep.numel(), device=pos.device) - (torch.cumsum(a, 0) - a)[rep]
        bwr = bw_k[lo:hi][rep]
        ly = torch.div(local, bwr, rounding_mode="floor")
        lx = local - ly * bwr
        cf = lin[keep[lo:hi]][rep].view(-1, 4, 3)
        val = cf[..., 0] * lx[:, None] + cf[..., 1] * ly[:, None] + cf[..., 2]  # (P,4)
        inside = (val[:, :3] >= 0).all(1) & (val[:, 3] >= -1) & (val[:, 3] <= 1)
        idx = inside.nonzero().squeeze(1)
        pix = base_k[lo:hi][rep[idx]] + ly[idx] * width + lx[idx]
        tri_local = keep[lo:hi][rep[idx]] % n_f
        key = (_sortable_bits(val[idx, 3]) << 32) + tri_local
        best.scatter_reduce_(0, pix, key, reduce="amin")
    hit = best != _NO_HIT
    tri_id = torch.where(hit, best & 0xFFFFFFFF, torch.full_like(best, -1))
    return tri_id.view(n_b, height * width)


def _barycentrics(pos, tri, tri_id, height, width):
    """Differentiable (u, v, z/w, id + 1) and their screen derivatives for covered pixels."""
    n_b = pos.shape[0]
    hw = height * width
    flat_id = tri_id.reshape(-1)
    pix = (flat_id >= 0).nonzero().squeeze(1)
    t = flat_id[pix]
    b = torch.div(pix, hw, rounding_mode="floor")
    r = torch.div(pix - b * hw, width, rounding_mode="floor")
    col = pix - b * hw - r * width
    v = pos[b[:, None], tri[t]]  # (P,3,4)
    hom = v[..., [0, 1, 3]]  # (P,3,3)
    cof = torch.stack(
        [torch.linalg.cross(hom[:, (i + 1) % 3], hom[:, (i + 2) % 3]) for i in range(3)], dim=1
    )  # (P,3,3): a_i is proportional to cof_i . (X, Y, 1)
    nx = (2.0 * col.to(pos.dtype) + 1.0) / width - 1.0
    ny = (2.0 * r.to(pos.dtype) + 1.0) / height - 1.0
    n = cof[..., 0] * nx[:, None] + cof[..., 1] * ny[:, None] + cof[..., 2]  # (P,3)
    d = n.sum(1, keepdim=True)
    lam = n / d
    zw = (lam * v[..., 2]).sum(1) / (lam * v[..., 3]).sum(1)
    s = cof.sum(1)  # (P,3): d(d)/d(X, Y, 1)
    # d lambda_i / dX_ndc = (cof_i0 d - n_i s_0) / d^2, then NDC -> pixels.
    dl_dx = (cof[..., 0] * d - n * s[:, None, 0]) / d**2 * (2.0 / width)
    dl_dy = (cof[..., 1] * d - n * s[:, None, 1]) / d**2 * (2.0 / height)
    vals = torch.stack([lam[:, 1], lam[:, 2], zw, (t + 1).to(pos.dtype)], dim=1)
    dbs = torch.stack([dl_dx[:, 1], dl_dy[:, 1], dl_dx[:, 2], dl_dy[:, 2]], dim=1)
    zeros = pos.new_zeros(n_b * hw, 4)
    rast = zeros.index_copy(0, pix, vals).view(n_b, height, width, 4)
    rast_db = zeros.index_copy(0, pix, dbs).view(n_b, height, width, 4)
    return rast, rast_db


def rasterize(
    pos: torch.Tensor,
    tri: torch.Tensor,
    resolution: tuple[int, int],
    chunk_pairs: int = DEFAULT_CHUNK_PAIRS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rasterize triangles in OpenGL clip space (nvdiffrast's ``rasterize``).

    pos: (V, 4) or (B, V, 4) clip coordinates, float; a (V, 4) input gives B = 1.
    tri: (F, 3) int32 vertex indices, shared by the batch. resolution: (H, W).
    Returns ``rast`` (B, H, W, 4) = (u, v, z/w, triangle_id + 1), zeros on background,
    where u, v are the perspective-correct weights of the triangle's vertices 1 and 2, and
    ``rast_db`` (B, H, W, 4) = (du/dX, du/dY, dv/dX, dv/dY) per pixel (analytic). Both in
    pos' dtype; row 0 is the bottom of the image; no backface culling; nearest z/w wins.
    u, v, z/w (and rast_db) are differentiable with respect to pos; the id is not. The id
    channel is exact up to 2^24 triangles in float32.
    """
    pos = as_batched_pos(pos)
    tri = check_tri(tri, pos.shape[1])
    height, width = (int(s) for s in resolution)
    if height < 1 or width < 1:
        raise ValueError(f"resolution must be positive (H, W), got {resolution}")
    if chunk_pairs < 1:
        raise ValueError(f"chunk_pairs must be >= 1, got {chunk_pairs}")
    with torch.no_grad():
        tri_id = _visible_triangle(pos.detach(), tri, height, width, chunk_pairs)
    return _barycentrics(pos, tri, tri_id, height, width)


def interpolate(
    attr: torch.Tensor,
    rast: torch.Tensor,
    tri: torch.Tensor,
    rast_db: torch.Tensor | None = None,
    diff_attrs=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Interpolate vertex attributes over the rasterized triangles (nvdiffrast's op).

    attr: (V, C) or (B, V, C); rast: (B, H, W, 4) from ``rasterize``; tri: (F, 3).
    Returns ``out`` (B, H, W, C), zero on background, differentiable with respect to attr
    and rast's u, v; and ``out_da`` (B, H, W, 2*len(diff_attrs)) = (dA/dX, dA/dY) per
    selected attribute when ``diff_attrs`` is "all" or a sequence of channel indices (then
    ``rast_db`` is required), else None.
    """
    if rast.ndim != 4 or rast.shape[-1] != 4:
        raise ValueError(f"rast must be (B, H, W, 4), got {tuple(rast.shape)}")
    n_b, height, width, _ = rast.shape
    if attr.ndim == 2:
        attr_b = None
    elif attr.ndim == 3 and attr.shape[0] == n_b:
        attr_b = attr
    else:
        raise ValueError(f"attr must be (V, C) or ({n_b}, V, C), got {tuple(attr.shape)}")
    tri = check_tri(tri, attr.shape[-2])
    dtype = torch.promote_types(attr.dtype, rast.dtype)
    n_c = attr.shape[-1]
    flat = rast.reshape(-1, 4)
    ids = flat[:, 3].detach().round().long()
    pix = (ids > 0).nonzero().squeeze(1)
    vidx = tri[ids[pix] - 1]  # (P,3)
    if attr_b is None:
        a = attr[vidx]
    else:
        b = torch.div(pix, height * width, rounding_mode="floor")
        a = attr_b[b[:, None], vidx]  # (P,3,C)
    a = a.to(dtype)
    uv = flat[pix, :2].to(dtype)
    lam = torch.stack([1 - uv[:, 0] - uv[:, 1], uv[:, 0], uv[:, 1]], dim=1)
    vals = (lam[..., None] * a).sum(1)
    out = a.new_zeros(n_b * height * width, n_c).index_copy(0, pix, vals)
    out = out.view(n_b, height, width, n_c)
    if diff_attrs is None:
        return out, None
    if rast_db is None:
        raise ValueError("interpolate: diff_attrs needs rast_db (from rasterize)")
    chans = list(range(n_c)) if diff_attrs == "all" else [int(i) for i in diff_attrs]
    db = rast_db.reshape(-1, 4)[pix].to(dtype)
    sel = a[..., chans]  # (P,3,k)
    d_attr = []
    for du, dv in ((db[:, 0], db[:, 2]), (db[:, 1], db[:, 3])):  # d/dX, then d/dY
        dlam = torch.stack([-du - dv, du, dv], dim=1)
        d_attr.append((dlam[..., None] * sel).sum(1))
    da = torch.stack(d_attr, dim=-1).reshape(-1, 2 * len(chans))  # (dA0/dX, dA0/dY, ...)
    out_da = a.new_zeros(n_b * height * width, 2 * len(chans)).index_copy(0, pix, da)
    return out, out_da.view(n_b, height, width, -1)
