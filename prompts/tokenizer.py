"""The CLIP text tokenizer, built offline from CLIP's BPE merges file shipped with PRD.

Stable Diffusion's text encoders (CLIP ViT-L for SD 1.x, OpenCLIP ViT-H for SD 2.x) share
one byte-level BPE vocabulary of 49408 tokens with a 77-token context. No model hub is
needed: the vocabulary is rebuilt from `prompts/data/bpe_simple_vocab_16e6.txt.gz` (CLIP's
merges, MIT; the notice is `prompts/data/LICENSE-CLIP-BPE.txt`) following CLIP's definition:

    256 byte characters, the same 256 with '</w>', one token per merge of lines
    1 .. 48895 of the file, then '<|startoftext|>' (49406) and '<|endoftext|>' (49407).

The file travels as package data, so a plain `pip install` is complete. Real SD weight
folders carry their own tokenizer and are preferred when present.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import regex
from transformers import CLIPTokenizer

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
MAX_LENGTH = 77
# CLIP keeps the first 49152 - 256 - 2 merges of the file (line 0 is a version header).
N_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte 0..255 to a printable unicode character (GPT-2 / CLIP byte-level BPE).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in byte order, to
    the code points 256, 257, ... so that no token contains whitespace or control chars.
    The dict's insertion order (printable bytes first) is the order of the base vocabulary.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


BPE_PATH = Path(__file__).parent / "data" / BPE_FILENAME
"""CLIP's BPE merges, shipped as package data."""


def _default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "prd" / "clip_tokenizer"


def _write_tokenizer_files(bpe_path: Path, folder: Path) -> None:
    """Write vocab.json, merges.txt and the special-token configs into `folder` atomically."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : N_MERGES + 1]
    if len(merges) != N_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError(f"{bpe_path}: expected {N_MERGES} 'a b' merge lines after the header")
    base = list(bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + [m.replace(" ", "") for m in merges]
    tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{bpe_path}: built {len(vocab)} unique tokens, expected {VOCAB_SIZE}")

    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (tmp / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        **special,
    }
    (tmp / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    try:
        tmp.rename(folder)
    except OSError:
        # Another process finished first; its files are identical.
        if not (folder / "vocab.json").is_file():
            raise
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()


def build_clip_tokenizer(
    cache_dir: str | Path | None = None, bpe_path: str | Path = BPE_PATH
) -> CLIPTokenizer:
    """CLIP's tokenizer (49408 tokens, bos 49406, eos 49407, max length 77), fully offline.

    cache_dir: folder under which the generated vocab.json / merges.txt are kept, in a
    subfolder named by the BPE file's hash; default a per-user cache folder.
    """
    bpe_path = Path(bpe_path)
    if not bpe_path.is_file():
        raise FileNotFoundError(
            f"CLIP's BPE merges file {bpe_path} is missing; it ships with the prd package "
            "(prompts/data): reinstall it"
        )
    digest = hashlib.sha256(bpe_path.read_bytes()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    folder = root / f"clip-bpe-{digest}"
    if not (folder / "tokenizer_config.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        _write_tokenizer_files(bpe_path, folder)
    tok = CLIPTokenizer.from_pretrained(str(folder))
    if len(tok) != VOCAB_SIZE or tok.bos_token_id != VOCAB_SIZE - 2:
        raise RuntimeError(
            f"tokenizer from {folder} has {len(tok)} tokens and bos id {tok.bos_token_id}, "
            f"expected {VOCAB_SIZE} and {VOCAB_SIZE - 2}; delete the folder to rebuild it"
        )
    tok.model_max_length = MAX_LENGTH
    return tok


def count_tokens(tokenizer: CLIPTokenizer, texts: Sequence[str]) -> list[int]:
    """Number of tokens of each text including bos and eos, without truncation.

    A prompt fits the text encoder when its count is <= 77. Batched through the fast
    tokenizer backend.
    """
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)
    return [len(ids) for ids in enc["input_ids"]]


def truncate_to_tokens(
    tokenizer: CLIPTokenizer, texts: Sequence[str], max_tokens: int = MAX_LENGTH
) -> list[str]:
    """Each text cut at a word boundary so that it has <= max_tokens tokens with bos/eos.

    The text encoder would silently drop the tail past 77 tokens; cutting at a word keeps
    the stored prompt equal to what the encoder sees. A text whose first word alone is
    too long is cut inside that word. Texts that fit are returned unchanged.
    """
    if max_tokens < 3:
        raise ValueError(f"max_tokens must be >= 3 (bos, one token, eos), got {max_tokens}")
    if not texts:
        return []
    enc = tokenizer(list(texts), truncation=False, return_offsets_mapping=True, verbose=False)
    out = []
    for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"]):
        if len(ids) <= max_tokens:
            out.append(text)
            continue
        # offsets[0] is bos; content tokens 1..max_tokens-2 are kept.
        end = offsets[max_tokens - 2][1]
        cut = text[:end]
        if end < len(text) and not text[end].isspace() and " " in cut.strip():
            cut = cut.rstrip().rsplit(" ", 1)[0]
        out.append(cut.rstrip(" ,.;:!?-"))
    return out


# CLIP's pre-tokenizer pattern (the text is NFC-normalized, whitespace-folded and lower-
# cased first): BPE runs on each piece alone, so a text's token count is the sum of its
# pieces' counts, which can be cached per piece.
_PIECES = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


class TokenCounter:
    """Exact CLIP token counts (with bos/eos) of many texts, memoized per word.

    Equal to `count_tokens` but tokenizes each distinct word once: on a million prompts
    most words repeat, and the BPE of a rare word is the costly part.
    """

    def __init__(self, tokenizer: CLIPTokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[str, int] = {}

    def __call__(self, texts: Sequence[str]) -> list[int]:
        norm = (unicodedata.normalize("NFC", " ".join(t.split())).lower() for t in texts)
        pieces = [_PIECES.findall(t) for t in norm]
        cache = self._cache
        new = list({p for ps in pieces for p in ps if p not in cache})
        for s in range(0, len(new), 8192):
            chunk = new[s : s + 8192]
            for p, n in zip(chunk, count_tokens(self.tokenizer, chunk)):
                cache[p] = n - 2
        return [2 + sum(map(cache.__getitem__, ps)) for ps in pieces]
