"""Read prompts from user files: .txt, .jsonl, .csv, .tsv, .parquet, .json, and their .gz.

Every reader yields `(text, location)` with location "file:line" (1-based; "file:row N"
for parquet, "file:split[i]" for .json) and reports bad records to a `BadLines` sink
instead of raising, so one broken line of a million never aborts a curation run. A file
that cannot be opened or parsed as a whole (a missing file, a malformed .json) raises:
that is the user's mistake to fix, not a line to skip.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pyarrow.parquet as pq

# Looked up in this order when no field name is given.
DEFAULT_FIELDS = ("prompt", "text", "caption")
JSON_SPLITS = ("train", "val", "test")
FORMATS = (".txt", ".jsonl", ".csv", ".tsv", ".parquet", ".json")


@dataclass
class BadLines:
    """Counts and the first `keep` messages of skipped input records, per kind."""

    keep: int = 20
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, location: str, detail: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < self.keep:
            shown.append(f"{location}: {detail}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def input_format(path: Path) -> tuple[str, bool]:
    """(extension among FORMATS, gzipped) of a path, e.g. 'a.jsonl.gz' -> ('.jsonl', True)."""
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    if gz:
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext not in FORMATS:
        raise ValueError(
            f"{path}: unknown prompt file type {ext or '(none)'!r}; expected one of "
            f"{', '.join(FORMATS)} (optionally .gz)"
        )
    return ext, gz


def _open_text(path: Path, gz: bool) -> IO[str]:
    # surrogateescape keeps undecodable bytes as lone surrogates, so a bad line can be
    # detected and reported with its line number instead of failing the whole file.
    raw = gzip.open(path, "rb") if gz else open(path, "rb")  # noqa: SIM115
    return io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")


def _undecodable(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _pick_field(keys, wanted: str | None) -> str | None:
    if wanted is not None:
        return wanted if wanted in keys else None
    return next((k for k in DEFAULT_FIELDS if k in keys), None)


def _from_record(record, wanted: str | None, loc: str, bad: BadLines) -> str | None:
    """The prompt string of one json record (a string or an object), or None if bad."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        bad.add("not_an_object", loc, f"expected a JSON object or string, got {record!r:.60}")
        return None
    key = _pick_field(record, wanted)
    if key is None:
        want = wanted or " / ".join(DEFAULT_FIELDS)
        bad.add("missing_field", loc, f"no field {want!r} in keys {sorted(record)[:8]}")
        return None
    value = record[key]
    if not isinstance(value, str):
        bad.add("missing_field", loc, f"field {key!r} is {type(value).__name__}, not a string")
        return None
    return value


def read_txt(path: Path, gz: bool, bad: BadLines) -> Iterator[tuple[str, str]]:
    with _open_text(path, gz) as f:
        for i, line in enumerate(f, 1):
            if _undecodable(line):
                bad.add("undecodable", f"{path}:{i}", "bytes that are not UTF-8")
                continue
            yield line, f"{path}:{i}"


def read_jsonl(
    path: Path, gz: bool, wanted: str | None, bad: BadLines
) -> Iterator[tuple[str, str]]:
    with _open_text(path, gz) as f:
        for i, line in enumerate(f, 1):
            loc = f"{path}:{i}"
            if _undecodable(line):
                bad.add("undecodable", loc, "bytes that are not UTF-8")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad.add("malformed_json", loc, f"{e.msg} at column {e.colno}")
                continue
            text = _from_record(record, wanted, loc, bad)
            if text is not None:
                yield text, loc


def read_csv(
    path: Path, gz: bool, wanted: str | None, delimiter: str, bad: BadLines
) -> Iterator[tuple[str, str]]:
    with _open_text(path, gz) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        key = _pick_field(header, wanted)
        if key is None:
            want = wanted or " / ".join(DEFAULT_FIELDS)
            raise ValueError(f"{path}: no column {want!r} in header {header}; pass --field")
        # line_num after a row is the row's last physical line (quoted fields may span lines).
        for row in reader:
            loc = f"{path}:{reader.line_num}"
            text = row.get(key)
            if text is None:
                bad.add("missing_field", loc, f"row has no value in column {key!r}")
            elif _undecodable(text):
                bad.add("undecodable", loc, "bytes that are not UTF-8")
            else:
                yield text, loc


def read_parquet(path: Path, wanted: str | None, bad: BadLines) -> Iterator[tuple[str, str]]:
    pf = pq.ParquetFile(path)
    key = _pick_field(pf.schema_arrow.names, wanted)
    if key is None:
        want = wanted or " / ".join(DEFAULT_FIELDS)
        raise ValueError(f"{path}: no column {want!r} in {pf.schema_arrow.names}; pass --field")
    row = 0
    for batch in pf.iter_batches(columns=[key], batch_size=65536):
        for value in batch.column(0).to_pylist():
            row += 1
            if isinstance(value, str):
                yield value, f"{path}:row {row}"
            else:
                bad.add("missing_field", f"{path}:row {row}", f"{key!r} is {value!r:.40}")


def read_json(path: Path, gz: bool, wanted: str | None, bad: BadLines) -> Iterator[tuple[str, str]]:
    """A plain list, or the reference's {"train": [...], "val": [...], "test": [...]} layout.

    All splits are read: curation makes its own split, and `--eval` files remove leakage.
    """
    with _open_text(path, gz) as f:
        content = f.read()
    if _undecodable(content):
        raise ValueError(f"{path}: bytes that are not UTF-8; a .json file is parsed whole")
    try:
        data = json.loads(content)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from e
    if isinstance(data, list):
        parts = [("", data)]
    elif isinstance(data, dict) and any(k in data for k in JSON_SPLITS):
        parts = [(k, data[k]) for k in JSON_SPLITS if k in data]
    else:
        found = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected a list or keys {JSON_SPLITS}, found {found}")
    for name, items in parts:
        if not isinstance(items, list):
            raise ValueError(f"{path}: {name!r} is {type(items).__name__}, expected a list")
        for i, record in enumerate(items):
            loc = f"{path}:{name}[{i}]" if name else f"{path}:[{i}]"
            text = _from_record(record, wanted, loc, bad)
            if text is not None:
                yield text, loc


def read_prompts(
    path: str | Path, bad: BadLines, field: str | None = None
) -> Iterator[tuple[str, str]]:
    """Yield (raw prompt, "file:line") from one file of any supported format.

    field: the JSON key / column holding the prompt; default the first of prompt, text,
    caption that is present.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    ext, gz = input_format(path)
    if ext == ".txt":
        return read_txt(path, gz, bad)
    if ext == ".jsonl":
        return read_jsonl(path, gz, field, bad)
    if ext in (".csv", ".tsv"):
        return read_csv(path, gz, field, "," if ext == ".csv" else "\t", bad)
    if ext == ".parquet":
        if gz:
            raise ValueError(f"{path}: parquet is compressed internally; do not gzip it")
        return read_parquet(path, field, bad)
    return read_json(path, gz, field, bad)
