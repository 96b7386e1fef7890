"""NeuS volume rendering against closed forms: planes (telescoping transmittance, unbiased
depth), spheres (silhouette, depth, normals), finite differences, patch == full render."""

import math

import pytest
import torch

from renderers.cameras import orbit_cameras, pixel_rays
from renderers.field import SphereField
from renderers.volume import VolumeConfig, render_rays, render_views, sample_pdf

F64 = torch.float64


class PlaneField:
    """f(p) = <n, p> - c for one unit normal n; constant colour."""

    def __init__(self, normal, offset, bound=1.0):
        self.n = torch.nn.functional.normalize(torch.as_tensor(normal, dtype=F64), dim=0)
        self.c = offset
        self.bound = bound

    def sdf(self, points):
        return points @ self.n.to(points) - self.c

    def color(self, points):
        return torch.full_like(points, 0.25)

    def deformation(self, points):
        return torch.zeros_like(points)


class ScaledSphere(SphereField):
    """k * (|p| - r): |grad| = |k| everywhere, a known answer for the eikonal term."""

    def __init__(self, radius, k):
        super().__init__(radius)
        self.k = k

    def sdf(self, points):
        return self.k * super().sdf(points)


def sphere_hits(origins, dirs, radius):
    """Ray distance to the first hit of a sphere at the origin (nan for misses)."""
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - radius**2
    return -b - torch.sqrt(b * b - c)


def test_plane_transmittance_telescopes_to_the_closed_form():
    # For a linear SDF the section estimates are exact, so the ray's opacity is
    # 1 - Phi_s(f(t_end)) / Phi_s(f(t_start)) whatever the samples in between. Both rays
    # enter the cube [-1, 1]^3 through z = 1 and leave through z = -1.
    s, n = 5.0, 16
    cfg = VolumeConfig(n_uniform=n, n_importance=0, inv_std=s)
    field = PlaneField((0.3, -0.2, 1.0), 0.1)
    origins = torch.tensor([[[0.0, 0.0, 2.0], [0.5, 0.0, 2.0]]], dtype=F64)
    dirs = torch.tensor([[[0.0, 0.0, -1.0], [-0.2, 0.0, -1.0]]], dtype=F64)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    out = render_rays(field, origins, dirs, cfg)
    t_near, t_far = 1.0 / -dirs[..., 2], 3.0 / -dirs[..., 2]
    t_start = t_near + 0.5 * (t_far - t_near) / n  # first uniform sample (deterministic)
    f = lambda t: field.sdf(origins + t[..., None] * dirs)
    expect = 1 - torch.sigmoid(s * f(t_far)) / torch.sigmoid(s * f(t_start))
    torch.testing.assert_close(out.opacity, expect)
    torch.testing.assert_close(out.weights.sum(-1), out.opacity)
    assert out.ray_valid.all()


@pytest.mark.parametrize("jitter", [False, True])
def test_plane_depth_is_unbiased(jitter):
    # The logistic density of a linear SDF is symmetric about its zero: the expected ray
    # distance is the crossing, at any incidence; uniform + importance samples resolve it.
    field = PlaneField((0.0, 0.4, 1.0), -0.2)
    origins = torch.tensor([[[0.0, 0.0, 2.0], [0.3, -0.4, 1.8], [0.1, 0.1, 2.2]]], dtype=F64)
    dirs = torch.tensor([[[0.0, 0.0, -1.0], [0.1, 0.5, -1.0], [-0.2, -0.3, -1.0]]], dtype=F64)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    gen = torch.Generator().manual_seed(3) if jitter else None
    out = render_rays(field, origins, dirs, VolumeConfig(), generator=gen)
    n = field.n
    t_hit = (field.c - origins @ n) / (dirs @ n)
    torch.testing.assert_close(out.opacity, torch.ones_like(out.opacity))
    torch.testing.assert_close(out.depth, t_hit, atol=2e-4, rtol=0)
    torch.testing.assert_close(out.normal, n.expand_as(out.normal))
    # Colour 0.25 everywhere, fully opaque: the white background does not show.
    torch.testing.assert_close(out.rgb, torch.full_like(out.rgb, 0.25))


