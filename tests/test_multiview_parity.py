"""Parity with the original MVDream code (tests/data/mvdream_parity) and the camera encodings."""

import json
import math
from pathlib import Path

import pytest
import torch

from renderers.cameras import orbit_cameras
from teachers import mvdream, richdreamer

DATA = Path(__file__).parent / "data" / "mvdream_parity"
META = json.loads((DATA / "meta.json").read_text())
ATOL = 2e-5  # fp32 CPU (meta.json: SDPA vs einsum and thread count move outputs by ~4e-6)


@pytest.fixture(scope="module")
def io():
    return torch.load(DATA / "io.pt", weights_only=True)


@pytest.fixture(scope="module")
def unet():
    return mvdream.load_original(DATA / "ckpt.pt", **META["constructor_kwargs"])


@pytest.mark.parametrize(
    "out, camera, frames",
    [
        ("out_num_frames_4", "camera", 4),
        ("out_num_frames_1", "camera", 1),
        ("out_num_frames_4_camera_alt", "camera_alt", 4),
        ("out_num_frames_4_camera_none", None, 4),
    ],
)
def test_matches_the_original_unet(unet, io, out, camera, frames):
    cam = io[camera] if camera else None
    with torch.no_grad():
        got = unet(
            io["x"], timesteps=io["timesteps"], context=io["context"], camera=cam, num_frames=frames
        )
    torch.testing.assert_close(got, io[out], atol=ATOL, rtol=0)


def test_matches_the_original_at_small_activations(io):
    """GroupNorm eps values (1e-5 ResBlocks, 1e-6 transformers) matter at O(1) here."""
    probe = torch.load(DATA / "eps_probe.pt", weights_only=True)
    sd = torch.load(DATA / "ckpt.pt", weights_only=True)
    sd.update(probe["overrides"])
    model = mvdream.load_original(sd, **META["constructor_kwargs"])
    with torch.no_grad():
        got = model(
            io["x"],
            timesteps=io["timesteps"],
            context=io["context"],
            camera=io["camera"],
            num_frames=4,
        )
    torch.testing.assert_close(got, probe["out_num_frames_4"], atol=ATOL, rtol=0)


def test_get_camera_reproduces_the_original_tables(io):
    tables = json.loads((DATA / "cameras.json").read_text())["tables"]
    for name, table in tables.items():
        blender = "blender_coord=False" not in name
        for row in table["rows"]:
            got = mvdream.get_camera(1, row["elevation"], row["azimuth"], blender_coord=blender)
            nd = richdreamer.get_camera(1, row["elevation"], row["azimuth"], blender_coord=blender)
            want = torch.tensor([row["camera"]], dtype=torch.float32)
            torch.testing.assert_close(got, want, atol=1e-7, rtol=0)
            torch.testing.assert_close(nd, want, atol=1e-7, rtol=0)
    cams = torch.cat([mvdream.get_camera(4, 15, 0), mvdream.get_camera(4, 30, 45)])
    torch.testing.assert_close(cams, io["camera"], atol=1e-7, rtol=0)
    torch.testing.assert_close(mvdream.get_camera(4, 0, 90).repeat(2, 1), io["camera_alt"])


def test_get_camera_hand_computed():
    # elevation 30, azimuth 90: Y-up position (cos 30, sin 30, 0); right = up x back = (0, 0, -1);
    # cam up = back x right = (-sin 30, cos 30, 0). Blender axes: (x, y, z) -> (x, -z, y).
    s, c = 0.5, math.sqrt(3) / 2
    want = torch.tensor(
        [[0.0, -s, c, c], [1.0, 0.0, 0.0, 0.0], [0.0, c, s, s], [0.0, 0.0, 0.0, 1.0]]
    )
    torch.testing.assert_close(mvdream.get_camera(1, 30, 90).view(4, 4), want, atol=1e-7, rtol=0)
    gl = want.clone()
    gl[:3] = torch.tensor([[0.0, -s, c, c], [0.0, c, s, s], [-1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(
        mvdream.get_camera(1, 30, 90, blender_coord=False).view(4, 4), gl, atol=1e-7, rtol=0
    )
    far = richdreamer.get_camera(1, 30, 90, camera_distance=2.5).view(4, 4)
    torch.testing.assert_close(far[:3, 3], 2.5 * want[:3, 3])
    torch.testing.assert_close(far[:3, :3], want[:3, :3])
    # four views 90 degrees apart starting at 45
    az = [45.0, 135.0, 225.0, 315.0]
    torch.testing.assert_close(
        mvdream.get_camera(4, 15, 45), torch.cat([mvdream.get_camera(1, 15, a) for a in az])
    )


def _cameras():
    return orbit_cameras(
        torch.tensor([10.0, 100.0, 200.0, 300.0, 0.0]),
        torch.tensor([0.0, 15.0, 30.0, -20.0, 45.0]),
        torch.tensor([1.5, 1.4, 1.7, 1.6, 1.39]),
        fov_y=torch.tensor([60.0, 50.0, 40.0, 45.0, 60.0]),
    )


def test_mvdream_camera_condition_is_get_camera_at_azimuth_plus_90():
    cams = _cameras()
    c2w = cams.c2w.clone()
    got = mvdream.camera_condition(cams)
    want = torch.cat(
        [
            mvdream.get_camera(1, e, a + 90)
            for e, a in zip(cams.elevation.tolist(), cams.azimuth.tolist())
        ]
    )
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert torch.equal(cams.c2w, c2w)  # the input is not normalized in place


def test_nd_camera_condition_is_nd_get_camera_at_twice_the_relative_distance():
    cams = _cameras()
    got = richdreamer.camera_condition(cams)
    rows = []
    for e, a, d, f in zip(
        *(v.tolist() for v in (cams.elevation, cams.azimuth, cams.distance, cams.fov_y))
    ):
        d_rel = d * math.tan(math.radians(f) / 2)
        rows.append(richdreamer.get_camera(1, e, a, camera_distance=2 * d_rel))
    torch.testing.assert_close(got, torch.cat(rows), atol=1e-6, rtol=0)
    # the ND translation is not MVDream's unit one: the x2 relative distance matters
    assert (got.view(-1, 4, 4)[:, :3, 3].norm(dim=-1) - 1).abs().max() > 0.1
