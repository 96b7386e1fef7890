"""Cameras against their stated convention: sampling ranges, look-at frames, pixel-centre
rays (projected back with the OpenGL projection), rigid inverses."""

import math

import pytest
import torch

from renderers.cameras import (
    CameraSampling,
    camera_space,
    fov_for_extent,
    look_at,
    orbit_cameras,
    pixel_rays,
    projection_matrix,
    sample_cameras,
    world_to_clip,
)


def test_sampled_cameras_follow_the_configured_ranges():
    cfg = CameraSampling(n_views=4, elevation_range=(5.0, 25.0), distance_range=(1.4, 1.7))
    cams = sample_cameras(64, cfg, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert len(cams) == 64 * 4
    assert cams.elevation.min() >= 5.0 and cams.elevation.max() <= 25.0
    assert cams.distance.min() >= 1.4 and cams.distance.max() <= 1.7
    # The ranges are actually covered (uniform draws, 64 objects).
    assert cams.elevation.max() - cams.elevation.min() > 15.0
    assert cams.distance.max() - cams.distance.min() > 0.2
    # One elevation and distance per object; azimuths 360/V apart within an object.
    el, dist, az = (x.reshape(64, 4) for x in (cams.elevation, cams.distance, cams.azimuth))
    assert torch.equal(el, el[:, :1].expand(-1, 4))
    assert torch.equal(dist, dist[:, :1].expand(-1, 4))
    step = (az[:, 1:] - az[:, :-1]) % 360.0
    torch.testing.assert_close(step, torch.full_like(step, 90.0))
    assert az.min() >= 0.0 and az.max() < 360.0
    # The stored spherical coordinates are those of the camera centres.
    pos = cams.position
    torch.testing.assert_close(pos.norm(dim=-1), cams.distance)
    torch.testing.assert_close(torch.rad2deg(torch.asin(pos[:, 2] / cams.distance)), cams.elevation)
    az_pos = torch.rad2deg(torch.atan2(pos[:, 1], pos[:, 0])) % 360.0
    diff = (az_pos - cams.azimuth + 180.0) % 360.0 - 180.0
    assert diff.abs().max() < 1e-9
    assert torch.equal(cams.fov_y, torch.full_like(cams.fov_y, cfg.fov_y))


def test_sampling_is_seeded_and_spacing_follows_n_views():
    cfg = CameraSampling(n_views=6)
    a = sample_cameras(3, cfg, generator=torch.Generator().manual_seed(7))
    b = sample_cameras(3, cfg, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.c2w, b.c2w)
    az = a.azimuth.reshape(3, 6).double()
    step = (az[:, 1:] - az[:, :-1]) % 360.0
    torch.testing.assert_close(step, torch.full_like(step, 60.0), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_views=0),
        dict(elevation_range=(10.0, 5.0)),
        dict(elevation_range=(0.0, 90.0)),
        dict(distance_range=(0.0, 1.0)),
        dict(fov_y=180.0),
    ],
)
def test_sampling_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        CameraSampling(**kwargs)


def test_look_at_frames_are_orthonormal_and_face_the_origin():
    az = torch.tensor([0.0, 37.0, 90.0, 200.0, 315.0])
    el = torch.tensor([0.0, 30.0, -20.0, 60.0, 85.0])
    cams = orbit_cameras(az, el, torch.tensor([1.5, 2.0, 1.0, 3.0, 1.7]), dtype=torch.float64)
    rot = cams.c2w[:, :3, :3]
    eye = torch.eye(3, dtype=torch.float64).expand(5, 3, 3)
    torch.testing.assert_close(rot.transpose(1, 2) @ rot, eye)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(5, dtype=torch.float64))
    # The camera looks along its -z axis, straight at the origin.
    forward = -rot[:, :, 2]
    torch.testing.assert_close(forward, -cams.position / cams.position.norm(dim=-1, keepdim=True))
    # No roll: the right axis is horizontal and the up axis leans towards world +z.
    assert rot[:, 2, 0].abs().max() < 1e-12
    assert (rot[:, 2, 1] > 0).all()
    torch.testing.assert_close(cams.c2w[:, 3], torch.tensor([0.0, 0, 0, 1]).double().expand(5, 4))
    # The origin sits on the optical axis at depth -distance in camera space.
    origin_cam = camera_space(torch.zeros(5, 1, 3, dtype=torch.float64), cams)[:, 0]
    expect = torch.stack([torch.zeros(5), torch.zeros(5), -cams.distance.float()], -1)
    torch.testing.assert_close(origin_cam, expect.double())


