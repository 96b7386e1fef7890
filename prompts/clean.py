"""Prompt cleaning, the dedup key, and the per-prompt filter rules.

Cleaning turns a raw user prompt into the text the text encoder will see; the dedup key
is a coarser form (lower case, punctuation dropped) under which two prompts count as the
same. Both are pure functions of one string, so curation is independent of input order.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

# Quality boilerplate of DALL-E / Midjourney / SD user prompts: comma-separated segments
# that describe the image's rendering, not the object, and would teach the 3D student
# nothing (an exact, case-insensitive match of a whole segment is removed).
DEFAULT_BOILERPLATE = (
    "4k",
    "8k",
    "16k",
    "hd",
    "uhd",
    "hdr",
    "8k uhd",
    "4k uhd",
    "high resolution",
    "highly detailed",
    "ultra detailed",
    "hyper detailed",
    "intricate details",
    "intricate detail",
    "sharp focus",
    "masterpiece",
    "best quality",
    "high quality",
    "trending on artstation",
    "artstation",
    "trending on cgsociety",
    "octane render",
    "unreal engine",
    "unreal engine 5",
    "ray tracing",
    "award winning",
    "cinematic lighting",
    "volumetric lighting",
    "photorealistic",
    "hyperrealistic",
    "ultra realistic",
    "ultra-realistic",
)

# Controls and invisible format characters; tab / newline / CR become spaces first.
_CONTROL = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]"
)
_SPACE = re.compile(r"\s+")
# Midjourney parameters ("--ar 16:9 --v 5 --no text") must come last in a prompt, so
# everything from the first "--word" on is generator syntax.
_MJ_FLAGS = re.compile(r"(?:^|\s)--[A-Za-z].*$", re.DOTALL)
# SD web-UI syntax: "(word:1.3)" weights, "((emphasis))", "[de-emphasis]", "<lora:x:0.8>".
_WEIGHT = re.compile(r"\(([^():]+):\s*-?\d+(?:\.\d+)?\)")
_MULTI_PAREN = re.compile(r"\({2,}|\){2,}|[\[\]{}]")
_ANGLE_TAG = re.compile(r"<[A-Za-z]+:[^<>]*>")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_REPEATED_COMMA = re.compile(r"(?:\s*,)+")
_TRAILING_PUNCT = re.compile(r"[\s,.;:!?|/\\\-–—_~*+=&]+$")
_LEADING_PUNCT = re.compile(r"^[\s,.;:!?|/\\\-–—_~*+=&]+")
_KEY_DROP = re.compile(r"[^\w\s]|_")
_NOT_LETTER = re.compile(r"[\W\d_]+")


def clean_prompt(
    text: str, boilerplate: frozenset[str] = frozenset(DEFAULT_BOILERPLATE), strip_syntax=True
) -> str:
    """The cleaned prompt: NFKC, controls dropped, generator syntax and boilerplate removed,
    whitespace folded, leading/trailing punctuation stripped. May return "".

    boilerplate: lower-case comma-separated segments to remove (never the first segment,
    which names the subject); strip_syntax: remove Midjourney flags and SD weight syntax.
    """
    # Each regex runs only when its trigger character is present: most prompts need
    # none of them, and this loop runs over millions of prompts.
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    text = " ".join(text.split())
    if not text.isprintable():
        text = _CONTROL.sub("", text)
    if strip_syntax:
        if "--" in text:
            text = _MJ_FLAGS.sub("", text)
        if "<" in text:
            text = _ANGLE_TAG.sub(" ", text)
        if ":" in text:
            text = _WEIGHT.sub(r"\1", text)
        if "(" in text or ")" in text or "[" in text or "]" in text or "{" in text or "}" in text:
            text = _MULTI_PAREN.sub("", text)
        text = " ".join(text.split())
    if "," in text:
        if boilerplate:
            parts = text.split(",")
            kept = [parts[0]] + [p for p in parts[1:] if p.strip().lower() not in boilerplate]
            text = ",".join(kept)
        text = _REPEATED_COMMA.sub(",", text)
    if " ," in text or " ." in text or " ;" in text or " :" in text or " !" in text or " ?" in text:
        text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    if text and (not text[-1].isalnum() or not text[0].isalnum()):
        text = _LEADING_PUNCT.sub("", _TRAILING_PUNCT.sub("", text))
    return text


def dedup_key(text: str) -> str:
    """Lower case, punctuation dropped, whitespace folded: prompts equal under this key are
    exact duplicates (e.g. "A red car." and "a red car")."""
    return " ".join(_KEY_DROP.sub(" ", text.lower()).split())


def letter_fraction(text: str) -> float:
    """Share of letters among the non-space characters (1.0 for an empty string)."""
    chars = text.replace(" ", "")
    if not chars:
        return 1.0
    return len(_NOT_LETTER.sub("", chars)) / len(chars)


def latin_fraction(text: str) -> float:
    """Share of Latin-script letters among the letters (1.0 when there are none).

    A cheap script check standing in for a language detector: the SD text encoders were
    trained on English captions, and non-Latin prompts mostly tokenize to byte pieces.
    """
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 1.0
    if text.isascii():
        return 1.0
    latin = sum(c.isascii() or "LATIN" in unicodedata.name(c, "") for c in letters)
    return latin / len(letters)


class Blocklist:
    """Case-insensitive whole-word / whole-phrase matcher of blocked terms."""

    def __init__(self, terms: Iterable[str]):
        words, phrases = set(), []
        for term in terms:
            key = dedup_key(term)
            if not key:
                continue
            if " " in key:
                phrases.append(key)
            else:
                words.add(key)
        self.words = frozenset(words)
        self.phrases = tuple(sorted(phrases))
        self._phrase_re = (
            re.compile(r"\b(?:" + "|".join(re.escape(p) for p in self.phrases) + r")\b")
            if self.phrases
            else None
        )

    @classmethod
    def from_file(cls, path: str | Path) -> Blocklist:
        """One term per line; blank lines and lines starting with '#' are ignored."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"block list {path} does not exist")
        lines = path.read_text(encoding="utf-8").splitlines()
        return cls(ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#"))

    def match(self, key: str) -> str | None:
        """The first blocked term found in a dedup key, or None."""
        if self.words:
            hit = self.words.intersection(key.split())
            if hit:
                return min(hit)
        if self._phrase_re is not None:
            m = self._phrase_re.search(key)
            if m:
                return m.group(0)
        return None

    def __len__(self) -> int:
        return len(self.words) + len(self.phrases)
