"""Loading weight files so that a damaged one is named: a truncated or altered file (a
copy cut short, a full disk) raises ValueError naming the file and what is wrong with it,
instead of the loader's traceback. Loaders of the student's base, the teachers and their
converters go through here; ``prd`` turns the ValueError into a one-line error, exit 2.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open

T = TypeVar("T")
# what the loaders (diffusers, transformers, safetensors, json, torch) raise on bad bytes
LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError, EOFError)


def damaged_file(folder: Path) -> str:
    """The first file of a model folder that does not open (a JSON file that does not
    parse, a safetensors file whose header or size is wrong) with the reason, or ""."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text("utf-8"))
            elif path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open API)
                        f.get_slice(key)
        except (OSError, ValueError, SafetensorError) as exc:
            return f"{path}: {exc}"
    return ""


def load_part(folder: str | Path, load: Callable[[], T]) -> T:
    """``load()`` of one model folder (e.g. ``from_pretrained``); on failure the damaged
    file of ``folder`` is named (or the folder, with the loader's message)."""
    folder = Path(folder)
    try:
        return load()
    except LOAD_ERRORS as exc:
        bad = damaged_file(folder) if folder.is_dir() else ""
        raise ValueError(
            bad or f"{folder}: cannot be loaded ({type(exc).__name__}: {exc})"
        ) from exc


def torch_load(path: str | Path, **kwargs):
    """``torch.load(path, **kwargs)``; a damaged file raises ValueError naming it."""
    try:
        return torch.load(path, **kwargs)
    except (RuntimeError, EOFError, ValueError, OSError) as exc:  # zip, pickle, mmap errors
        raise ValueError(f"{path}: not a readable torch checkpoint ({exc})") from exc
