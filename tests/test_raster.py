"""Raster backends against known answers: a brute-force float64 rasterizer, ray-triangle
intersection, gradcheck, and the analytic coverage derivative of a sliding edge."""

import math

import pytest
import torch

from renderers.cameras import projection_matrix
from renderers.raster import (
    NvdiffrastRaster,
    TorchRaster,
    antialias,
    edge_neighbours,
    get_backend,
    interpolate,
    nvdiffrast_available,
    rasterize,
)


def brute_force(pos, tri, height, width):
    """Naive float64 reference: every pixel against every triangle, screen-space edge
    functions after the perspective divide, 1/w perspective correction (all w > 0).

    Returns hit (B,P), tri index (B,P), (u, v) (B,P,2), z/w (B,P) and an "ambiguous" mask
    of pixels within 1e-4 pixel of an edge of a triangle that (nearly) covers them or
    whose two nearest fragments are within 1e-6 in depth.
    """
    v = pos.double()[:, tri.long()]  # (B,F,3,4)
    w = v[..., 3]
    sx = (v[..., 0] / w + 1) * width / 2  # pixel units, centres at +0.5
    sy = (v[..., 1] / w + 1) * height / 2
    zs = v[..., 2] / w
    ys, xs = torch.meshgrid(
        torch.arange(height).double() + 0.5, torch.arange(width).double() + 0.5, indexing="ij"
    )
    px, py = xs.reshape(1, -1, 1, 1), ys.reshape(1, -1, 1, 1)  # (1,P,1,1)
    ax, ay = sx[:, None], sy[:, None]  # (B,1,F,3)
    bx, by = ax.roll(-1, dims=-1), ay.roll(-1, dims=-1)
    edge = (bx - ax) * (py - ay) - (by - ay) * (px - ax)  # (B,P,F,3): edge k = (k, k+1)
    area = edge.sum(-1, keepdim=True)  # twice the signed area
    bary = edge.roll(-1, dims=-1) / area  # vertex k's weight: edge (k+1, k+2)
    dist = edge * area.sign() / torch.sqrt((bx - ax) ** 2 + (by - ay) ** 2)  # pixel units
    z = (bary * zs[:, None]).sum(-1)
    inside = (bary >= 0).all(-1) & (z >= -1) & (z <= 1) & (area.squeeze(-1) != 0)
    zin = torch.where(inside, z, torch.inf)
    top2 = zin.topk(2, dim=-1, largest=False)
    hit = torch.isfinite(top2.values[..., 0])
    idx = top2.indices[..., 0]
    pc = bary / w[:, None]
    lam = pc / pc.sum(-1, keepdim=True)
    pick = lambda t: t.gather(2, idx[:, :, None, None].expand(-1, -1, 1, 3)).squeeze(2)
    uv = pick(lam)[..., 1:]
    near_edge = ((dist > -1e-4).all(-1) & (dist.abs() < 1e-4).any(-1)).any(-1)
    tie = (top2.values[..., 1] - top2.values[..., 0]).abs() < 1e-6
    return hit, idx, uv, top2.values[..., 0], near_edge | tie


def random_triangles(n_batch, n_tri, generator, dtype=torch.float32):
    pos = torch.randn(n_batch, 3 * n_tri, 4, generator=generator, dtype=dtype) * 0.7
    pos[..., 3] = 0.6 + torch.rand(n_batch, 3 * n_tri, generator=generator, dtype=dtype)
    pos[..., 2] = pos[..., 2] * 0.5
    tri = torch.arange(3 * n_tri, dtype=torch.int32).view(n_tri, 3)
    return pos, tri


@pytest.mark.parametrize("chunk_pairs", [257, 1 << 20])
def test_rasterize_matches_brute_force(chunk_pairs):
    gen = torch.Generator().manual_seed(0)
    pos, tri = random_triangles(2, 12, gen)
    height, width = 24, 31
    rast, _ = rasterize(pos, tri, (height, width), chunk_pairs=chunk_pairs)
    hit, idx, uv, zw, skip = brute_force(pos, tri, height, width)
    r = rast.reshape(2, -1, 4).double()
    ids = r[..., 3].long() - 1
    keep = ~skip
    assert hit.sum() > 300 and keep.float().mean() > 0.9
    assert torch.equal(ids[keep], torch.where(hit, idx, -1)[keep])
    both = keep & hit
    assert (r[..., :2][both] - uv[both]).abs().max() < 1e-5
    assert (r[..., 2][both] - zw[both]).abs().max() < 1e-5
    assert (r[~hit & keep] == 0).all()


