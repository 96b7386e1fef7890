"""Every input format, gzip variants, and bad records reported with file:line."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prompts.readers import BadLines, input_format, read_prompts

PROMPTS = ["a red car", "a wooden chair, with arms", 'a "quoted" lamp']


def _write(path, data: bytes, gz: bool):
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "tsv", "json_list", "json_splits"])
def test_formats_roundtrip(tmp_path, fmt, gz):
    if fmt == "txt":
        data, name = "\n".join(PROMPTS) + "\n", "p.txt"
    elif fmt == "jsonl":
        data = "\n".join(json.dumps({"caption": p, "n": 1}) for p in PROMPTS) + "\n"
        name = "p.jsonl"
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        rows = [f"id{sep}text"] + [
            f'{i}{sep}"{p.replace(chr(34), 2 * chr(34))}"' for i, p in enumerate(PROMPTS)
        ]
        data, name = "\n".join(rows) + "\n", f"p.{fmt}"
    elif fmt == "json_list":
        data, name = json.dumps(PROMPTS), "p.json"
    else:
        data = json.dumps({"train": PROMPTS[:2], "test": [{"prompt": PROMPTS[2]}]})
        name = "p.json"
    path = _write(tmp_path / name, data.encode(), gz)
    bad = BadLines()
    got = list(read_prompts(path, bad))
    assert [t.rstrip("\n") for t, _ in got] == PROMPTS
    assert bad.total == 0
    if fmt == "txt":
        assert [loc for _, loc in got] == [f"{path}:{i}" for i in (1, 2, 3)]
    if fmt == "json_splits":
        assert got[2][1] == f"{path}:test[0]"


def test_parquet_and_field(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"desc": PROMPTS[:2] + [None], "prompt": ["x", "y", "z"]}), path)
    bad = BadLines()
    assert [t for t, _ in read_prompts(path, bad, field="desc")] == PROMPTS[:2]
    assert (
        bad.counts == {"missing_field": 1} and f"{path}:row 3" in bad.examples["missing_field"][0]
    )
    assert [t for t, _ in read_prompts(path, BadLines())] == ["x", "y", "z"]


def test_bad_records_reported_with_file_and_line(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"good one\nbad \xff\xfe bytes\ngood two\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_bytes(
        b'{"prompt": "ok"}\n{"prompt": \n{"text": 3}\n[1]\n{"prompt": "caf\xc3\xa9"}\n'
    )
    bad = BadLines()
    assert [t.strip() for t, _ in read_prompts(txt, bad)] == ["good one", "good two"]
    assert [t for t, _ in read_prompts(jsonl, bad)] == ["ok", "café"]
    assert bad.counts == {
        "undecodable": 1,
        "malformed_json": 1,
        "missing_field": 1,
        "not_an_object": 1,
    }
    assert bad.examples["undecodable"][0].startswith(f"{txt}:2:")
    assert bad.examples["malformed_json"][0].startswith(f"{jsonl}:2:")
    assert bad.examples["missing_field"][0].startswith(f"{jsonl}:3:")
    assert bad.examples["not_an_object"][0].startswith(f"{jsonl}:4:")


def test_whole_file_errors_are_loud(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_prompts(tmp_path / "nope.txt", BadLines())
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="unknown prompt file type '.xml'"):
        read_prompts(tmp_path / "x.xml", BadLines())
    (tmp_path / "m.json").write_text('{"train": [\n"a",\n]}')
    with pytest.raises(ValueError, match=r"m.json:3: malformed JSON"):
        list(read_prompts(tmp_path / "m.json", BadLines()))
    (tmp_path / "c.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no column"):
        list(read_prompts(tmp_path / "c.csv", BadLines()))
    assert input_format(tmp_path / "A.JSONL.GZ") == (".jsonl", True)
