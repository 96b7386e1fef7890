"""Resume on another world size (1 rank -> 2 -> 1), a damaged latest checkpoint, and
damaged files of our own: CPU, gloo, tiny."""

from __future__ import annotations

import pytest
import torch
from launching import RUN, STANDALONE_2, clean_env, prd_train, run, torchrun
from test_train import TINY, assert_same_tensors, export, load_cfg_of, tiny_cfg

import prd.train as train_mod
from prd import checkpoint, cli, reshard
from prd.distributed import DistInfo

# the learning rate drops to 0 from step 3 on: AdamW then leaves the weights exactly as
# they were, so the weights of step 3 show what a resume put into the ZeRO partitions
LR_ZERO_FROM_3 = ("train.lr_scale.begin=2", "train.lr_scale.end=0.0", "train.optimizer=adamw")


def saved(run_dir, step: int, name: str) -> dict:
    return torch.load(
        run_dir / checkpoint.CKPT_DIR / checkpoint.tag_for(step) / name, weights_only=False
    )


def dealt_stream(run_dir, rank: int, world: int, old_states: list[dict], batches: int):
    stream = train_mod.make_stream(
        load_cfg_of(run_dir), DistInfo(rank, world, rank, torch.device("cpu"))
    )
    stream.load_resharded(old_states)
    for _ in range(batches):
        stream.next_batch()
    return stream.state_dict()


def test_one_rank_to_two_to_one_with_a_damaged_latest(tmp_path, capsys):
    """1 rank trains steps 1-2; 2 ranks continue 3-4 (resharded: the fp32 master weights
    reach the new partitions, as step 3 at lr 0 keeps step 2's weights; each rank's stream
    is dealt from the 1-rank position); step 4's rank-1 optimizer file is cut in half; 1
    rank continues with --resume auto: the log names the file, step 3 is used, the damaged
    folder is set aside, every fp32 weight and optimizer moment gathered from the 1-rank
    engine equals step 3's consolidated copy, and the stream is dealt from both ranks."""
    run_dir = tmp_path / "run"
    extra = (*RUN[len(TINY) :], *LR_ZERO_FROM_3)
    train_mod.train(tiny_cfg(*extra, "train.steps=2"), run_dir)
    one_rank = [saved(run_dir, 2, "trainer_rank0.pt")["stream"]]  # pruned later (keep 2)
    run(
        torchrun(*STANDALONE_2, "-m", "prd") + prd_train(run_dir, *LR_ZERO_FROM_3, "train.steps=4"),
        clean_env(),
    )
    assert_same_tensors(export(run_dir, 3), export(run_dir, 2))
    for rank in (0, 1):
        state = saved(run_dir, 3, f"trainer_rank{rank}.pt")
        assert state["world_size"] == 2
        assert state["stream"] == dealt_stream(run_dir, rank, 2, one_rank, 1)

    # step 3 is pruned by the end (keep_ckpts 2): what it holds, read now
    consolidated = saved(run_dir, 3, reshard.CONSOLIDATED)["params"]
    two_ranks = [saved(run_dir, 3, f"trainer_rank{r}.pt")["stream"] for r in (0, 1)]
    ckpt = run_dir / checkpoint.CKPT_DIR
    (victim,) = (ckpt / checkpoint.tag_for(4)).glob("*rank_1*optim_states.pt")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    seen = {}
    real_load, real_restore = checkpoint.load_training_state, checkpoint.restore_position

    def load_spy(engine, *args):
        state = real_load(engine, *args)
        seen["gathered"] = reshard.consolidate(engine)
        return state

    def restore_spy(state, gen, stream, rank, seed):
        real_restore(state, gen, stream, rank, seed)
        seen["stream"] = stream.state_dict()

    mp = pytest.MonkeyPatch()
    mp.setattr(checkpoint, "load_training_state", load_spy)
    mp.setattr(checkpoint, "restore_position", restore_spy)
    try:
        summary = train_mod.train(tiny_cfg(*extra, "train.steps=5"), run_dir, resume="auto")
    finally:
        mp.undo()
    assert summary["step"] == 5
    log = capsys.readouterr().err
    assert f"{victim}: " in log and "truncated" in log and "using step 3" in log
    assert (ckpt / (checkpoint.tag_for(4) + ".corrupt") / victim.name).is_file()
    assert consolidated.keys() == seen["gathered"]["params"].keys()
    for name, tensors in consolidated.items():
        assert_same_tensors(tensors, seen["gathered"]["params"][name])
    assert seen["stream"] == dealt_stream(run_dir, 0, 1, two_ranks, 0)
    assert [r["step"] for r in checkpoint.read_metrics(run_dir)] == [1, 2, 3, 4, 5]


def test_damaged_files_are_named(tmp_path):
    bad = tmp_path / "trainer_rank0.pt"
    bad.write_bytes(b"\x80\x04junk")
    with pytest.raises(ValueError, match="trainer_rank0.pt: not a readable checkpoint"):
        checkpoint._load_own(bad)
    with pytest.raises(ValueError, match="no whole checkpoint"):
        (tmp_path / "ckpt" / "step_00000001").mkdir(parents=True)
        checkpoint.write_atomic(tmp_path / "ckpt" / "latest", "step_00000001")
        checkpoint.resumable_step(tmp_path)


@pytest.mark.parametrize(
    "args, resume, steps",
    [
        ([], False, 3),
        (["--resume"], True, 3),
        (["--resume", "auto"], "auto", 3),
        (["train.steps=7", "--resume=auto"], "auto", 7),
        (["train.steps=7", "--resume"], True, 7),
    ],
)
def test_resume_flag_forms(monkeypatch, tmp_path, args, resume, steps):
    got = {}

    def fake_train(cfg, run_dir, resume):
        got.update(resume=resume, steps=cfg.train.steps)
        return {"step": 0}

    monkeypatch.setattr(train_mod, "train", fake_train)
    assert cli.main(["train", "--out", str(tmp_path), *RUN, *args]) == 0
    assert got == {"resume": resume, "steps": steps}


def test_resume_takes_no_other_value(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--out", str(tmp_path), "--resume", "train.steps=7"])
    assert exit_.value.code == 2
    assert "put key=value overrides before --resume" in capsys.readouterr().err


def test_a_checkpoint_from_before_manifests_still_resumes(tmp_path):
    """A run folder whose checkpoint has trainer files but no manifest (written by an
    earlier prd) is trusted as ``latest`` names it; its world size is its trainer files."""
    tag = tmp_path / checkpoint.CKPT_DIR / checkpoint.tag_for(4)
    tag.mkdir(parents=True)
    for rank in (0, 1):
        (tag / f"trainer_rank{rank}.pt").write_bytes(b"state")
    checkpoint.write_atomic(tmp_path / checkpoint.CKPT_DIR / "latest", checkpoint.tag_for(4))
    assert checkpoint.resumable_step(tmp_path) == 4
    assert checkpoint._saved_world_size(tag) == 2
