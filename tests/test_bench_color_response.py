"""bench.color_response: one teacher's pull on the student's colours, step by step.

Known answer: the oracle SD teacher's x0 loss at CFG 1 is half the squared distance to the
true renders, so its steps move the field's colour from the initial grey to the prompt's
true colour (Adam's steps at this learning rate may overshoot it: the test asks for the
direction and a distance gained)."""

import pytest
import torch

from bench.color_response import respond
from prd.config import load
from teachers.scenes import scene_color
from tests.conftest import REPO, TINY_TRAINING


def test_the_oracle_moves_the_colour_to_the_prompts():
    overrides = ["student.pretrained=null", "cameras.n_views=2", "train.lr=0.03"]
    cfg = load([REPO / "configs" / "oracle.yaml"], overrides + TINY_TRAINING)
    history = respond(cfg, "sd", ["a green sphere"], steps=4, every=2)
    assert [step for step, _, _ in history] == [0, 2, 4]
    start, end = history[0][1][0], history[-1][1][0]
    coverage = history[0][2]
    assert coverage.shape == (1,) and 0.02 < coverage[0] < 0.98  # the initial sphere in view
    assert torch.all((start - 0.5).abs() < 0.05)  # the initial student is grey
    want = scene_color("a green sphere")
    moved, way = end - start, want - start
    assert torch.nn.functional.cosine_similarity(moved, way, dim=0) > 0.9, end
    assert (end - want).norm() < (start - want).norm() - 0.1, end


def test_an_unknown_teacher_is_named():
    cfg = load([REPO / "configs" / "oracle.yaml"], ["student.pretrained=null"] + TINY_TRAINING)
    with pytest.raises(ValueError, match="'nd'"):
        respond(cfg, "sd", ["a green sphere"], steps=1, every=1, hold="nd")
