"""MinHash signatures and LSH near-dup detection against naive Jaccard similarity."""

import random

import numpy as np
import pytest

from prompts.dedup import jaccard, near_duplicates, optimal_bands, shingle, signatures


def naive_jaccard(a: str, b: str, k: int = 3) -> float:
    def sh(s):
        w = s.split()
        return {tuple(w[i : i + k]) for i in range(max(len(w) - k + 1, 1))}

    x, y = sh(a), sh(b)
    return len(x & y) / len(x | y)


def test_shingles_and_exact_jaccard():
    sh = shingle(["a b c d", "a b", "", "b c d e"])
    assert np.diff(sh.offsets).tolist() == [2, 1, 0, 2]
    assert jaccard(sh, 0, 3) == pytest.approx(naive_jaccard("a b c d", "b c d e"))  # 1/3
    again = shingle(["b c d e"])
    assert again.doc(0).tolist() == sh.doc(3).tolist()  # hashes do not depend on context


def test_signature_agreement_estimates_jaccard():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(500)]
    base = rng.sample(words, 40)
    other = base[:30] + rng.sample(words, 10)
    sh = shingle([" ".join(base), " ".join(other)])
    sig = signatures(sh, num_perm=512)
    est = (sig[0] == sig[1]).mean()
    true = naive_jaccard(" ".join(base), " ".join(other))
    assert abs(est - true) < 4 * np.sqrt(true * (1 - true) / 512) + 0.01
    empty = signatures(shingle([""]), num_perm=8)
    assert (empty == np.iinfo(np.uint32).max).all()


def test_optimal_bands():
    b, r = optimal_bands(0.8, 128)
    assert b * r <= 128
    p = lambda s: 1 - (1 - s**r) ** b  # noqa: E731
    assert p(0.8) > 0.9 and p(0.4) < 0.02


def test_planted_near_duplicates_recall_precision():
    rng = random.Random(1)
    words = [f"w{i}" for i in range(3000)]
    docs, origin = [], []
    for _ in range(300):
        base = rng.sample(words, rng.randint(12, 20))
        docs.append(" ".join(base))
        origin.append(-1)
        kind = rng.random()
        src = len(docs) - 1
        if kind < 0.4:  # near: one word appended or dropped at an end (J >= 10/11)
            v = base + [rng.choice(words)] if rng.random() < 0.5 else base[1:]
        elif kind < 0.7:  # far: a third of the words replaced (J well under 0.8)
            v = list(base)
            for i in rng.sample(range(len(v)), len(v) // 3):
                v[i] = rng.choice(words)
        else:
            continue
        docs.append(" ".join(v))
        origin.append(src)
    order = list(range(len(docs)))
    truth = np.array(
        [o >= 0 and naive_jaccard(docs[o], docs[i]) >= 0.8 for i, o in enumerate(origin)]
    )
    assert 80 < truth.sum() < 150
    sh = shingle(docs)
    match = near_duplicates(sh, signatures(sh), 0.8, np.ones(len(docs), bool))
    found = match >= 0
    recall = (found & truth).sum() / truth.sum()
    precision = (found & truth).sum() / found.sum()
    assert recall >= 0.95 and precision == 1.0
    assert all(match[i] == origin[i] for i in order if found[i])


def test_reference_docs_kept_and_preferred():
    w = [f"w{i}" for i in range(13)]
    ref, t1, t2 = " ".join(w[1:11]), " ".join(w[2:13]), " ".join(w[1:12])
    assert naive_jaccard(ref, t1) == pytest.approx(0.7)
    assert naive_jaccard(ref, t2) > 0.8 and naive_jaccard(t1, t2) >= 0.8
    sh = shingle([ref, t1, t2])
    sig = signatures(sh)
    # t2 is near both the reference and the kept t1: it is reported against the reference.
    assert near_duplicates(sh, sig, 0.8, np.ones(3, bool), n_reference=1).tolist() == [-1, -1, 0]
    # Inactive docs neither match nor get matched.
    m = near_duplicates(sh, sig, 0.8, np.array([True, True, False]), n_reference=1)
    assert m.tolist() == [-1, -1, -1]


def test_greedy_compares_with_kept_docs_only():
    a = "a b c d e f g h"
    b, c = a + " i", a + " i j"
    assert naive_jaccard(a, c) < 0.8 <= naive_jaccard(b, c)
    sh = shingle([a, b, c])
    # b is removed as a duplicate of a; c is near b only, and b is gone: c is kept.
    assert near_duplicates(sh, signatures(sh), 0.8, np.ones(3, bool)).tolist() == [-1, 0, -1]
