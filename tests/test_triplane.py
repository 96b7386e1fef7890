import pytest
import torch

from prd.triplane import (
    FieldConfig,
    FieldDecoder,
    TriplaneField,
    mlp_and_input_gradient,
    sample_planes,
)
from renderers.field import sdf_and_normal


def naive_bilinear(plane: torch.Tensor, u: float, v: float, bound: float) -> torch.Tensor:
    """Bilinear lookup of a (C, H, W) plane at world coords (u along W, v along H)."""
    _, h, w = plane.shape
    x = (u / bound + 1) / 2 * (w - 1)
    y = (v / bound + 1) / 2 * (h - 1)
    x0, y0 = int(x // 1), int(y // 1)
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    fx, fy = x - x0, y - y0
    top = plane[:, y0, x0] * (1 - fx) + plane[:, y0, x1] * fx
    bottom = plane[:, y1, x0] * (1 - fx) + plane[:, y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def test_sample_planes_matches_naive_bilinear_on_each_axis_pair():
    g = torch.Generator().manual_seed(0)
    planes = torch.randn(2, 3, 5, 7, 9, generator=g, dtype=torch.float64)
    pts = (torch.rand(2, 11, 3, generator=g, dtype=torch.float64) * 2 - 1) * 0.9
    out = sample_planes(planes, pts, bound=1.0)
    assert out.shape == (2, 3, 11, 5)
    for b in range(2):
        for n in range(11):
            x, y, z = pts[b, n].tolist()
            for p, (u, v) in enumerate([(x, y), (x, z), (y, z)]):
                ref = naive_bilinear(planes[b, p], u, v, 1.0)
                torch.testing.assert_close(out[b, p, n], ref)


def test_zero_features_give_the_sphere_and_its_normals():
    cfg = FieldConfig(channels=4, hidden=8)
    dec = FieldDecoder(cfg)
    zeros = torch.zeros(1, 3, 4, 8, 8)
    field = dec.bind(zeros, zeros)
    pts = torch.randn(1, 50, 3) * 0.5
    sdf, grad = sdf_and_normal(field, pts)
    # no-bias MLPs map zero features to zero: the SDF is exactly the 0.5-sphere
    torch.testing.assert_close(sdf, pts.norm(dim=-1) - 0.5)
    torch.testing.assert_close(grad, pts / pts.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(field.color(pts), torch.full((1, 50, 3), 0.5))


def test_field_gradients_match_gradcheck():
    torch.manual_seed(0)
    cfg = FieldConfig(channels=3, hidden=8)
    dec = FieldDecoder(cfg).double()
    geo = torch.randn(1, 3, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    tex = torch.randn(1, 3, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    pts = torch.rand(1, 4, 3, dtype=torch.float64) * 1.6 - 0.8
    assert torch.autograd.gradcheck(lambda g: dec.bind(g, tex).sdf(pts), (geo,))
    assert torch.autograd.gradcheck(lambda t: dec.bind(geo, t).color(pts), (tex,))


def autograd_sdf_and_gradient(field, pts):
    """The reference: autograd's gradient of field.sdf, with its graph (double backward)."""
    pts = pts.detach().requires_grad_(True)
    sdf = field.sdf(pts)
    (grad,) = torch.autograd.grad(sdf.sum(), pts, create_graph=True)
    return sdf, grad


def test_closed_form_sdf_gradient_equals_autograd_and_so_do_its_gradients():
    """The triplane field's closed-form SDF gradient (used by sdf_and_normal) against
    autograd's, at points inside and outside the planes' cube: values, and the gradients of
    a loss on both w.r.t. the planes and the SDF MLP's weights."""
    torch.manual_seed(0)
    # fixed orientation: non-square planes test the two plane axes apart
    cfg = FieldConfig(channels=3, hidden=8, bound=0.6, sphere_radius=0.3, plane_orientation="fixed")
    dec = FieldDecoder(cfg).double()
    geo = torch.randn(2, 3, 3, 7, 5, dtype=torch.float64, requires_grad=True)
    tex = torch.zeros(2, 3, 3, 7, 5, dtype=torch.float64)
    pts = (torch.rand(2, 300, 3, dtype=torch.float64) * 2 - 1) * 0.7  # some outside 0.6
    field = dec.bind(geo, tex)
    sdf, grad = sdf_and_normal(field, pts)
    ref_sdf, ref_grad = autograd_sdf_and_gradient(field, pts)
    torch.testing.assert_close(sdf, ref_sdf)
    torch.testing.assert_close(grad, ref_grad)
    w_sdf, w_grad = torch.randn_like(sdf), torch.randn_like(grad)
    params = [geo, *dec.sdf_mlp.parameters()]
    loss = lambda s, g: (s * w_sdf).sum() + (g * w_grad).sum()  # noqa: E731
    for a, b in zip(
        torch.autograd.grad(loss(sdf, grad), params),
        torch.autograd.grad(loss(ref_sdf, ref_grad), params),
    ):
        torch.testing.assert_close(a, b)
    # no graph asked: the gradient is a constant, the SDF keeps its graph
    sdf, grad = sdf_and_normal(field, pts, create_graph=False)
    assert sdf.requires_grad and not grad.requires_grad


def test_mlp_input_gradient_refuses_layers_it_cannot_differentiate():
    with pytest.raises(TypeError, match="Linear and ReLU"):
        mlp_and_input_gradient(
            torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Tanh()), torch.ones(2)
        )


def test_texture_features_are_concatenated_geometry_summed():
    cfg = FieldConfig(channels=2, hidden=4)
    dec = FieldDecoder(cfg)
    planes = torch.zeros(1, 3, 2, 4, 4)
    planes[0, 1] = 1.0  # only the xz plane carries features
    field = TriplaneField(dec, planes, planes)
    pts = torch.zeros(1, 1, 3)
    geo = sample_planes(planes, pts, 1.0).sum(1)
    assert geo.tolist() == [[[1.0, 1.0]]]
    feats = sample_planes(planes, pts, 1.0).permute(0, 2, 1, 3).flatten(2)
    assert feats.tolist() == [[[0.0, 0.0, 1.0, 1.0, 0.0, 0.0]]]
    assert field.color(pts).shape == (1, 1, 3)


def test_bad_shapes_and_config_fail_with_names():
    dec = FieldDecoder(FieldConfig(channels=4))
    with pytest.raises(ValueError, match="geometry"):
        dec.bind(torch.zeros(1, 3, 5, 4, 4), torch.zeros(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="sphere_radius"):
        FieldConfig(sphere_radius=2.0)


def test_one_sampling_for_sdf_and_deformation_matches_separate_calls_and_the_grid():
    from renderers.isosurface import evaluate_grid

    torch.manual_seed(0)
    dec = FieldDecoder(FieldConfig(channels=4, hidden=8, bound=0.6))
    for p in dec.parameters():  # the deformation MLP starts at zero; give it a signal
        torch.nn.init.normal_(p, std=0.5)
    field = dec.bind(torch.randn(2, 3, 4, 8, 8), torch.randn(2, 3, 4, 8, 8))
    pts = torch.rand(2, 30, 3) * 1.2 - 0.6
    sdf, deform = field.sdf_and_deformation(pts)
    torch.testing.assert_close(sdf, field.sdf(pts))
    torch.testing.assert_close(deform, field.deformation(pts))
    assert deform.abs().max() > 0

    class SeparateCalls:  # the same field without the combined call
        bound = field.bound

        def sdf(self, points):
            return field.sdf(points)

        def deformation(self, points):
            return field.deformation(points)

    fast = evaluate_grid(field, 9, n_objects=2, chunk=100)
    slow = evaluate_grid(SeparateCalls(), 9, n_objects=2, chunk=100)
    torch.testing.assert_close(fast[0], slow[0])
    torch.testing.assert_close(fast[1], slow[1])


def test_colour_activations_against_their_formulas():
    """The reference's sigmoid_mipnerf is sigmoid(x) * 1.002 - 0.001: 0.5 at 0, black and
    white at finite logits, 0.001 past them at +-inf; plain sigmoid stays inside (0, 1)."""
    from prd.triplane import color_activation

    white = torch.logit(torch.tensor(1.001 / 1.002, dtype=torch.float64))
    x = torch.tensor([-float("inf"), -white, 0.0, white, float("inf")], dtype=torch.float64)
    expect = torch.tensor([-0.001, 0.0, 0.5, 1.0, 1.001], dtype=torch.float64)
    torch.testing.assert_close(color_activation(x, "sigmoid_mipnerf"), expect)
    torch.testing.assert_close(color_activation(x, "sigmoid"), torch.sigmoid(x))
    with pytest.raises(ValueError, match="color_activation"):
        FieldConfig(color_activation="relu")
    # the field applies the configured activation to the colour MLP's output
    torch.manual_seed(0)
    tex = torch.randn(1, 3, 2, 4, 4)
    pts = torch.rand(1, 5, 3) * 2 - 1
    for name in ("sigmoid_mipnerf", "sigmoid"):
        dec = FieldDecoder(FieldConfig(channels=2, hidden=4, color_activation=name))
        field = dec.bind(tex, tex)
        feats = sample_planes(field.texture, pts, 1.0).permute(0, 2, 1, 3).flatten(2)
        logits = dec.color_mlp(feats)
        torch.testing.assert_close(field.color(pts), color_activation(logits, name))


def reference_v1_features(planes: torch.Tensor, point) -> list[torch.Tensor]:
    """The reference's rotate_planes "v1" and projection, written naively for one object:
    the xy plane transposed, xz rotated by 180 degrees, yz rotated 90 degrees clockwise,
    then sampled at (x, y), (x, z) and (z, y) (width coordinate first)."""
    xy, xz, yz = planes
    x, y, z = point
    return [
        naive_bilinear(xy.transpose(1, 2), x, y, 1.0),
        naive_bilinear(torch.rot90(xz, 2, dims=(1, 2)), x, z, 1.0),
        naive_bilinear(torch.rot90(yz, -1, dims=(1, 2)), z, y, 1.0),
    ]


def test_v1_orientation_samples_as_the_reference_and_reads_upright():
    g = torch.Generator().manual_seed(0)
    planes = torch.randn(1, 3, 2, 6, 6, generator=g, dtype=torch.float64)
    pts = (torch.rand(1, 9, 3, generator=g, dtype=torch.float64) * 2 - 1) * 0.95
    dec = FieldDecoder(FieldConfig(channels=2, hidden=4)).double()  # v1 by default
    field = dec.bind(planes, planes)
    got = sample_planes(field.geometry, pts, 1.0)  # (1, 3, N, C)
    for n in range(9):
        want = reference_v1_features(planes[0], pts[0, n].tolist())
        for p in range(3):
            torch.testing.assert_close(got[0, p, n], want[p])
    # upright pictures: in the generated yz plane, the top row is +z and the last column +y
    ramp = torch.zeros(1, 3, 2, 6, 6, dtype=torch.float64)
    ramp[0, 2, 0] = torch.arange(6.0).view(6, 1)  # channel 0: row index
    ramp[0, 2, 1] = torch.arange(6.0).view(1, 6)  # channel 1: column index
    field = dec.bind(ramp, ramp)
    corner = torch.tensor([[[0.0, 1.0, 1.0]]], dtype=torch.float64)  # y = +1, z = +1
    assert sample_planes(field.geometry, corner, 1.0)[0, 2, 0].tolist() == [0.0, 5.0]
    fixed = FieldDecoder(FieldConfig(channels=2, hidden=4, plane_orientation="fixed")).double()
    assert torch.equal(fixed.bind(planes, planes).geometry, planes)
    with pytest.raises(ValueError, match="square"):
        dec.bind(torch.zeros(1, 3, 2, 4, 6), torch.zeros(1, 3, 2, 4, 6))
    with pytest.raises(ValueError, match="plane_orientation"):
        FieldConfig(plane_orientation="v2")
