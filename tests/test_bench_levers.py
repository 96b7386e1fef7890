"""bench.levers: each lever's pair of settings gives the same values and gradients (the
chunks change memory only), at toy sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.levers import LEVERS, SETTINGS, lever_config, measure

CONFIG = [str(Path(__file__).resolve().parents[1] / "configs" / "sd21.yaml")]
TINY = [
    "student.arch=tiny",
    "student.triplane_channels=8",
    "field.channels=8",
    "field.hidden=16",
    "mesh_grid=24",
    "mesh.resolution=24",
]


@pytest.mark.parametrize("lever", sorted(LEVERS))
def test_lever_settings_give_the_same_gradients(lever):
    runs = [measure(lever, lever_config(lever, s, CONFIG, TINY)) for s in SETTINGS]
    a, b = runs
    assert a["value"] == pytest.approx(b["value"], rel=1e-5)
    assert a["grad_norms"].keys() == b["grad_norms"].keys()
    for name, norm in a["grad_norms"].items():
        assert norm > 0, f"{lever}: no gradient reached {name}"
        assert b["grad_norms"][name] == pytest.approx(norm, rel=1e-5), name
    if lever == "mesh":  # the random field renders a surface, not only background
        assert 0.02 < a["covered"] < 0.98
        assert b["covered"] == pytest.approx(a["covered"], rel=1e-6)
    for run in runs:
        # the kernel raises its high-water mark lazily (on unmapping, not on each page
        # fault): pages that malloc hands back with madvise between the reset and the
        # final read can leave the peak a few pages under the RSS read after the reset
        assert run["peak_rss_gib"] >= run["rss_built_gib"] - 2**-10 > 0
