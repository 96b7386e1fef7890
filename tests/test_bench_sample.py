"""bench.sample's GPU estimate: the op / byte counter and how each stage is costed."""

import pytest
import torch

from bench.sample import CHIPS, LAUNCH_SECONDS, TrafficCounter, gpu_estimate


def test_traffic_counter_counts_bytes_of_ops_not_views():
    x, y = torch.ones(10), torch.ones(10, dtype=torch.float64)
    with TrafficCounter() as counter:
        z = x[2:]  # a view: moves nothing
        w = z.double() + y[2:]  # copy 8 floats in, 8 doubles out; add 3 x 8 doubles
    assert w.shape == (8,)
    assert counter.ops == 2
    assert counter.bytes == (8 * 4 + 8 * 8) + 3 * 8 * 8


def test_gpu_estimate_costs_marching_cubes_by_traffic_or_host_time():
    row = {
        "flops_per_mesh": {"unet_step_1": 3e12, "marching_cubes": 0, "export": 0},
        "seconds": {"unet_step_1": 50.0, "marching_cubes": 0.15, "export": 0.1},
        "grid_bytes_per_mesh": 0,
        "marching_cubes_traffic_per_mesh": [100, 4e9],
        "isosurface": "torch",
    }
    peak, bandwidth = CHIPS["A100"]
    est = gpu_estimate(row, "A100", 0.5)["seconds"]
    assert est["unet_step_1"] == pytest.approx(3e12 / (0.5 * peak))
    assert est["marching_cubes"] == pytest.approx(4e9 / bandwidth + 100 * LAUNCH_SECONDS)
    assert est["export"] == 0.1  # on the host: the measured time
    row["isosurface"] = "skimage"
    assert gpu_estimate(row, "A100", 0.5)["seconds"]["marching_cubes"] == 0.15
