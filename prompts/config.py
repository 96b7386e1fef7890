"""Options of prompt curation, as a typed config checked on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prompts.clean import DEFAULT_BOILERPLATE


@dataclass
class CurateConfig:
    """How `prompts.curate.curate` cleans, filters, deduplicates, splits and shards."""

    field: str | None = None
    """JSON key / CSV or parquet column holding the prompt; None: first of prompt, text, caption."""
    min_chars: int = 3
    """Prompts shorter than this many characters (after cleaning) are dropped ("too_short")."""
    min_words: int = 1
    """Prompts with fewer words are dropped ("too_short")."""
    max_tokens: int = 77
    """CLIP token budget with bos/eos: the context length of SD's text encoders."""
    too_long: Literal["truncate", "drop"] = "truncate"
    """What to do with prompts over max_tokens: cut at a word boundary, or drop them."""
    min_letter_fraction: float = 0.5
    """Prompts whose non-space characters are less than this share letters are dropped."""
    min_latin_fraction: float | None = None
    """Script check: drop prompts whose letters are less than this share Latin; None: off."""
    blocklist: str | None = None
    """File of blocked words/phrases, one a line ('#' comments); None: no block list."""
    boilerplate: tuple[str, ...] = DEFAULT_BOILERPLATE
    """Comma-separated segments removed from prompts ("8k", "trending on artstation", ...)."""
    strip_syntax: bool = True
    """Remove Midjourney flags (--ar 16:9) and SD weight syntax ((word:1.3), [word], <lora:..>)."""
    near_dedup: bool = True
    """Remove near-duplicates (MinHash LSH) besides exact duplicates."""
    threshold: float = 0.8
    """Jaccard similarity of word shingles at or above which two prompts are near-equal."""
    shingle_size: int = 3
    """Words per shingle (1..3)."""
    num_perm: int = 128
    """MinHash permutations: more is a sharper LSH filter but slower hashing."""
    minhash_seed: int = 1
    """Seed of the MinHash hash functions (results are deterministic for a fixed seed)."""
    val_fraction: float = 0.0
    """Share of prompts put in the validation split, drawn by a hash of the prompt."""
    shards: int = 64
    """Training shards; a multiple of common world sizes (1, 2, 4, 8, 16, 32, 64)."""
    val_shards: int = 1
    """Validation shards."""
    examples: int = 5
    """Examples kept per rule in the report."""
    tokenizer_cache: str | None = None
    """Folder for the generated CLIP tokenizer files; None: the per-user cache."""

    def __post_init__(self) -> None:
        if self.min_chars < 0 or self.min_words < 0:
            raise ValueError(
                f"min_chars/min_words must be >= 0, got {self.min_chars}/{self.min_words}"
            )
        if self.max_tokens < 3:
            raise ValueError(f"max_tokens must be >= 3 (bos, a token, eos), got {self.max_tokens}")
        if self.too_long not in ("truncate", "drop"):
            raise ValueError(f"too_long must be 'truncate' or 'drop', got {self.too_long!r}")
        if not 0.0 <= self.min_letter_fraction <= 1.0:
            raise ValueError(
                f"min_letter_fraction must be in [0, 1], got {self.min_letter_fraction}"
            )
        if self.min_latin_fraction is not None and not 0.0 <= self.min_latin_fraction <= 1.0:
            raise ValueError(f"min_latin_fraction must be in [0, 1], got {self.min_latin_fraction}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 1 <= self.shingle_size <= 3:
            raise ValueError(f"shingle_size must be 1, 2 or 3, got {self.shingle_size}")
        if self.num_perm < 2:
            raise ValueError(f"num_perm must be >= 2, got {self.num_perm}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shards < 1 or self.val_shards < 1:
            raise ValueError(f"shards/val_shards must be >= 1, got {self.shards}/{self.val_shards}")
        if self.examples < 0:
            raise ValueError(f"examples must be >= 0, got {self.examples}")
        self.boilerplate = tuple(self.boilerplate)
