"""Analytic antialiasing of silhouette edges (Laine et al. 2020, "Modular Primitives for
High-Performance Differentiable Rendering", section on the antialiasing primitive).

Rasterized coverage is a step function of vertex positions, so it has no useful gradient.
The antialias op gives visibility gradients by turning each silhouette crossing between
two neighbouring pixel centres into a blend that moves continuously with the edge.

Detection. For every pair of horizontally or vertically adjacent pixels whose triangle ids
differ, take the triangle in front (the one covering a pixel, nearer by z/w at its own
pixel centre). If the segment between the two centres leaves that triangle through a
*silhouette* edge (an edge with one adjacent triangle, more than two, or two facing
opposite ways on screen), let ``t`` in [0, 1) be where it crosses, measured from the front
pixel's centre in units of the pixel spacing (a front centre exactly on the edge, t = 0,
counts: it is half covered).

Pair direction. Each edge is sampled by one pair direction only, the one running most
nearly across it: an edge at least as tall as wide on screen (in pixels) by horizontal
pairs, a flatter one by vertical pairs. A steep edge then meets exactly one horizontal pair
per pixel row it spans, and the pairs' crossings ``x(row)`` sample the edge at row
centres: the front triangle's coverage of each row is ``x(row)`` to pixel accuracy, so the
summed coverage is the midpoint rule of the area integral, exact for a straight edge
crossing whole rows. Sampling an edge with both directions would count it twice: for an
edge at angle ``a`` from the vertical, moving it by ``d`` along its normal moves each row
crossing by ``d / cos a``, and a unit length of edge spans ``cos a`` rows, so the rows
alone give ``d`` per unit length, the area's derivative; the columns (``d / sin a`` over
``sin a`` columns) give it again (the 2.0x once measured on slanted edges).
An edge at exactly 45 degrees goes to horizontal pairs (nvdiffrast's kernel accepts it in
both directions; a measure-zero difference that would double its gradient).

Blend. The front triangle covers a 1D share ``t + 0.5`` of the two pixels' span, and the
colours are blended to match: if ``t < 0.5`` the front pixel takes ``(0.5 - t)`` of the
other pixel's colour, else the other pixel takes ``(t - 0.5)`` of the front's. The pair's
sum thus moves linearly with the crossing, slope ``c_front - c_other`` per pixel.

Gradient. ``t`` is a differentiable function of the edge's projected vertices, so the
gradient of an image sum with respect to ``pos`` is the derivative of the midpoint-rule
area: per row, the crossing moves with the edge's vertices in proportion (1 - s) and s to
where along the edge it lies, which sums to ``0.5 * perp(v_next - v_prev)`` per vertex,
the derivative of a polygon's area. It is exact for a straight edge across the image at
any angle; at a polygon's corners a bounded number of rows is missed or cut, so a single
triangle's gradient is off by ~3% at 64 px (median; up to ~8%) and ~1.5% at 128 px.
Per pixel the blend is a 1D approximation of box-filtered coverage: a slanted edge's
row coverage lands on one pixel of the pair where a box filter spreads it over the pixels
the edge passes through. Against exact box coverage (``python -m bench.raster
--accuracy``) the largest per-pixel error is 0.02 at 10 and 80 degrees, 0.07 at 30 and 60,
0.10 at 40 and 50; sums over an edge's pixels stay exact.

Limitation (inherent to the pair-based test, and documented by nvdiffrast): only the
edges of the triangle covering the front pixel are examined, so where the triangle
holding a silhouette edge is thinner than a pixel on screen (grazing rims of fine meshes
at low resolution) the crossing is missed and the visibility gradient shrinks. The
derivative of an icosphere's antialiased mask area with respect to its scale keeps, at
64 px: 92% (20 faces), 57% (80), 33% (320), 8% (1280); 80 faces keep 70% at 128 px,
82% at 256 px, 91% at 512 px.
"""

from __future__ import annotations

import torch

from renderers.raster.torch_raster import as_batched_pos, check_tri


