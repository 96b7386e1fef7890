"""Curate prompt files into a clean, deduplicated, split and sharded training set.

    read -> clean -> filter (each rule counted) -> fit to 77 tokens -> exact dedup
    -> leakage vs evaluation prompts -> MinHash-LSH near dedup -> hash split -> shards

Output folder:
    train/shard-00000-of-00064.parquet ...   columns: prompt (string), id (uint64)
    val/shard-00000-of-00001.parquet          (when val_fraction > 0)
    manifest.json   counts, shard rows and sha256, inputs, the config used
    report.json     counts per rule with examples, skipped input records with file:line
    report.txt      the same for people

Everything is written into a temporary sibling folder that is renamed at the end, so an
interrupted run never leaves a partial folder posing as complete. Rows are ordered by
the prompt's hash and dealt round-robin to shards, so re-running on the same inputs
gives byte-identical shards and shard sizes differ by at most one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prompts.clean import Blocklist, clean_prompt, dedup_key, latin_fraction, letter_fraction
from prompts.config import CurateConfig
from prompts.dedup import near_duplicates, shingle, signatures
from prompts.readers import BadLines, input_format, read_prompts
from prompts.report import RuleLog, format_report

MANIFEST_FORMAT = "prd-prompts/1"


def prompt_hash(key: str) -> int:
    """64-bit hash of a dedup key: the prompt's id, its split draw and its shard order."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


def _read_clean_filter(
    inputs: Sequence[Path], cfg: CurateConfig, rules: RuleLog, bad: BadLines
) -> tuple[list[str], list[str]]:
    """Cleaned prompts that pass the per-prompt rules, with their "file:line"."""
    boiler = frozenset(s.lower() for s in cfg.boilerplate)
    block = Blocklist.from_file(cfg.blocklist) if cfg.blocklist else None
    texts, locs = [], []
    for path in inputs:
        for raw, loc in read_prompts(path, bad, cfg.field):
            rules.seen += 1
            text = clean_prompt(raw, boiler, cfg.strip_syntax)
            if not text:
                rules.add("empty", loc, raw)
                continue
            if len(text) < cfg.min_chars or len(text.split()) < cfg.min_words:
                rules.add("too_short", loc, text)
                continue
            if letter_fraction(text) < cfg.min_letter_fraction:
                rules.add("non_letters", loc, text)
                continue
            if cfg.min_latin_fraction is not None and latin_fraction(text) < cfg.min_latin_fraction:
                rules.add("language", loc, text)
                continue
            if block is not None:
                term = block.match(dedup_key(text))
                if term is not None:
                    rules.add("blocklist", loc, f"{text}  [{term}]")
                    continue
            texts.append(text)
            locs.append(loc)
    return texts, locs


def _fit_tokens(texts: list[str], locs: list[str], cfg: CurateConfig, rules: RuleLog):
    """Truncate or drop prompts longer than cfg.max_tokens CLIP tokens (bos/eos included)."""
    from prompts.tokenizer import TokenCounter, build_clip_tokenizer, truncate_to_tokens

    # A token covers at least one UTF-8 byte, so a text of <= max_tokens - 2 bytes fits
    # without tokenizing (most prompts); only the longer ones are counted.
    maybe = [i for i, t in enumerate(texts) if len(t.encode("utf-8")) > cfg.max_tokens - 2]
    if not maybe:
        return texts, locs
    tok = build_clip_tokenizer(cfg.tokenizer_cache)
    count_tokens = TokenCounter(tok)
    drop = set()
    for s in range(0, len(maybe), 65536):
        idx = maybe[s : s + 65536]
        counts = count_tokens([texts[i] for i in idx])
        long_idx = [i for i, n in zip(idx, counts) if n > cfg.max_tokens]
        if not long_idx:
            continue
        if cfg.too_long == "truncate":
            cut = truncate_to_tokens(tok, [texts[i] for i in long_idx], cfg.max_tokens)
            recount = count_tokens(cut)
            for i, new, n in zip(long_idx, cut, recount):
                if n <= cfg.max_tokens and new:
                    rules.add("truncated", locs[i], texts[i], dropped=False)
                    texts[i] = new
                else:
                    rules.add("too_long", locs[i], texts[i])
                    drop.add(i)
        else:
            for i in long_idx:
                rules.add("too_long", locs[i], texts[i])
                drop.add(i)
    keep = [i for i in range(len(texts)) if i not in drop]
    return [texts[i] for i in keep], [locs[i] for i in keep]


def _read_eval(eval_files: Sequence[Path], cfg: CurateConfig, bad: BadLines) -> list[str]:
    """Unique dedup keys of the evaluation prompts, cleaned like training prompts."""
    boiler = frozenset(s.lower() for s in cfg.boilerplate)
    keys: dict[str, None] = {}
    for path in eval_files:
        for raw, _ in read_prompts(path, bad, cfg.field):
            key = dedup_key(clean_prompt(raw, boiler, cfg.strip_syntax))
            if key:
                keys[key] = None
    return list(keys)


