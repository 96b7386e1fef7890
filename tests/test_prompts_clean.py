"""Each cleaning step and each filter rule on a known case."""

import pytest

from prompts.clean import Blocklist, clean_prompt, dedup_key, latin_fraction, letter_fraction
from prompts.config import CurateConfig


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("ｆｕｌｌｗｉｄｔｈ cat", "fullwidth cat"),  # NFKC
        ("a\tred \n\n car  ", "a red car"),  # whitespace folded
        ("a\x00 bl\u200bue\x7f cup", "a blue cup"),  # control / zero-width dropped
        ("a castle on a hill --ar 16:9 --v 5.2 --no people", "a castle on a hill"),
        ("(majestic lion:1.3) in ((tall grass))", "majestic lion in tall grass"),
        ("a [cute] robot <lora:toy:0.8>", "a cute robot"),
        ("a fox, 8k, Trending on ArtStation, digital painting", "a fox, digital painting"),
        ("8k, hd", "8k"),  # the first segment names the subject: never removed
        ("a chair , , with arms!!! ...", "a chair, with arms"),
        ("... a chair.", "a chair"),
    ],
)
def test_clean_prompt(raw, clean):
    assert clean_prompt(raw) == clean


def test_clean_options():
    assert clean_prompt("a cat --ar 2:3", strip_syntax=False) == "a cat --ar 2:3"
    assert clean_prompt("a cat, 8k", boilerplate=frozenset()) == "a cat, 8k"
    assert clean_prompt("a cat, furry", boilerplate=frozenset({"furry"})) == "a cat"


def test_dedup_key():
    assert dedup_key("A Red-Car!  (big)") == dedup_key("a red car big") == "a red car big"


def test_fractions():
    assert letter_fraction("ab 12") == pytest.approx(0.5)
    assert letter_fraction("") == 1.0
    assert latin_fraction("café") == 1.0
    assert latin_fraction("кот cat") == pytest.approx(3 / 6)
    assert latin_fraction("12 34") == 1.0


def test_blocklist(tmp_path):
    f = tmp_path / "block.txt"
    f.write_text("# comment\nGore\nbad word\n\n")
    b = Blocklist.from_file(f)
    assert len(b) == 2
    assert b.match(dedup_key("A gore scene")) == "gore"
    assert b.match(dedup_key("gorey")) is None  # whole words only
    assert b.match(dedup_key("a Bad  word here")) == "bad word"
    assert b.match(dedup_key("bad words")) is None


def test_config_checks():
    with pytest.raises(ValueError, match="threshold"):
        CurateConfig(threshold=1.5)
    with pytest.raises(ValueError, match="too_long"):
        CurateConfig(too_long="cut")
    with pytest.raises(ValueError, match="val_fraction"):
        CurateConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="shards"):
        CurateConfig(shards=0)
