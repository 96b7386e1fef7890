"""bench.teacher_pull: the derivative of a teacher's loss w.r.t. an object's opacity.

Known answer: an oracle teacher's x0 loss at CFG 1 is half the squared distance to the true
render, so along the fade rgb = a * object + (1 - a) * background the loss is a parabola in
a with its minimum at the true opacity a = 1: dL/da is linear in a and crosses zero there.
"""

from pathlib import Path

import pytest
import torch

from bench.teacher_pull import PROMPTS, color_pull_cosine, pull, pull_and_target
from prd.config import load
from prd.teacher_setup import build_teachers
from renderers.cameras import sample_cameras
from teachers.scenes import COLORS, SHAPES, TRAIN_PROMPTS, parse_prompt, render_scenes, scene_color

REPO = Path(__file__).resolve().parents[1]


def test_default_prompts_are_training_prompts_of_every_shape_and_colour():
    assert set(PROMPTS) <= set(TRAIN_PROMPTS)
    assert {parse_prompt(p)[0] for p in PROMPTS} == set(COLORS)
    assert {parse_prompt(p)[1] for p in PROMPTS} == set(SHAPES)


def oracle_scene(prompt):
    """The oracle preset's teachers, one camera set and the true render of the prompt."""
    torch.set_num_threads(1)
    cfg = load([REPO / "configs" / "oracle.yaml"], [])
    background = torch.tensor(cfg.train.background)
    n = cfg.cameras.n_views
    gen = torch.Generator().manual_seed(0)
    cams = sample_cameras(1, cfg.cameras, gen)
    shape = parse_prompt(prompt)[1]
    color = scene_color(prompt)[None].expand(n, 3)
    render = render_scenes([shape] * n, color, cams, 32, tuple(background.tolist()), 2)
    teachers = build_teachers(cfg.teachers, cfg.train.background, n)
    return teachers, render, cams, background, gen


@pytest.mark.parametrize("prompt", ["a red capsule", "a blue torus"])
def test_an_oracle_pulls_a_faded_object_back_to_its_true_opacity(prompt):
    teachers, render, cams, background, gen = oracle_scene(prompt)
    for teacher in teachers:
        d = {a: pull(teacher, render, cams, prompt, background, a, 2, gen) for a in (0.5, 0.75)}
        for a, draws in d.items():  # the oracle's target does not depend on the noise
            assert draws[0] == pytest.approx(draws[1], rel=1e-4), teacher.name
            assert draws[0] < 0, (teacher.name, a, draws)
        slope = (d[0.75][0] - d[0.5][0]) / 0.25
        zero = 0.5 - d[0.5][0] / slope
        # the renders of the teacher and of this test differ by antialiasing only
        assert zero == pytest.approx(1.0, abs=0.03), (teacher.name, zero)
        (at_one,) = pull(teacher, render, cams, prompt, background, 1.0, 1, gen)
        assert at_one == pytest.approx(d[0.5][0] + slope * 0.5, rel=1e-3, abs=1e-2)


def test_an_oracle_paints_its_prompt_colour():
    """An oracle's x0 target is the true render: its object pixels carry the scene's
    unlit albedo (up to antialiased edge pixels); the normal-depth role reports none."""
    prompt = "a green sphere"
    teachers, render, cams, background, gen = oracle_scene(prompt)
    for teacher in teachers:
        (draw,) = pull_and_target(teacher, render, cams, prompt, background, 0.5, 1, gen)
        target = draw.target_color
        if teacher.name == "richdreamer":
            assert target is None
        else:
            torch.testing.assert_close(target, scene_color(prompt), atol=0.04, rtol=0)


def test_an_oracle_pulls_a_grey_object_straight_to_its_colour():
    """Painted grey, the oracle's x0 loss at CFG 1 is half the squared pixel distance to the
    true render, so its gradient w.r.t. a shift of the object's colour is the coverage-
    weighted sum of (grey - true colour): the pull's cosine with the way to the prompt's
    colour is 1 up to antialiased edges. The normal-depth teacher is blind to colour."""
    prompt = "a blue torus"
    teachers, render, cams, background, gen = oracle_scene(prompt)
    grey = torch.full((3,), 0.5)
    painted = render.rgb + (grey - scene_color(prompt)) * render.mask[..., None]
    render.rgb = painted
    for teacher in teachers:
        draws = pull_and_target(teacher, render, cams, prompt, background, 1.0, 1, gen)
        cos = color_pull_cosine(draws, grey, scene_color(prompt))
        if teacher.name == "richdreamer":
            assert draws[0].color_grad.abs().max() == 0
        else:
            assert cos == pytest.approx(1.0, abs=1e-3), teacher.name
    assert color_pull_cosine(draws, scene_color(prompt), scene_color(prompt)) is None