def _dedup(texts, locs, eval_keys, cfg: CurateConfig, rules: RuleLog) -> list[int]:
    """Indices of prompts kept after exact dedup, leakage removal and near dedup."""
    keys = [dedup_key(t) for t in texts]
    eval_set = set(eval_keys)
    first: dict[str, int] = {}
    exact_keep = []
    for i, key in enumerate(keys):
        if key in eval_set:
            rules.add("leakage", locs[i], f"{texts[i]}  [= evaluation prompt]")
        elif key in first:
            rules.add("exact_duplicate", locs[i], f"{texts[i]}  [= {locs[first[key]]}]")
        else:
            first[key] = i
            exact_keep.append(i)
    if not cfg.near_dedup or not exact_keep:
        return exact_keep
    docs = list(eval_keys) + [keys[i] for i in exact_keep]
    sh = shingle(docs, cfg.shingle_size)
    sig = signatures(sh, cfg.num_perm, cfg.minhash_seed)
    match = near_duplicates(sh, sig, cfg.threshold, np.ones(len(docs), bool), len(eval_keys))
    kept = []
    ne = len(eval_keys)
    for d, i in enumerate(exact_keep, start=ne):
        m = int(match[d])
        if m < 0:
            kept.append(i)
        elif m < ne:
            rules.add("leakage", locs[i], f"{texts[i]}  [~ evaluation prompt: {docs[m]}]")
        else:
            j = exact_keep[m - ne]
            rules.add("near_duplicate", locs[i], f"{texts[i]}  [~ {locs[j]}: {texts[j]}]")
    return kept


def _write_split(folder: Path, prompts: list[str], ids: list[int], n_shards: int) -> list[dict]:
    """Rows sorted by id, dealt round-robin into n_shards parquet files; their manifest."""
    folder.mkdir(parents=True)
    order = sorted(range(len(prompts)), key=lambda i: (ids[i], prompts[i]))
    schema = pa.schema([("prompt", pa.string()), ("id", pa.uint64())])
    shards = []
    for s in range(n_shards):
        rows = order[s::n_shards]
        table = pa.table(
            {"prompt": [prompts[i] for i in rows], "id": [ids[i] for i in rows]}, schema=schema
        )
        name = f"shard-{s:05d}-of-{n_shards:05d}.parquet"
        pq.write_table(table, folder / name, compression="zstd")
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        shards.append({"file": f"{folder.name}/{name}", "rows": len(rows), "sha256": digest})
    return shards


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def curate(
    inputs: Sequence[str | Path],
    out: str | Path,
    cfg: CurateConfig | None = None,
    eval_files: Sequence[str | Path] = (),
    overwrite: bool = False,
) -> dict:
    """Curate prompt files into `out` (see the module docstring); returns the report dict."""
    cfg = cfg or CurateConfig()
    inputs, eval_files, out = [Path(p) for p in inputs], [Path(p) for p in eval_files], Path(out)
    if not inputs:
        raise ValueError("no input files given")
    for path in [*inputs, *eval_files]:
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        input_format(path)  # fail now on an unknown extension, not after an hour
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder {out} exists; pass overwrite=True (--overwrite)")

    rules, bad = RuleLog(cfg.examples), BadLines()
    texts, locs = _read_clean_filter(inputs, cfg, rules, bad)
    texts, locs = _fit_tokens(texts, locs, cfg, rules)
    eval_keys = _read_eval(eval_files, cfg, bad)
    kept = _dedup(texts, locs, eval_keys, cfg, rules)

    split: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "val": ([], [])}
    cut = int(cfg.val_fraction * 2**64)
    for i in kept:
        h = prompt_hash(dedup_key(texts[i]))
        name = "val" if h < cut else "train"
        split[name][0].append(texts[i])
        split[name][1].append(h)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        manifest_splits = {}
        for name, n_shards in (("train", cfg.shards), ("val", cfg.val_shards)):
            if name == "val" and cfg.val_fraction == 0:
                continue
            prompts, ids = split[name]
            shards = _write_split(tmp / name, prompts, ids, n_shards)
            manifest_splits[name] = {"count": len(prompts), "shards": shards}
        report = rules.as_dict(bad)
        report["kept"] = {name: s["count"] for name, s in manifest_splits.items()}
        manifest = {
            "format": MANIFEST_FORMAT,
            "splits": manifest_splits,
            "inputs": [{"path": str(p), "sha256": _file_sha256(p)} for p in inputs],
            "eval_inputs": [{"path": str(p), "sha256": _file_sha256(p)} for p in eval_files],
            "counts": report["counts"],
            "config": dataclasses.asdict(cfg),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", "utf-8")
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n", "utf-8")
        (tmp / "report.txt").write_text(format_report(report), "utf-8")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def load_manifest(folder: str | Path) -> dict:
    """The manifest of a curated folder, checked for its format tag."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a curated prompt folder: no manifest.json")
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        manifest = manifest if isinstance(manifest, dict) else {}
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
    return manifest


def verify_shards(folder: str | Path, split: str = "train") -> None:
    """Check that every shard of ``split`` is the file the manifest describes (sha256):
    a missing, truncated or altered shard raises naming it, before any is read."""
    folder = Path(folder)
    for shard in load_manifest(folder)["splits"][split]["shards"]:
        path = folder / shard["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard of {folder / 'manifest.json'} is missing")
        if _file_sha256(path) != shard["sha256"]:
            raise ValueError(
                f"{path}: contents differ from the sha256 in {folder / 'manifest.json'} "
                "(truncated or altered shard); curate the folder again"
            )
