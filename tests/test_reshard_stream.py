"""The prompt stream on another world size after resume: within every epoch, no prompt is
lost or repeated (counted), and a carried stream resumes exactly at its own world size."""

import json
from collections import Counter

import pytest
from conftest import curate_shards

from prompts.stream import PromptStream

pytestmark = pytest.mark.filterwarnings("ignore:4 shards.*not a multiple")

PROMPTS = [
    f"a {c} {o} number {i}"
    for c in ("red", "blue", "green")
    for o in ("cup", "car")
    for i in range(9)
]
PROMPTS += ["a golden crown", "a stone bridge"]  # 56 prompts


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return curate_shards(tmp_path_factory.mktemp("reshard"), PROMPTS)


def take(streams, n_batches, seen):
    """n_batches batches per rank in lockstep (as training draws them); each prompt is
    recorded with the epoch the stream said it belongs to (batch size 1: one a call)."""
    for _ in range(n_batches):
        for s in streams:
            epoch = s.epoch
            (prompt,) = s.next_batch()
            seen.setdefault(epoch, []).append(prompt)


def json_states(streams):
    return [json.loads(json.dumps(s.state_dict())) for s in streams]


def check_epochs(seen, total):
    """Every epoch holds each prompt at most once; all but the last epoch(s) in progress
    hold each prompt exactly once."""
    for epoch, got in seen.items():
        assert max(Counter(got).values()) == 1, f"epoch {epoch} repeats a prompt"
    full = [e for e, got in seen.items() if len(got) == total]
    assert full == list(range(len(full))) and full, seen.keys()
    for e in full:
        assert Counter(seen[e]) == Counter(PROMPTS)


@pytest.mark.parametrize("source_kind", ["list", "folder"])
@pytest.mark.parametrize(
    "layouts",
    [(2, 1), (1, 2), (2, 3), (3, 2, 1), (2, 4, 2)],
    ids=["2to1", "1to2", "2to3", "3to2to1", "2to4to2"],
)
def test_no_prompt_lost_or_repeated_across_world_sizes(folder, source_kind, layouts):
    source = folder if source_kind == "folder" else PROMPTS
    seen: dict[int, list[str]] = {}
    # 23 and 17 batches: mid-epoch, and the old ranks straddle an epoch end (56 / 3 ranks)
    world = layouts[0]
    streams = [PromptStream(source, 1, rank=r, world_size=world, seed=5) for r in range(world)]
    for n_batches, world in zip((23, 17, 11), layouts[1:]):
        take(streams, n_batches, seen)
        states = json_states(streams)
        streams = [PromptStream(source, 1, rank=r, world_size=world, seed=5) for r in range(world)]
        for s in streams:
            s.load_resharded(states)
    take(streams, 60, seen)
    check_epochs(seen, len(PROMPTS))


@pytest.mark.parametrize("source_kind", ["list", "folder"])
def test_a_carried_stream_resumes_exactly_at_its_world_size(folder, source_kind):
    """2 ranks -> 3 ranks, then a save mid-carry and a same-size resume: the batches are
    those of the uninterrupted 3-rank streams; the state drops the carry once consumed."""
    source = folder if source_kind == "folder" else PROMPTS
    old = [PromptStream(source, 3, rank=r, world_size=2, seed=1) for r in range(2)]
    for s in old:
        for _ in range(4):
            s.next_batch()
    states = json_states(old)

    def resharded(r):
        s = PromptStream(source, 3, rank=r, world_size=3, seed=1)
        s.load_resharded(states)
        return s

    for r in range(3):
        a, b = resharded(r), resharded(r)
        straight = [a.next_batch() for _ in range(12)]
        b.next_batch()
        state = json.loads(json.dumps(b.state_dict()))
        assert state["carry"] is not None and state["carry"]["taken"] == 3
        c = PromptStream(source, 3, rank=r, world_size=3, seed=1)
        c.load_state_dict(state)
        assert [straight[0]] + [c.next_batch() for _ in range(11)] == straight
        assert c.state_dict()["carry"] is None  # 32 carried prompts / 3 ranks < 11 batches
        assert c.state_dict() == a.state_dict()


def test_prompt_ids_name_the_prompts_each_rank_reads(folder):
    """rank_ids (no data read) agree with the prompts the stream yields, 4 shards on 2
    ranks (shards dealt) and on 3 (every rank reads all, keeps 1 in 3)."""
    for world in (2, 3):
        for r in range(world):
            s = PromptStream(folder, 1, rank=r, world_size=world, seed=2)
            n = len(s)
            got = [s.next_batch()[0] for _ in range(n + 4)]
            ids = list(s.rank_ids(0, r, world)) + list(s.rank_ids(1, r, world)[:4])
            assert got == s._prompts_of(ids)


def test_states_of_other_data_are_refused():
    a = PromptStream(PROMPTS, 2, rank=0, world_size=1, seed=0)
    b = PromptStream(PROMPTS[:-1], 2, rank=0, world_size=2, seed=0)
    with pytest.raises(ValueError, match="another fingerprint"):
        b.load_resharded([a.state_dict()])
    with pytest.raises(ValueError, match="entry 0 is rank 1 of 2"):
        a.load_resharded(
            [b.state_dict() | {"rank": 1, "fingerprint": a.state_dict()["fingerprint"]}]
        )
