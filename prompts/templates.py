"""The shipped prompt set and compositional templates with a held-out diagonal.

`object_prompts()` reads `prompts/data/objects.txt`, a few hundred object-centric prompts
(animals, food, furniture, instruments, vehicles, characters, buildings) written for
this project. `expand_templates` composes subject x activity x style prompts in the
manner of ATT3D's compositional prompt sets and holds out a diagonal of the grid, so that
generalization to unseen combinations of seen parts can be measured: every subject,
activity and style still occurs in training, only some of their combinations do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

SUBJECTS = (
    "a pig",
    "a corgi",
    "a squirrel",
    "a frog",
    "a penguin",
    "a bear cub",
    "an owl",
    "a raccoon",
    "a hamster",
    "a fox",
    "a turtle",
    "a rabbit",
)
ACTIVITIES = (
    "riding a bicycle",
    "playing a guitar",
    "reading a book",
    "holding an umbrella",
    "eating an ice cream cone",
    "wearing a crown",
    "sitting on a stack of books",
    "carrying a backpack",
    "wearing a knitted scarf",
    "juggling three balls",
)
STYLES = (
    "a 3d model",
    "made of clay",
    "made of lego bricks",
    "a wooden carving",
    "a plush toy",
    "a bronze statue",
    "low poly",
)
TEMPLATE = "{subject} {activity}, {style}"


@dataclass(frozen=True)
class CompositionalSet:
    """Prompts of a subject x activity x style grid split into train and held-out cells."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]


def expand_templates(
    subjects: Sequence[str] = SUBJECTS,
    activities: Sequence[str] = ACTIVITIES,
    styles: Sequence[str] = STYLES,
    template: str = TEMPLATE,
    holdout_every: int = 7,
) -> CompositionalSet:
    """Every combination through `template`; cell (i, j, k) is held out when
    (i + j + k) % holdout_every == 0 — a diagonal of the grid.

    Deterministic (nested order subject, activity, style). With holdout_every >= 2 and
    lists of length >= 2 every part still appears in a training prompt.
    """
    if holdout_every < 2:
        raise ValueError(f"holdout_every must be >= 2 (1 would hold out all), got {holdout_every}")
    for name, items in (("subjects", subjects), ("activities", activities), ("styles", styles)):
        if len(items) < 2 or len(set(items)) != len(items):
            raise ValueError(f"{name} needs >= 2 distinct entries, got {list(items)}")
    train, held = [], []
    for i, s in enumerate(subjects):
        for j, a in enumerate(activities):
            for k, st in enumerate(styles):
                text = template.format(subject=s, activity=a, style=st)
                (held if (i + j + k) % holdout_every == 0 else train).append(text)
    return CompositionalSet(tuple(train), tuple(held))


def object_prompts() -> list[str]:
    """The shipped object-centric prompts, in file order."""
    text = resources.files("prompts").joinpath("data/objects.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