@pytest.fixture(scope="module")
def sphere_render():
    """Two spheres, two views each, 64x64, deterministic samples, no graph."""
    radius = torch.tensor([0.5, 0.35])
    cams = orbit_cameras(
        torch.tensor([0.0, 90.0, 45.0, 200.0]), torch.tensor([0.0, 25.0, 10.0, -15.0]),
        torch.tensor([2.0, 2.0, 1.6, 1.6]), fov_y=60.0,
    )  # fmt: skip
    cfg = VolumeConfig(resolution=64)
    with torch.no_grad():
        out = render_views(
            SphereField(radius, color=[[0.8, 0.3, 0.2], [0.1, 0.6, 0.9]]), cams, cfg, 2
        )
    return radius.repeat_interleave(2), cams, out


def test_sphere_silhouette_matches_the_analytic_disk(sphere_render):
    radius, cams, out = sphere_render
    centre = torch.arange(64) + 0.5 - 32
    rho = torch.sqrt(centre[:, None] ** 2 + centre[None, :] ** 2)
    for k in range(4):
        # A sphere of radius r at distance d subtends the half-angle asin(r / d).
        half = math.asin(radius[k].item() / cams.distance[k].item())
        disk = rho < cams.focal(64)[k] * math.tan(half)
        mask = out.images.opacity[k, ..., 0] > 0.5
        iou = (mask & disk).sum() / (mask | disk).sum()
        assert iou > 0.97, (k, iou)
    assert out.images.opacity.min() >= 0 and out.images.opacity.max() <= 1
    # Colour over the white background; each object's own colour inside.
    rgb, op = out.images.rgb, out.images.opacity
    torch.testing.assert_close(rgb[op[..., 0] < 1e-6], torch.ones_like(rgb[op[..., 0] < 1e-6]))
    inside = op[..., 0] > 0.999
    torch.testing.assert_close(
        rgb[:2][inside[:2]].mean(0), torch.tensor([0.8, 0.3, 0.2]), atol=1e-3, rtol=0
    )
    torch.testing.assert_close(
        rgb[2:][inside[2:]].mean(0), torch.tensor([0.1, 0.6, 0.9]), atol=1e-3, rtol=0
    )


def test_sphere_depth_and_normals_match_ray_intersection(sphere_render):
    radius, cams, out = sphere_render
    o, d = pixel_rays(cams, 64, 64)
    t_hit = sphere_hits(o, d, radius[:, None, None])
    op = out.images.opacity[..., 0]
    solid = op > 0.99
    depth = out.images.depth[..., 0] / op.clamp(min=1e-6)
    err = (depth - t_hit)[solid].abs()
    assert err.max() < 5e-3 and err.mean() < 1e-3, (err.max(), err.mean())
    # Normals: the analytic sphere normal at the hit, rotated into camera space.
    hit = o + t_hit[..., None] * d
    n_world = hit / hit.norm(dim=-1, keepdim=True)
    n_cam = torch.einsum("kji,khwj->khwi", cams.c2w[:, :3, :3], n_world)
    cos = torch.nn.functional.cosine_similarity(out.images.normal, n_cam, dim=-1)
    assert cos[solid].min() > 0.99
    # Camera space: visible normals face the camera (z > 0), length ~1 where opaque.
    assert (n_cam[solid][:, 2] > 0).all()
    # A weighted mean of unit normals: no longer than the opacity, nearly as long on a sphere.
    length = out.images.normal.norm(dim=-1)
    assert (length <= op + 1e-5).all() and (length[solid] > op[solid] - 1e-2).all()
    # Normalized depth: (far_c - t) / (far_c - near_c), near/far = distance -+ sqrt(3).
    dist = cams.distance[:, None, None]
    expect = op * (dist + math.sqrt(3) - t_hit) / (2 * math.sqrt(3))  # composited over 0
    torch.testing.assert_close(
        out.images.depth_normalized[..., 0][solid], expect[solid], atol=2e-3, rtol=0
    )
    assert out.images.depth_normalized[op < 1e-4].abs().max() < 1e-4


