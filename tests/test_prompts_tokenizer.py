"""The offline CLIP tokenizer against ids of the released CLIP vocabulary."""

import hashlib

import pytest

from prompts.tokenizer import (
    BPE_PATH,
    MAX_LENGTH,
    VOCAB_SIZE,
    build_clip_tokenizer,
    count_tokens,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("clip_tok"))


def test_vocabulary_and_special_tokens(tok):
    assert len(tok) == VOCAB_SIZE == 49408
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert tok.model_max_length == MAX_LENGTH == 77
    # 256 byte characters, the same with '</w>', then merges in file order ("i n" first).
    ids = [0, 255, 256, 511, 512]
    assert tok.convert_ids_to_tokens(ids) == ["!", "Ń", "!</w>", "Ń</w>", "in"]


def test_known_ids(tok):
    # Ids of the released CLIP vocabulary (as used by SD's text encoders).
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("Hello, World")["input_ids"] == [49406, 3306, 267, 1002, 49407]
    # Digits are split one by one; '1</w>' is 256 + ('1' - '!') = 272.
    assert tok("12")["input_ids"] == [49406, 272, 273, 49407]


def test_count_tokens_untruncated(tok):
    assert count_tokens(tok, []) == []
    assert count_tokens(tok, ["a photo of a cat", "cat " * 100]) == [7, 102]


def test_cache_is_reused(tmp_path):
    a = build_clip_tokenizer(tmp_path)
    (folder,) = list(tmp_path.iterdir())
    mtime = (folder / "vocab.json").stat().st_mtime_ns
    b = build_clip_tokenizer(tmp_path)
    assert (folder / "vocab.json").stat().st_mtime_ns == mtime
    assert a("a red fox")["input_ids"] == b("a red fox")["input_ids"]


def test_missing_bpe_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "bpe.txt.gz"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*reinstall"):
        build_clip_tokenizer(tmp_path, bpe_path=missing)


def test_the_vocabulary_ships_with_the_package():
    # the file itself, not a copy that some other package may or may not have installed
    assert BPE_PATH.is_file() and BPE_PATH.parent.name == "data"
    assert (BPE_PATH.parent / "LICENSE-CLIP-BPE.txt").is_file()
    digest = hashlib.sha256(BPE_PATH.read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def test_token_counter_equals_tokenizer(tok):
    import random

    from prompts.tokenizer import TokenCounter, truncate_to_tokens

    rng = random.Random(0)
    chars = "abcdefgh ,.'!-éü1😀中\t"
    texts = ["It's the dog's ball, isn't it?? 123abc", "Café ÉMIGRÉ naïve ﬁ", "кот", "x" * 300]
    texts += ["".join(rng.choices(chars, k=rng.randint(0, 60))) for _ in range(500)]
    counter = TokenCounter(tok)
    assert counter(texts) == count_tokens(tok, texts)
    assert counter(texts[:3]) == count_tokens(tok, texts[:3])  # memoized path

    long = "a photo of a big cat " * 20
    cut = truncate_to_tokens(tok, [long, "short"], 77)
    assert cut[1] == "short" and count_tokens(tok, cut[:1]) == [77]
    assert long.startswith(cut[0]) and cut[0].endswith("of")  # cut at a word boundary
