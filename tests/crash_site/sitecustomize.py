"""Planned kill -9s in ``prd train`` ranks, for the restart tests (not a test module).

Python imports ``sitecustomize`` at start-up from its path, so with this folder on
PYTHONPATH every rank a launcher starts (launch/torchrun.sh, unchanged) gets the plan:

    PYTHONPATH=tests/crash_site PRD_KILLS="save:2:0,step:3:1" PRD_KILL_MARKS=DIR \
        bash launch/torchrun.sh --config ... --out ...

``save:S:R``: rank R kills itself with SIGKILL while saving the checkpoint of step S,
after DeepSpeed wrote its files and before the manifest and ``latest`` are written.
``step:S:R``: rank R kills itself as training step S (1-based) begins (its ramps, the
learning rate first, are read with the step's index). Each kill happens once: a file in
PRD_KILL_MARKS records it, so the restarted group runs through.
"""

import os
import signal
from pathlib import Path

RANK = int(os.environ.get("RANK", "-1"))  # only ranks (not the launcher) take part
MARKS = Path(os.environ.get("PRD_KILL_MARKS", "."))
PLAN = [k.split(":") for k in os.environ.get("PRD_KILLS", "").split(",") if k]


def kill_once(kind: str, at: int) -> None:
    for k, step, rank in PLAN:
        mark = MARKS / f"{k}-{step}-{rank}"
        if k == kind and int(step) == at and int(rank) == RANK and not mark.exists():
            mark.write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)


def install() -> None:
    from prd import checkpoint, reshard
    from prd.losses import Ramp

    real_consolidate = reshard.consolidate
    saving = {"step": 0}

    def consolidate(engine):
        out = real_consolidate(engine)
        kill_once("save", saving["step"])
        return out

    real_save = checkpoint.save_training_state

    def save_training_state(engine, run_dir, step, rank, trainer_state):
        saving["step"] = step
        real_save(engine, run_dir, step, rank, trainer_state)

    real_at = Ramp.at

    def at(self, step):  # every training step reads its ramps (lr first) with its index
        kill_once("step", step + 1)
        return real_at(self, step)

    reshard.consolidate = consolidate
    checkpoint.save_training_state = save_training_state
    Ramp.at = at


if PLAN and RANK >= 0:
    install()