def test_gradient_wrt_radius_matches_finite_differences():
    cams = orbit_cameras(30.0, 20.0, 1.8, dtype=F64)
    cfg = VolumeConfig(resolution=16, n_uniform=64, n_importance=32, inv_std=50.0)

    def mean_opacity(r):
        return render_views(SphereField(r), cams, cfg, 1).images.opacity.mean()

    r = torch.tensor([0.45], requires_grad=True)
    value = mean_opacity(r)
    (grad,) = torch.autograd.grad(value, r)
    assert torch.isfinite(grad).all()
    h = 1e-3
    with torch.no_grad():
        fd = (mean_opacity(torch.tensor([0.45 + h])) - mean_opacity(torch.tensor([0.45 - h]))) / (
            2 * h
        )
    assert grad.item() > 0
    assert abs(grad.item() - fd.item()) < 0.01 * abs(fd.item()), (grad.item(), fd.item())


def test_eikonal_term_trains_the_field():
    # sdf = k (|p| - r): the sampled gradient norms are |k|, so d/dk mean((|g| - 1)^2) is
    # 2 (k - 1); it reaches k only through the differentiable SDF gradient (create_graph).
    k = torch.tensor(1.3, dtype=F64, requires_grad=True)
    cams = orbit_cameras(0.0, 10.0, 2.0, dtype=F64)
    cfg = VolumeConfig(resolution=8, n_uniform=16, n_importance=8)
    out = render_views(ScaledSphere(0.375, k), cams, cfg, 1, mode="full")
    g = out.rays.grad_norm[out.rays.ray_valid]
    torch.testing.assert_close(g, torch.full_like(g, 1.3))
    ((g - 1) ** 2).mean().backward()
    torch.testing.assert_close(k.grad, torch.tensor(0.6, dtype=F64))
    # The sparsity input: sample SDFs equal k * (|x| - r) at the sample points.
    x = out.rays.t  # distances along rays; rebuild the points
    o, d = pixel_rays(cams, 8, 8)
    pts = o.reshape(1, -1, 1, 3) + d.reshape(1, -1, 1, 3) * x[..., None]
    torch.testing.assert_close(out.rays.sdf, 1.3 * (pts.norm(dim=-1) - 0.375), atol=1e-12, rtol=0)


def test_patch_mode_equals_the_full_render():
    cams = orbit_cameras(torch.tensor([10.0, 100.0, 190.0]), 15.0, 1.7, dtype=F64)
    cfg = VolumeConfig(resolution=24, patch_size=6, global_size=8, n_uniform=32, n_importance=16)
    field = SphereField(torch.tensor([0.45, 0.3, 0.5]), bound=1.0)
    bg = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.2, 0.5, 0.7]], dtype=F64)
    with torch.no_grad():
        torch.manual_seed(0)
        patch = render_views(field, cams, cfg, 1, mode="patch", background=bg)
        full = render_views(field, cams, cfg, 1, mode="full", background=bg)
        small = render_views(
            field, cams, VolumeConfig(resolution=8, n_uniform=32, n_importance=16), 1, background=bg
        )
    assert patch.offsets.shape == (3, 2)
    assert patch.images.rgb.shape == (3, 6, 6, 3) and patch.coarse.rgb.shape == (3, 8, 8, 3)
    for name in ("rgb", "opacity", "depth", "depth_normalized", "normal"):
        got, ref = getattr(patch.images, name), getattr(full.images, name)
        for k, (r0, c0) in enumerate(patch.offsets.tolist()):
            torch.testing.assert_close(got[k], ref[k, r0 : r0 + 6, c0 : c0 + 6])
        # The coarse grid of the whole view is the full render at the coarse resolution.
        torch.testing.assert_close(getattr(patch.coarse, name), getattr(small.images, name))
    assert patch.rays.opacity.shape == (3, 6 * 6 + 8 * 8)
    # Explicit offsets are honoured; out-of-range ones are refused by name.
    fixed = torch.tensor([[0, 18], [3, 4], [18, 0]])
    with torch.no_grad():
        again = render_views(field, cams, cfg, 1, mode="patch", patch_offsets=fixed, background=bg)
    torch.testing.assert_close(again.images.rgb[0], full.images.rgb[0, 0:6, 18:24])
    with pytest.raises(ValueError, match="patch_offsets"):
        render_views(field, cams, cfg, 1, mode="patch", patch_offsets=fixed + 1)
    with pytest.raises(ValueError, match="patch_size"):
        render_views(field, cams, VolumeConfig(resolution=4), 1, mode="patch")
    with pytest.raises(ValueError, match="mode"):
        render_views(field, cams, cfg, 1, mode="tile")


