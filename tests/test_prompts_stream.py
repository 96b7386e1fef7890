"""Prompt streaming: epochs, rank partition, and exact resume; the embedding cache."""

import json
from collections import Counter

import pytest
import torch
from conftest import curate_shards

from prompts.embed_cache import EmbeddingCache
from prompts.stream import PromptStream

PROMPTS = [
    f"a {c} {o} number {i}"
    for c in ("red", "blue", "green")
    for o in ("cup", "car")
    for i in range(9)
] + ["a golden crown", "a stone bridge"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return curate_shards(tmp_path_factory.mktemp("stream"), PROMPTS)


def run(source, ranks, batch, n_batches, resume_at=None, **kw):
    """Batches per rank; with resume_at, each rank's stream is rebuilt from its state
    (through JSON) after that many batches, as after a kill and restart."""
    out = {}
    for r in range(ranks):
        s = PromptStream(source, batch, rank=r, world_size=ranks, **kw)
        got = []
        for b in range(n_batches):
            if b == resume_at:
                state = json.loads(json.dumps(s.state_dict()))
                s = PromptStream(source, batch, rank=r, world_size=ranks, **kw)
                s.load_state_dict(state)
            got.append(s.next_batch())
        out[r] = got
    return out


@pytest.mark.parametrize("source_kind", ["folder", "list"])
def test_epoch_partition_and_exact_resume(folder, source_kind):
    source = folder if source_kind == "folder" else PROMPTS
    n = len(PROMPTS)  # 56: 4 shards of 14, 28 per rank; batches of 5 cross epochs
    plain = run(source, 2, 5, 12, seed=3)
    flat = {r: [p for b in plain[r] for p in b] for r in plain}
    # One epoch over both ranks is every prompt exactly once.
    first = flat[0][: n // 2] + flat[1][: n // 2]
    assert Counter(first) == Counter(PROMPTS)
    second = flat[0][n // 2 : n] + flat[1][n // 2 : n]
    assert Counter(second) == Counter(PROMPTS)
    assert first != second  # epochs are reshuffled
    for at in (1, 5, 6):  # mid-epoch, last batch of the epoch (28 = 5*5 + 3), next epoch
        assert run(source, 2, 5, 12, resume_at=at, seed=3) == plain
    assert run(source, 2, 5, 3, seed=4) != {r: plain[r][:3] for r in plain}
    # Resume exactly at an epoch boundary (28 = 7 batches of 4).
    assert run(source, 2, 4, 9, resume_at=7, seed=3) == run(source, 2, 4, 9, seed=3)


def test_epoch_counter_and_no_shuffle(folder):
    s = PromptStream(PROMPTS, 10, shuffle=False)
    assert s.epoch == 0 and len(s) == 56
    batches = [s.next_batch() for _ in range(6)]
    assert batches[0] == PROMPTS[:10]
    assert batches[5] == PROMPTS[50:] + PROMPTS[:4] and s.epoch == 1


def test_indivisible_shards_warn_and_partition(folder):
    with pytest.warns(UserWarning, match="not a multiple of world size 3"):
        plain = run(folder, 3, 4, 5, seed=1)
    flat = [p for r in plain for b in plain[r][:4] for p in b[:]]
    # 56 / 3 >= 18 per rank and epoch: the first 4 batches (16) of all ranks are distinct.
    assert len(set(flat)) == len(flat)
    with pytest.warns(UserWarning):
        assert run(folder, 3, 4, 5, resume_at=2, seed=1) == plain


def test_state_mismatch_is_loud(folder):
    state = PromptStream(PROMPTS, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1"):
        PromptStream(PROMPTS, 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint"):
        PromptStream(PROMPTS[:-1], 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="gets no prompts"):
        PromptStream(["one"], 1, rank=1, world_size=2)


def test_embedding_cache_hits_and_misses(tmp_path):
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        return torch.stack([torch.full((2, 3), float(len(p))) + torch.arange(3.0) for p in prompts])

    cache = EmbeddingCache(tmp_path, "clip-test", shard_size=3, batch_size=2)
    a = cache.get_or_compute(["aa", "bbb", "aa", "c"], encode)
    assert calls == [["aa", "bbb"], ["c"]]  # unique misses, batched by 2
    assert torch.equal(a, encode(["aa", "bbb", "aa", "c"]))
    assert (cache.hits, cache.misses) == (1, 3)
    calls.clear()
    b = cache.get_or_compute(["c", "dddd", "aa"], encode)
    assert calls == [["dddd"]] and torch.equal(b, encode(["c", "dddd", "aa"]))
    cache.close()
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 2  # flushed at 3, then at close
    # A new process sees every entry, without calling the encoder.
    calls.clear()
    again = EmbeddingCache(tmp_path, "clip-test")
    got = again.get_or_compute(["dddd", "bbb", "aa", "c"], encode)
    assert calls == [] and torch.equal(got, encode(["dddd", "bbb", "aa", "c"]))
    # Unflushed entries are simply lost by a crash; stray temp files are ignored.
    (tmp_path / "shard-x.tmp").write_bytes(b"partial")
    assert len(EmbeddingCache(tmp_path, "clip-test")) == 4
    with pytest.raises(ValueError, match="caches encoder 'clip-test'"):
        EmbeddingCache(tmp_path, "other-encoder")
