"""Counts and examples of what curation removed or changed, per rule."""

from __future__ import annotations

from dataclasses import dataclass, field

from prompts.readers import BadLines

# Rules in pipeline order; "truncated" changes a prompt, the others remove it.
RULES = (
    "empty",
    "too_short",
    "non_letters",
    "language",
    "blocklist",
    "too_long",
    "truncated",
    "exact_duplicate",
    "leakage",
    "near_duplicate",
)


@dataclass
class RuleLog:
    """Per-rule counts and the first `keep` examples ("file:line: text")."""

    keep: int = 5
    seen: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RULES, 0))
    examples: dict[str, list[str]] = field(default_factory=dict)
    dropped: int = 0

    def add(self, rule: str, location: str, text: str, dropped: bool = True) -> None:
        if rule not in self.counts:
            raise KeyError(f"unknown rule {rule!r}; known: {RULES}")
        self.counts[rule] += 1
        self.dropped += dropped
        shown = self.examples.setdefault(rule, [])
        if len(shown) < self.keep:
            shown.append(f"{location}: {text}")

    def as_dict(self, bad: BadLines) -> dict:
        return {
            "read": self.seen,
            "skipped_input_records": bad.total,
            "removed": self.dropped,
            "counts": dict(self.counts),
            "examples": {r: self.examples[r] for r in RULES if r in self.examples},
            "bad_input": {"counts": dict(bad.counts), "examples": dict(bad.examples)},
        }


def format_report(report: dict) -> str:
    """A plain-text summary of a curation report."""
    lines = [
        f"read {report['read']} prompts; skipped {report['skipped_input_records']} bad input "
        f"records; removed {report['removed']}; kept {report.get('kept', {})}",
        "",
        "rule                 count",
    ]
    for rule, n in report["counts"].items():
        lines.append(f"{rule:<20} {n:>6}")
        for ex in report["examples"].get(rule, []):
            lines.append(f"    {ex}")
    bad = report["bad_input"]
    if bad["counts"]:
        lines += ["", "skipped input records"]
        for kind, n in bad["counts"].items():
            lines.append(f"{kind:<20} {n:>6}")
            for ex in bad["examples"].get(kind, []):
                lines.append(f"    {ex}")
    return "\n".join(lines) + "\n"