def test_jitter_is_seeded_and_independent_of_chunking():
    cams = orbit_cameras(torch.tensor([0.0, 180.0]), 5.0, 1.8)
    field = SphereField(0.4)
    base = VolumeConfig(resolution=12, n_uniform=32, n_importance=16)
    with torch.no_grad():
        run = lambda cfg, seed: render_views(
            field, cams, cfg, 2, torch.Generator().manual_seed(seed)
        )
        a = run(base, 1)
        b = run(VolumeConfig(resolution=12, n_uniform=32, n_importance=16, chunk_rays=7), 1)
        c = run(base, 2)
        det = render_views(field, cams, base, 2)
    torch.testing.assert_close(a.images.rgb, b.images.rgb, atol=1e-6, rtol=0)
    assert torch.equal(a.rays.t, b.rays.t)
    assert not torch.equal(a.rays.t, c.rays.t)
    # Jittered and deterministic renders agree on the image up to sampling noise.
    assert (a.images.opacity - det.images.opacity).abs().max() < 0.05


def test_sample_pdf_inverts_the_piecewise_linear_cdf():
    gen = torch.Generator().manual_seed(0)
    edges = torch.sort(torch.rand(5, 9, generator=gen, dtype=F64), dim=-1).values
    weights = torch.rand(5, 8, generator=gen, dtype=F64)
    weights[0] = 0.0  # an empty ray samples its interval uniformly
    weights[1, 2:] = 0.0
    u = torch.rand(5, 20, generator=gen, dtype=F64)
    got = sample_pdf(edges, weights, u)
    w = weights + 1e-5
    cdf = torch.cat(
        [torch.zeros(5, 1, dtype=F64), torch.cumsum(w / w.sum(-1, keepdim=True), -1)], -1
    )
    for i in range(5):
        ref = torch.from_numpy(
            __import__("numpy").interp(u[i].numpy(), cdf[i].numpy(), edges[i].numpy())
        )
        torch.testing.assert_close(got[i], ref)


def test_rays_missing_the_cube_are_transparent_and_config_checks():
    field = SphereField(0.3, bound=0.5)
    origins = torch.tensor([[[0.0, 0.0, 2.0], [3.0, 0.0, 2.0]]])
    dirs = torch.tensor([[[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]]])
    out = render_rays(
        field, origins, dirs, VolumeConfig(), background=torch.tensor([0.1, 0.2, 0.3])
    )
    assert out.ray_valid.tolist() == [[True, False]]
    assert out.opacity[0, 1] == 0 and out.opacity[0, 0] > 0.999
    torch.testing.assert_close(out.rgb[0, 1], torch.tensor([0.1, 0.2, 0.3]))
    torch.testing.assert_close(out.depth[0, 0], torch.tensor(1.7), atol=1e-3, rtol=0)
    for bad in (
        dict(n_uniform=1),
        dict(near=5.0),
        dict(inv_std=0.0),
        dict(patch_size=0),
    ):
        with pytest.raises(ValueError):
            VolumeConfig(**bad)
    with pytest.raises(ValueError, match="background"):
        render_rays(field, origins, dirs, VolumeConfig(), background=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="background must be RGB values in"):
        render_rays(field, origins, dirs, VolumeConfig(), background=(2.0, 0.0, 0.0))


def test_colour_only_where_weights_matter():
    # Skipping colour at samples of weight <= eps changes a pixel by at most the weight it
    # skips (colours in [0, 1]); the field is asked for far fewer colours.
    calls = []

    class Counting(SphereField):
        def color(self, points):
            calls.append(points.shape[1])
            return super().color(points)

    cams = orbit_cameras(torch.tensor([0.0, 120.0]), 10.0, 1.8, dtype=F64)
    field = Counting(torch.tensor([0.4, 0.3]), color=[[0.9, 0.5, 0.1], [0.2, 0.7, 0.4]])
    exact_cfg = VolumeConfig(resolution=16, n_uniform=64, n_importance=32)
    eps = 1e-4
    with torch.no_grad():
        exact = render_views(field, cams, exact_cfg, 1)
        sparse_cfg = VolumeConfig(
            resolution=16, n_uniform=64, n_importance=32, color_min_weight=eps
        )
        sparse = render_views(field, cams, sparse_cfg, 1)
    w = exact.rays.weights
    skipped = torch.where(w <= eps, w, torch.zeros_like(w)).sum(-1).reshape(2, 16, 16, 1)
    diff = (sparse.images.rgb - exact.images.rgb).abs()
    assert (diff <= skipped + 1e-9).all()
    assert diff.max() > 0  # something was skipped
    assert calls[1] < 0.3 * calls[0], calls
    torch.testing.assert_close(sparse.images.opacity, exact.images.opacity)


