"""Planned kill -9s in ``prd train`` ranks, for the restart tests (not a test module).

Python imports ``sitecustomize`` at start-up from its path, so with this folder on
PYTHONPATH every rank a launcher starts (launch/torchrun.sh, unchanged) gets the plan:

    PYTHONPATH=tests/crash_site PRD_KILLS="save:2:0,batch:5:1" PRD_KILL_MARKS=DIR \
        bash launch/torchrun.sh --config ... --out ...

``save:S:R``: rank R kills itself with SIGKILL while saving the checkpoint of step S,
after DeepSpeed wrote its files and before the manifest and ``latest`` are written.
``batch:N:R``: rank R kills itself when it asks the prompt stream for its N-th batch (in
the middle of training). Each kill happens once: a file in PRD_KILL_MARKS records it, so
the restarted group runs through.
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
    from prd import checkpoint
    from prompts.stream import PromptStream

    real_consolidate = checkpoint.consolidate
    saving = {"step": 0}

    def consolidate(engine):
        out = real_consolidate(engine)
        kill_once("save", saving["step"])
        return out

    real_save = checkpoint.save_training_state

    def save_training_state(engine, run_dir, step, rank, trainer_state):
        saving["step"] = step
        real_save(engine, run_dir, step, rank, trainer_state)

    real_next = PromptStream.next_batch
    calls = {"n": 0}

    def next_batch(self):
        calls["n"] += 1
        kill_once("batch", calls["n"])
        return real_next(self)

    checkpoint.consolidate = consolidate
    checkpoint.save_training_state = save_training_state
    PromptStream.next_batch = next_batch


if PLAN and RANK >= 0:
    install()
