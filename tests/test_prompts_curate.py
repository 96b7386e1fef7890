"""End-to-end curation: rules, leakage, split, determinism, atomic output, the CLI."""

import json

import pyarrow.parquet as pq
import pytest

from prompts import cli
from prompts.config import CurateConfig
from prompts.curate import curate, load_manifest


@pytest.fixture(scope="module")
def tok_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tok"))


def read_split(folder, split="train"):
    manifest = load_manifest(folder)
    rows = []
    for shard in manifest["splits"][split]["shards"]:
        rows += pq.read_table(folder / shard["file"]).column("prompt").to_pylist()
    return rows


def test_rules_counted_with_examples(tmp_path, tok_cache):
    block = tmp_path / "block.txt"
    block.write_text("gore\n")
    long = " ".join(f"word{i}" for i in range(60))
    lines = [
        "a red wooden chair",  # kept
        "",  # empty
        "ok",  # too_short (min_chars 3)
        "1234 5678 ## a",  # non_letters
        "красная машина",  # language
        "a gore scene",  # blocklist
        long,  # too_long, truncated
        "A red wooden chair!",  # exact duplicate of line 1
        "a small blue ceramic teapot with a golden handle on a table",  # kept
        "a small blue ceramic teapot with a golden handle on a table today",  # near dup
    ]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n")
    cfg = CurateConfig(
        blocklist=str(block), min_latin_fraction=0.5, shards=2, tokenizer_cache=tok_cache
    )
    report = curate([src], tmp_path / "out", cfg)
    c = report["counts"]
    assert (c["empty"], c["too_short"], c["non_letters"], c["language"], c["blocklist"]) == (
        1,
        1,
        1,
        1,
        1,
    )
    assert (c["too_long"], c["truncated"], c["exact_duplicate"], c["near_duplicate"]) == (
        0,
        1,
        1,
        1,
    )
    assert report["examples"]["exact_duplicate"][0].startswith(f"{src}:8: A red wooden chair")
    assert report["examples"]["near_duplicate"][0].startswith(f"{src}:10:")
    kept = read_split(tmp_path / "out")
    assert len(kept) == report["kept"]["train"] == 3
    truncated = next(k for k in kept if k.startswith("word0"))
    assert truncated == " ".join(f"word{i}" for i in range(len(truncated.split())))
    assert "word59" not in truncated

    drop = CurateConfig(too_long="drop", shards=2, tokenizer_cache=tok_cache)
    report = curate([src], tmp_path / "out2", drop)
    assert report["counts"]["too_long"] == 1 and report["counts"]["truncated"] == 0
    text = (tmp_path / "out2" / "report.txt").read_text()
    assert "too_long" in text and f"{src}:7:" in text


def test_leakage_exact_and_near(tmp_path, tok_cache):
    ev = tmp_path / "df415.txt"
    ev.write_text("a hamburger\na knight riding a white horse across a green field\n")
    src = tmp_path / "train.jsonl"
    rows = ["A hamburger.", "a knight riding a white horse across a green field at dawn", "a cat"]
    src.write_text("\n".join(json.dumps({"prompt": r}) for r in rows) + "\n")
    cfg = CurateConfig(shards=1, tokenizer_cache=tok_cache)
    report = curate([src], tmp_path / "out", cfg, eval_files=[ev])
    assert report["counts"]["leakage"] == 2
    assert read_split(tmp_path / "out") == ["a cat"]


def test_deterministic_and_split_stable(tmp_path, tok_cache):
    prompts = [
        f"a {c} {o} on a {s} table"
        for c in ("red", "blue", "green", "pink")
        for o in ("cup", "vase", "lamp", "bowl", "box")
        for s in ("wooden", "glass", "metal")
    ]
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(prompts[:40]) + "\n")
    b.write_text("\n".join(prompts[40:]) + "\n")
    cfg = CurateConfig(shards=4, val_fraction=0.25, tokenizer_cache=tok_cache, near_dedup=False)
    curate([a, b], tmp_path / "o1", cfg)
    curate([a, b], tmp_path / "o2", cfg)
    m1, m2 = load_manifest(tmp_path / "o1"), load_manifest(tmp_path / "o2")
    files = [s["file"] for split in m1["splits"].values() for s in split["shards"]]
    for f in files:
        assert (tmp_path / "o1" / f).read_bytes() == (tmp_path / "o2" / f).read_bytes()
    assert m1["splits"] == m2["splits"]
    val = set(read_split(tmp_path / "o1", "val"))
    assert 0 < len(val) < 30 and len(val) + m1["splits"]["train"]["count"] == 60
    # Reordered inputs: same shards. Fewer inputs: the val split of a subset is the subset of val.
    curate([b, a], tmp_path / "o3", cfg)
    for f in files:
        assert (tmp_path / "o1" / f).read_bytes() == (tmp_path / "o3" / f).read_bytes()
    curate([a], tmp_path / "o4", cfg)
    assert set(read_split(tmp_path / "o4", "val")) == val & set(prompts[:40])
    rows = [s["rows"] for s in m1["splits"]["train"]["shards"]]
    assert max(rows) - min(rows) <= 1


def test_atomic_output_on_failure(tmp_path, tok_cache, monkeypatch):
    src = tmp_path / "in.txt"
    src.write_text("a red chair\na blue table\na green lamp\n")
    cfg = CurateConfig(shards=3, tokenizer_cache=tok_cache)
    out = tmp_path / "out"
    curate([src], out, cfg)
    before = (out / "manifest.json").read_bytes()
    calls = []

    def failing_write(table, path, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(table, path, **kw)

    real = pq.write_table
    monkeypatch.setattr(pq, "write_table", failing_write)
    src.write_text("a red chair\na blue table\na green lamp\na new prompt here\n")
    with pytest.raises(OSError, match="disk full"):
        curate([src], out, cfg, overwrite=True)
    # The previous complete output is untouched, and no temporary folder is left behind.
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out"]
    with pytest.raises(FileExistsError, match="overwrite"):
        curate([src], out, cfg)


def test_cli_curate_and_sources(tmp_path, tok_cache, capsys):
    src = tmp_path / "in.csv"
    src.write_text('id,caption\n1,"a tall, green cactus"\n2,a yellow rubber duck\n')
    argv = [
        "curate",
        str(src),
        "--out",
        str(tmp_path / "o"),
        "--shards",
        "2",
        "--tokenizer-cache",
        tok_cache,
        "--field",
        "caption",
    ]
    assert cli.main(argv) == 0
    assert sorted(read_split(tmp_path / "o")) == ["a tall, green cactus", "a yellow rubber duck"]
    assert "read 2 prompts" in capsys.readouterr().out
    assert cli.main(["sources"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("DF415", "3DTopia", "Cap3D", "DiffusionDB"))