def test_checkpointed_chunks_give_the_same_values_and_gradients():
    """checkpoint_chunks recomputes each chunk in backward: the same render and the same
    gradients (through the normals and the eikonal term too) on a triplane field."""
    from prd.triplane import FieldConfig, FieldDecoder

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    decoder = FieldDecoder(FieldConfig(channels=4, hidden=8))
    geometry = (0.3 * torch.randn(1, 3, 4, 8, 8, generator=gen)).requires_grad_(True)
    texture = torch.randn(1, 3, 4, 8, 8, generator=gen).requires_grad_(True)
    cams = orbit_cameras([30.0, 200.0], [15.0, 20.0], 1.6, 50.0)
    o, d = pixel_rays(cams, 6, 6)
    o, d = o.reshape(1, -1, 3), d.reshape(1, -1, 3)
    params = [geometry, texture, *decoder.parameters()]
    results = []
    for ckpt in (False, True):
        cfg = VolumeConfig(n_uniform=16, n_importance=8, chunk_rays=20, checkpoint_chunks=ckpt)
        field = decoder.bind(geometry, texture)
        out = render_rays(field, o, d, cfg, generator=torch.Generator().manual_seed(1))
        loss = (
            out.rgb.square().sum()
            + out.depth.sum()
            + out.normal.sum()
            + ((out.grad_norm - 1) ** 2).mean()  # eikonal: through the gradient
            + out.sdf.abs().mean()
        )
        # the deformation MLP is not used by the volume renderer: its gradients are None
        results.append((out, torch.autograd.grad(loss, params, allow_unused=True)))
    (a, ga), (b, gb) = results
    for name in ("rgb", "depth", "normal", "grad_norm", "weights"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=0)
    assert sum(x is not None for x in ga) >= 5  # planes, SDF and colour MLPs
    for x, y in zip(ga, gb, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.abs().sum() > 0
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", [0.0, 0.25])
def test_rgb_geometry_grad_scales_only_what_colour_passes_to_the_surface(scale):
    """rgb = sum(w c) + (1 - opacity) bg: with rgb_geometry_grad s the radius gets s times
    the colour's gradient and the colour all of it; the values, and the opacity's
    gradient, are those of s = 1."""
    cams = orbit_cameras(30.0, 20.0, 1.8, dtype=F64)

    def grads(s):
        radius = torch.tensor([0.45], dtype=F64, requires_grad=True)
        color = torch.tensor([0.8, 0.3, 0.2], dtype=F64, requires_grad=True)
        cfg = VolumeConfig(resolution=12, n_uniform=32, n_importance=16, rgb_geometry_grad=s)
        field = SphereField(radius, color=color)
        out = render_views(field, cams, cfg, 1, background=torch.full((3,), 0.5, dtype=F64))
        images = out.images
        g_rgb = torch.autograd.grad(images.rgb.sum(), (radius, color), retain_graph=True)
        (g_op,) = torch.autograd.grad(images.opacity.sum(), radius)
        return images, g_rgb, g_op

    full, (r_full, c_full), op_full = grads(1.0)
    part, (r_part, c_part), op_part = grads(scale)
    assert torch.equal(part.rgb, full.rgb) and torch.equal(part.opacity, full.opacity)
    assert r_full.abs().item() > 1e-3  # the colour does move the sphere at s = 1
    torch.testing.assert_close(r_part, scale * r_full, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(c_part, c_full, rtol=1e-12, atol=0)
    torch.testing.assert_close(op_part, op_full, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="rgb_geometry_grad"):
        VolumeConfig(rgb_geometry_grad=1.5)