def edge_neighbours(tri: torch.Tensor) -> torch.Tensor:
    """For each triangle f and edge k = (tri[f, k], tri[f, (k+1) % 3]): the other triangle
    sharing that edge, -1 if none (boundary), -2 if more than one (non-manifold).

    tri: (F, 3) int. Returns (F, 3) int64 on tri's device.
    """
    n_f = tri.shape[0]
    tri = tri.long()
    e = torch.stack([tri, tri.roll(-1, dims=1)], dim=-1).reshape(-1, 2).sort(dim=1).values
    key = e[:, 0] * (int(tri.max()) + 1 if n_f else 1) + e[:, 1]
    order = key.argsort()
    _, inverse, counts = torch.unique_consecutive(
        key[order], return_inverse=True, return_counts=True
    )
    count = counts[inverse]
    first = (torch.cumsum(counts, 0) - counts)[inverse]
    rank = torch.arange(order.numel(), device=tri.device) - first
    # In a group of two, entry 0's partner is the next sorted entry and entry 1's the previous.
    partner = torch.where(rank == 0, order.roll(-1), order.roll(1))
    nb_sorted = torch.where(count == 2, partner // 3, torch.where(count == 1, -1, -2))
    nb = torch.empty_like(nb_sorted)
    nb[order] = nb_sorted
    return nb.view(n_f, 3)


def silhouette_edges(pos: torch.Tensor, tri: torch.Tensor, neighbours: torch.Tensor):
    """(B, F, 3) bool: edge k of triangle f is a silhouette edge in view b.

    Facing is the sign of det[(x, y, w) of the three vertices], i.e. the screen-space
    winding for vertices in front of the camera.
    """
    hom = pos[:, tri][..., [0, 1, 3]]  # (B,F,3,3)
    facing = torch.linalg.det(hom) > 0  # (B,F)
    nb = neighbours.clamp(min=0)
    other = facing[:, nb]  # (B,F,3)
    return (neighbours < 0)[None] | (other != facing[..., None])


def _pair_deltas(color, rast, screen, usable, tri, first, step, grid_shape):
    """Colour changes (P, C) and their flat pixel indices for one pair direction.

    first: (B, H', W') view selecting the first pixel of each pair; step: flat offset of
    the second pixel (1 = right neighbour, W = the row above). usable: (B, F, 3) bool, the
    silhouette edges this pair direction samples (see the module docstring).
    """
    n_b, height, width = grid_shape
    flat = rast.reshape(-1, 4)
    ids = flat[:, 3].round().long()
    pa = first.reshape(-1)
    pb = pa + step
    differ = ids[pa] != ids[pb]
    pa, pb = pa[differ], pb[differ]
    ida, idb = ids[pa], ids[pb]
    za, zb = flat[pa, 2], flat[pb, 2]
    a_front = (idb == 0) | ((ida != 0) & (za < zb))
    pf = torch.where(a_front, pa, pb)
    po = torch.where(a_front, pb, pa)
    f = torch.where(a_front, ida, idb) - 1
    b = torch.div(pf, height * width, rounding_mode="floor")
    # Only triangles with an edge this direction samples can blend: drop the rest early.
    cand = usable[b, f].any(1).nonzero().squeeze(1)
    pf, po, f, b = pf[cand], po[cand], f[cand], b[cand]

    def centre(p):
        rem = p - b * (height * width)
        row = torch.div(rem, width, rounding_mode="floor")
        return torch.stack([rem - row * width, row], dim=1).to(screen.dtype)  # (x, y) pixels

    cf, co = centre(pf), centre(po)
    vi = tri[f]  # (P,3)
    p0 = screen[b[:, None], vi]  # (P,3,2) edge k starts at vertex k
    p1 = screen[b[:, None], vi.roll(-1, dims=1)]
    e = p1 - p0
    cross2 = lambda u, w: u[..., 0] * w[..., 1] - u[..., 1] * w[..., 0]
    g_f = cross2(e, cf[:, None] - p0)  # edge function at the two centres, (P,3)
    g_o = cross2(e, co[:, None] - p0)
    denom = g_f - g_o
    safe = torch.where(denom != 0, denom, torch.ones_like(denom))
    t = g_f / safe  # crossing point along cf -> co, (P,3)
    q = cf[:, None] + t[..., None] * (co - cf)[:, None]
    s = ((q - p0) * e).sum(-1) / (e * e).sum(-1).clamp(min=1e-30)
    with torch.no_grad():
        # The front centre is covered (inside or on every edge); the segment leaves the
        # triangle through edge k iff the other centre is strictly outside edge k's line
        # and the crossing lies on the edge. A front centre exactly on the edge (t = 0)
        # counts: it is the half-covered pixel of an edge through pixel centres.
        inside_sign = cross2(e[:, 0], p0[:, 2] - p0[:, 0]).sign()[:, None]  # (P,1)
        crosses = (g_o * inside_sign < 0) & (s >= 0) & (s <= 1) & usable[b, f]
        k = crosses.float().argmax(1)  # the edge the segment leaves through
        use = crosses.any(1)
    sel = use.nonzero().squeeze(1)
    t_k = t[sel].gather(1, k[sel, None]).squeeze(1)
    col = color.reshape(-1, color.shape[-1])
    c_f, c_o = col[pf[sel]], col[po[sel]]
    # (0.5 - t)(c_o - c_f) added to the front pixel when t < 0.5 and (t - 0.5)(c_f - c_o)
    # added to the other one otherwise: the same expression, only the pixel differs.
    delta = (t_k - 0.5)[:, None] * (c_f - c_o)
    target = torch.where(t_k < 0.5, pf[sel], po[sel])
    return delta, target


def antialias(
    color: torch.Tensor,
    rast: torch.Tensor,
    pos: torch.Tensor,
    tri: torch.Tensor,
    neighbours: torch.Tensor | None = None,
) -> torch.Tensor:
    """Antialias silhouette edges of a rasterized image (nvdiffrast's ``antialias``).

    color: (B, H, W, C) shaded image (row 0 at the bottom, as ``rast``); rast: (B, H, W, 4)
    from ``rasterize``; pos: the (V, 4) or (B, V, 4) clip positions rasterized; tri: (F, 3).
    neighbours: ``edge_neighbours(tri)`` when the caller caches the topology.
    Returns (B, H, W, C) in color's dtype, differentiable with respect to color and pos
    (not rast). Edges with a vertex at w <= 0 are not antialiased.
    """
    if color.ndim != 4 or rast.shape[:3] != color.shape[:3]:
        raise ValueError(
            f"color must be (B, H, W, C) matching rast {tuple(rast.shape)}, "
            f"got {tuple(color.shape)}"
        )
    pos = as_batched_pos(pos)
    if pos.shape[0] == 1 and color.shape[0] > 1:
        pos = pos.expand(color.shape[0], -1, -1)
    tri = check_tri(tri, pos.shape[1])
    n_b, height, width, _ = color.shape
    if tri.shape[0] == 0:
        return color
    if neighbours is None:
        neighbours = edge_neighbours(tri)
    rast = rast.detach()
    w = pos[..., 3:4]
    w = torch.where(w > 0, w, torch.ones_like(w))
    scale = pos.new_tensor([width / 2, height / 2])
    screen = (pos[..., :2] / w + 1) * scale - 0.5  # (B,V,2) pixel coordinates of vertices
    with torch.no_grad():
        sil = silhouette_edges(pos.detach(), tri, neighbours)
        sil &= (pos.detach()[:, tri, 3] > 0).all(-1)[..., None]  # (B,F,3)
        v0 = screen.detach()[:, tri]  # (B,F,3,2)
        d = (v0.roll(-1, dims=2) - v0).abs()
        # An edge at least as tall as wide (in pixels) is sampled by horizontal pairs,
        # the others by vertical pairs; exactly 45 degrees goes to horizontal pairs.
        steep = d[..., 1] >= d[..., 0]
        usable = (sil & steep, sil & ~steep)
    grid = torch.arange(n_b * height * width, device=color.device).view(n_b, height, width)
    shape = (n_b, height, width)
    deltas, targets = [], []
    pairs = ((grid[:, :, :-1], 1, usable[0]), (grid[:, :-1, :], width, usable[1]))
    for first, step, use in pairs:
        d, tgt = _pair_deltas(color, rast, screen, use, tri, first, step, shape)
        deltas.append(d)
        targets.append(tgt)
    flat = color.reshape(-1, color.shape[-1])
    out = flat.index_add(0, torch.cat(targets), torch.cat(deltas).to(color.dtype))
    return out.view_as(color)