def test_look_at_known_frame_and_refusal():
    # Camera on +x looking at the origin, z up: right is world +y, up is world +z.
    c2w = look_at(torch.tensor([[2.0, 0.0, 0.0]]))
    expect = torch.tensor([[0.0, 0, 1, 2], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    torch.testing.assert_close(c2w[0], expect)
    with pytest.raises(ValueError, match="up hint"):
        look_at(torch.tensor([[0.0, 0.0, 2.0]]))


def test_w2c_is_the_inverse_of_c2w():
    cams = sample_cameras(
        5, CameraSampling(), generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    eye = torch.eye(4, dtype=torch.float64).expand(20, 4, 4)
    torch.testing.assert_close(cams.w2c() @ cams.c2w, eye)
    torch.testing.assert_close(torch.linalg.inv(cams.c2w), cams.w2c())


@pytest.mark.parametrize("height,width", [(8, 8), (6, 10)])
def test_rays_pass_through_pixel_centres(height, width):
    cams = orbit_cameras(
        torch.tensor([10.0, 130.0]), torch.tensor([15.0, -5.0]), 1.6, fov_y=50.0,
        dtype=torch.float64,
    )  # fmt: skip
    o, d = pixel_rays(cams, height, width)
    assert o.shape == d.shape == (2, height, width, 3)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(2, height, width, dtype=torch.float64))
    torch.testing.assert_close(o, cams.position[:, None, None, :].expand_as(o))
    # Project a point of each ray back to normalized device coordinates.
    pts = o + 2.0 * d
    homo = torch.cat([pts, torch.ones_like(pts[..., :1])], dim=-1).reshape(2, -1, 4)
    if height == width:
        mvp = world_to_clip(cams)
    else:
        mvp = projection_matrix(cams.fov_y, 0.1, 4.0, aspect=width / height) @ cams.w2c()
    clip = homo @ mvp.transpose(1, 2)
    ndc = (clip[..., :3] / clip[..., 3:]).reshape(2, height, width, 3)
    rows = torch.arange(height, dtype=torch.float64)
    cols = torch.arange(width, dtype=torch.float64)
    expect_x = (2 * (cols + 0.5) / width - 1).expand(2, height, width)
    expect_y = (1 - 2 * (rows + 0.5) / height)[:, None].expand(2, height, width)
    torch.testing.assert_close(ndc[..., 0], expect_x)
    torch.testing.assert_close(ndc[..., 1], expect_y)
    # The middle of the image looks at the origin (even sizes: between the 4 centre pixels).
    centre = d[:, height // 2 - 1 : height // 2 + 1, width // 2 - 1 : width // 2 + 1].mean((1, 2))
    centre = centre / centre.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(centre, -cams.position / cams.position.norm(dim=-1, keepdim=True))


def test_sub_grid_rays_match_the_full_grid():
    cams = orbit_cameras(30.0, 10.0, 1.5, dtype=torch.float64)
    o, d = pixel_rays(cams, 12, 12)
    rows, cols = torch.tensor([0, 5, 11]), torch.tensor([3, 4])
    o_s, d_s = pixel_rays(cams, 12, 12, rows=rows, cols=cols)
    torch.testing.assert_close(d_s, d[:, rows][:, :, cols])
    torch.testing.assert_close(o_s, o[:, rows][:, :, cols])
    # A coarse grid of the full image equals the full grid at the coarse resolution.
    coarse = (torch.arange(4, dtype=torch.float64) + 0.5) * 12 / 4 - 0.5
    _, d_c = pixel_rays(cams, 12, 12, rows=coarse, cols=coarse)
    torch.testing.assert_close(d_c, pixel_rays(cams, 4, 4)[1])


def test_focal_and_fov_for_extent():
    cams = orbit_cameras(0.0, 0.0, 2.0, fov_y=60.0, dtype=torch.float64)
    torch.testing.assert_close(cams.focal(64), torch.tensor([32 / math.tan(math.pi / 6)]).double())
    assert fov_for_extent(1.0, 1.0) == pytest.approx(90.0)