def test_rasterize_triangle_crossing_near_plane_matches_ray_casting():
    """A triangle with a vertex behind the camera: covered pixels are exactly those whose
    camera rays hit the 3D triangle between the near and far planes."""
    near, far, fov = 0.1, 4.0, 60.0
    tri3 = torch.tensor(
        [[-0.6, -0.4, -1.0], [0.7, -0.2, -1.5], [0.1, 0.5, 0.8]], dtype=torch.float64
    )
    proj = projection_matrix(torch.tensor([fov], dtype=torch.float64), near, far)[0]
    pos = torch.cat([tri3, torch.ones(3, 1, dtype=torch.float64)], 1) @ proj.T
    assert (pos[:, 3] < 0).any() and (pos[:, 3] > 0).any()
    size = 40
    rast, _ = rasterize(pos.float(), torch.tensor([[0, 1, 2]], dtype=torch.int32), (size, size))
    covered = rast[0, ..., 3] > 0  # row 0 at the bottom
    t = math.tan(math.radians(fov) / 2)
    c = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    d = torch.stack([xs * t, ys * t, -torch.ones_like(xs)], -1)  # camera rays, z = -1
    e1, e2 = tri3[1] - tri3[0], tri3[2] - tri3[0]
    n = torch.linalg.cross(e1, e2)
    s = (n @ tri3[0]) / (d @ n)  # ray parameter = view depth
    p = d * s[..., None]
    b1 = (torch.linalg.cross(p - tri3[0], e2.expand_as(p)) @ n) / (n @ n)
    b2 = (torch.linalg.cross(e1.expand_as(p), p - tri3[0]) @ n) / (n @ n)
    expect = (s >= near) & (s <= far) & (b1 >= 0) & (b2 >= 0) & (b1 + b2 <= 1)
    margin = torch.stack([b1, b2, 1 - b1 - b2]).abs().amin(0)
    keep = margin > 1e-4
    assert expect.sum() > 50
    assert torch.equal(covered[keep], expect[keep])


def test_interpolated_clip_positions_land_on_pixel_centres():
    gen = torch.Generator().manual_seed(1)
    pos, tri = random_triangles(1, 6, gen, dtype=torch.float64)
    height, width = 20, 26
    rast, _ = rasterize(pos, tri, (height, width))
    out, _ = interpolate(pos[0][:, [0, 1, 3]], rast, tri)  # clip x, y, w are linear in 3D
    cov = rast[0, ..., 3] > 0
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing="ij",
    )
    ndc = torch.stack([(2 * xs + 1) / width - 1, (2 * ys + 1) / height - 1], -1)
    got = out[0, ..., :2] / out[0, ..., 2:]
    assert cov.sum() > 100
    assert (got[cov] - ndc[cov]).abs().max() < 1e-10
    assert (out[0][~cov] == 0).all()


def test_interpolate_and_rasterize_gradcheck():
    gen = torch.Generator().manual_seed(2)
    pos, tri = random_triangles(2, 3, gen, dtype=torch.float64)
    tri = torch.cat([tri, torch.tensor([[1, 4, 8]], dtype=torch.int32)])
    rast, rast_db = rasterize(pos, tri, (6, 7))
    assert (rast[..., 3] > 0).sum() > 10
    attr = torch.randn(2, 9, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    r = rast.detach().requires_grad_(True)
    db = rast_db.detach()
    assert torch.autograd.gradcheck(lambda a, rr: interpolate(a, rr, tri)[0], (attr, r))
    fn = lambda a, rr: interpolate(a, rr, tri, rast_db=db, diff_attrs="all")[1]
    assert torch.autograd.gradcheck(fn, (attr[0].detach().requires_grad_(True), r))
    p = pos[:1].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: rasterize(q, tri, (6, 7))[0][..., :3], (p,))
    assert torch.autograd.gradcheck(lambda q: rasterize(q, tri, (6, 7))[1], (p,))


