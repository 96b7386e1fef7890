"""The shipped prompt set and the compositional templates' held-out diagonal."""

import pytest

from prompts.clean import clean_prompt, dedup_key
from prompts.templates import ACTIVITIES, STYLES, SUBJECTS, expand_templates, object_prompts


def test_object_prompts_are_clean_and_unique():
    p = object_prompts()
    assert len(p) >= 300
    assert all(clean_prompt(x) == x for x in p)
    assert len({dedup_key(x) for x in p}) == len(p)


def test_grid_split():
    s = expand_templates(holdout_every=7)
    n = len(SUBJECTS) * len(ACTIVITIES) * len(STYLES)
    assert len(s.train) + len(s.heldout) == n
    assert not set(s.train) & set(s.heldout)
    # Held-out count: cells with (i + j + k) % 7 == 0, counted naively.
    want = sum(
        (i + j + k) % 7 == 0
        for i in range(len(SUBJECTS))
        for j in range(len(ACTIVITIES))
        for k in range(len(STYLES))
    )
    assert len(s.heldout) == want
    assert s.heldout[0] == "a pig riding a bicycle, a 3d model"
    assert expand_templates() == expand_templates()  # deterministic
    # Every part is seen in training.
    for part in (*SUBJECTS, *ACTIVITIES, *STYLES):
        assert any(part in t for t in s.train)


def test_small_grid_and_checks():
    s = expand_templates(["a", "b"], ["x", "y"], ["1", "2"], "{subject}{activity}{style}", 3)
    assert s.heldout == ("ax1", "by2")  # index sums 0 and 3
    with pytest.raises(ValueError, match="holdout_every"):
        expand_templates(holdout_every=1)
    with pytest.raises(ValueError, match="styles"):
        expand_templates(styles=["one"])