def test_rast_db_matches_pixel_differences_for_affine_triangle():
    pos = torch.tensor(
        [[-0.9, -0.8, 0.1, 1.0], [0.95, -0.6, 0.2, 1.0], [-0.2, 0.9, 0.3, 1.0]],
        dtype=torch.float64,
    )
    rast, db = rasterize(pos, torch.tensor([[0, 1, 2]], dtype=torch.int32), (16, 16))
    r, d = rast[0], db[0]
    both_x = (r[:, 1:, 3] > 0) & (r[:, :-1, 3] > 0)
    both_y = (r[1:, :, 3] > 0) & (r[:-1, :, 3] > 0)
    for ch, dch in ((0, 0), (1, 2)):
        dx = r[:, 1:, ch] - r[:, :-1, ch]
        dy = r[1:, :, ch] - r[:-1, :, ch]
        assert (dx[both_x] - d[:, :-1, dch][both_x]).abs().max() < 1e-12
        assert (dy[both_y] - d[:-1, :, dch + 1][both_y]).abs().max() < 1e-12


def _quad(x0, x1, y0, y1):
    xs = torch.stack([x0, x1, x1, x0])
    ys = torch.stack([y0, y0, y1, y1])
    pos = torch.stack([xs, ys, torch.zeros_like(xs), torch.ones_like(xs)], -1)
    return pos, torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32)


@pytest.mark.parametrize("a", [0.137, -0.41, 0.52])
def test_antialias_sliding_edge_gradient_matches_coverage_derivative(a):
    """A quad's right edge at NDC x = a over a background: the summed image moves by
    (colour difference) x (crossing pixel pairs) per pixel width, i.e. H * dc * W/2 per
    NDC unit; the sum itself equals the exact covered area times the colour."""
    height, width = 12, 18
    fg, bg = torch.tensor([0.9, 0.2]), torch.tensor([0.1, 0.5])
    edge = torch.tensor(a, requires_grad=True)
    one = torch.tensor(1.5)
    pos, tri = _quad(-one, edge, -one, one)
    rast, _ = rasterize(pos, tri, (height, width))
    cov = (rast[..., 3:] > 0).float()
    out = antialias(cov * fg + (1 - cov) * bg, rast, pos, tri)
    (out.sum(dim=(0, 1, 2)) @ torch.tensor([1.0, 10.0])).backward()
    dc = fg - bg
    expect = height * (dc @ torch.tensor([1.0, 10.0])) * width / 2
    assert math.isclose(edge.grad.item(), expect.item(), rel_tol=1e-5)
    area = (a + 1) * width / 2 * height  # covered pixels' area in pixel units
    exact = area * fg + (height * width - area) * bg
    assert torch.allclose(out.sum(dim=(0, 1, 2)), exact, rtol=1e-5)


def test_antialias_horizontal_edge_and_shared_edges_are_not_blended():
    """The top edge (vertical pixel pairs) blends; the quad's shared diagonal does not."""
    height, width = 14, 10
    edge = torch.tensor(0.23, requires_grad=True)
    one = torch.tensor(1.5)
    pos, tri = _quad(-one, one, -one, edge)
    rast, _ = rasterize(pos, tri, (height, width))
    cov = (rast[..., 3:] > 0).float()
    out = antialias(cov, rast, pos, tri)
    out.sum().backward()
    assert math.isclose(edge.grad.item(), width * height / 2, rel_tol=1e-5)
    interior = cov[0, 1:, :, 0] > 0  # pixels whose upper neighbour is covered too
    assert interior.sum() > 50
    assert torch.equal(out[0, :-1, :, 0][interior], cov[0, :-1, :, 0][interior])


def _fan(center, radii, n_rim):
    ang = torch.arange(n_rim) * (2 * math.pi / n_rim)
    rim = torch.stack(
        [center[0] + radii[0] * torch.cos(ang), center[1] + radii[1] * torch.sin(ang)], -1
    )
    xy = torch.cat([center[None], rim])
    tri = torch.tensor([[0, 1 + i, 1 + (i + 1) % n_rim] for i in range(n_rim)], dtype=torch.int32)
    return xy, tri


def _clip(xy):
    return torch.cat([xy, torch.zeros_like(xy[:, :1]), torch.ones_like(xy[:, :1])], 1)


def test_fitting_vertices_to_a_silhouette_converges():
    """A 24-gon fan fitted through antialias to an ellipse 12-gon's silhouette."""
    size = 64
    target_xy, t_tri = _fan(torch.tensor([0.15, -0.1]), (0.7, 0.45), 12)
    t_pos = _clip(target_xy)
    with torch.no_grad():
        t_rast, _ = rasterize(t_pos, t_tri, (size, size))
        target = antialias((t_rast[..., 3:] > 0).float(), t_rast, t_pos, t_tri)
    xy0, tri = _fan(torch.tensor([-0.1, 0.1]), (0.3, 0.3), 24)
    xy = xy0.clone().requires_grad_(True)
    opt = torch.optim.Adam([xy], lr=0.01)
    for _ in range(150):
        pos = _clip(xy)
        rast, _ = rasterize(pos, tri, (size, size))
        img = antialias((rast[..., 3:] > 0).float(), rast, pos, tri)
        loss = (img - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        mask = rasterize(_clip(xy), tri, (size, size))[0][..., 3] > 0
        tmask = t_rast[..., 3] > 0
        iou = (mask & tmask).sum() / (mask | tmask).sum()
    assert iou > 0.95


def test_edge_neighbours_of_a_tetrahedron_and_a_quad():
    tet = torch.tensor([[0, 1, 2], [0, 3, 1], [1, 3, 2], [2, 3, 0]], dtype=torch.int32)
    nb = edge_neighbours(tet)
    assert (nb >= 0).all()
    for f in range(4):
        for k in range(3):
            e = {int(tet[f, k]), int(tet[f, (k + 1) % 3])}
            g = int(nb[f, k])
            assert g != f and e <= set(tet[g].tolist())
    quad = torch.tensor([[0, 1, 2], [0, 2, 3], [0, 2, 4]], dtype=torch.int32)
    assert edge_neighbours(quad)[:, 2].tolist() == [-2, -1, -1]
    assert edge_neighbours(quad)[0, 0].item() == -1


def test_get_backend_names():
    assert isinstance(get_backend("torch"), TorchRaster)
    with pytest.raises(ValueError, match="'cuda'"):
        get_backend("cuda")
    if not nvdiffrast_available():
        with pytest.raises(ImportError, match="nvdiffrast"):
            get_backend("nvdiffrast")
    # "auto" on CPU tensors is the torch backend: same rast as the function.
    gen = torch.Generator().manual_seed(3)
    pos, tri = random_triangles(1, 4, gen)
    assert torch.equal(
        get_backend("auto").rasterize(pos, tri, (9, 8))[0], rasterize(pos, tri, (9, 8))[0]
    )


needs_nvdiffrast = pytest.mark.skipif(
    not (torch.cuda.is_available() and nvdiffrast_available()), reason="needs CUDA and nvdiffrast"
)


@pytest.mark.gpu
@needs_nvdiffrast
def test_nvdiffrast_agrees_with_torch_backend():
    gen = torch.Generator().manual_seed(4)
    pos, tri = random_triangles(2, 40, gen)
    pos, tri = pos.cuda(), tri.cuda()
    nv, tb = NvdiffrastRaster(), TorchRaster()
    r_nv, _ = nv.rasterize(pos, tri, (64, 80))
    r_t, _ = tb.rasterize(pos, tri, (64, 80))
    same = r_nv[..., 3] == r_t[..., 3]
    assert same.float().mean() >= 0.995
    both = same & (r_t[..., 3] > 0)
    assert (r_nv[..., :2][both] - r_t[..., :2][both]).abs().max() < 1e-4
    attr = torch.rand(pos.shape[1], 3, device="cuda", generator=None)
    a_nv, _ = nv.interpolate(attr, r_nv, tri)
    a_t, _ = tb.interpolate(attr, r_t, tri)
    assert (a_nv - a_t)[both].abs().max() < 1e-4


@pytest.mark.gpu
@needs_nvdiffrast
def test_nvdiffrast_antialias_gradient_on_sliding_edge():
    height, width = 12, 18
    edge = torch.tensor(0.137, device="cuda", requires_grad=True)
    one = torch.tensor(1.5, device="cuda")
    pos, tri = _quad(-one, edge, -one, one)
    nv = NvdiffrastRaster()
    rast, _ = nv.rasterize(pos, tri.cuda(), (height, width))
    cov = (rast[..., 3:] > 0).float()
    nv.antialias(cov, rast, pos, tri.cuda()).sum().backward()
    assert math.isclose(edge.grad.item(), height * width / 2, rel_tol=1e-3)
