"""What ``prd eval`` writes into its output folder OUT:

- ``views/<name>/<k>.png``: the exact images scored (k = 0..3, azimuth 0/90/180/270;
  <name> is the file name ``prd sample`` gives the prompt's mesh);
- ``scores.json``: ``{"prompts": {PROMPT: {"clip_score", "r_at_1", "views": [...]}},
  "mean": {"clip_score", "r_at_1", ...}, "protocol": {...}, ...}``; oracle prompts add
  "chamfer", "color_error" and "silhouette_iou"; a prompt that failed has null scores
  and an "error";
- ``scores.md``: the same as a markdown table;
- ``index.html``: a gallery of the four views of each prompt with its scores, sortable
  by any score (inline script); images by relative paths into ``views/``, so the folder
  opens offline as it is.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from PIL import Image

from prd.clip_score import TEXT_PREFIX
from prd.evaluate import QUALITY_KEYS, Evaluation, ViewProtocol

COLUMNS = {
    "clip_score": ("CLIP score", "{:.2f}"),
    "r_at_1": ("R@1", "{:.3f}"),
    "chamfer": ("Chamfer", "{:.4f}"),
    "color_error": ("colour error", "{:.4f}"),
    "silhouette_iou": ("IoU", "{:.3f}"),
}
"""Score key -> (column title, format) of the table and the gallery."""


def scores_document(ev: Evaluation, protocol: ViewProtocol, **meta) -> dict:
    """The scores.json object; ``meta`` (e.g. clip folder, mesh source) is kept as given."""
    return {"prompts": ev.rows, "mean": ev.mean, "protocol": protocol.as_dict(), **meta}


def write_report(out: Path, ev: Evaluation, protocol: ViewProtocol, **meta) -> dict:
    """Write views, scores.json, scores.md and index.html into ``out``; returns the
    scores.json object."""
    out = Path(out)
    for name, images in zip(ev.names, ev.images):
        if images is None:
            continue
        folder = out / "views" / name
        folder.mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(images):
            Image.fromarray(image).save(folder / f"{k}.png")
    doc = scores_document(ev, protocol, **meta)
    (out / "scores.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "scores.md").write_text(markdown_table(ev))
    (out / "index.html").write_text(gallery_html(ev, protocol))
    return doc


def _columns(ev: Evaluation) -> list[str]:
    oracle = any(k in r for r in ev.rows.values() for k in QUALITY_KEYS)
    return ["clip_score", "r_at_1", *(QUALITY_KEYS if oracle else ())]


def _fmt(key: str, value) -> str:
    return "-" if value is None else COLUMNS[key][1].format(value)


def markdown_table(ev: Evaluation) -> str:
    """One row per prompt (file order), then the mean; failed prompts show their error."""
    cols = _columns(ev)
    lines = [
        "| prompt | " + " | ".join(COLUMNS[c][0] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for prompt, row in ev.rows.items():
        cells = [_fmt(c, row.get(c)) for c in cols]
        if "error" in row:
            cells[-1] += f" (failed: {row['error']})"
        text = prompt.replace("|", "\\|")
        lines.append(f"| {text} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    n = f"mean ({ev.mean['n_scored']} of {ev.mean['n_prompts']} prompts scored)"
    lines.append(f"| **{n}** | " + " | ".join(_fmt(c, ev.mean.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


_STYLE = """body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px;text-align:center}th[data-key]{cursor:pointer}
img{width:160px;height:160px}td.p{text-align:left;max-width:16em}.err{color:#b00}"""

_SCRIPT = """document.querySelectorAll("th[data-key]").forEach(function (th) {
  th.addEventListener("click", function () {
    var key = th.dataset.key, body = document.querySelector("#g tbody");
    var dir = th.dataset.dir = th.dataset.dir === "desc" ? "asc" : "desc";
    var value = function (row) {
      var v = row.dataset[key];
      return key === "prompt" ? v : (v === "" ? -Infinity : parseFloat(v));
    };
    Array.from(body.rows).sort(function (a, b) {
      var x = value(a), y = value(b), c = x < y ? -1 : x > y ? 1 : 0;
      return dir === "asc" ? c : -c;
    }).forEach(function (row) { body.appendChild(row); });
  });
});"""


def gallery_html(ev: Evaluation, protocol: ViewProtocol) -> str:
    """A self-contained page: no external resource; views by relative path."""
    esc = html.escape
    cols = _columns(ev)
    head = "".join(f'<th data-key="{c}">{esc(COLUMNS[c][0])} &#8597;</th>' for c in cols)
    rows = []
    for prompt, row in ev.rows.items():
        data = "".join(
            f' data-{c}="{"" if row.get(c) is None else repr(float(row[c]))}"' for c in cols
        )
        cells = "".join(f"<td>{_fmt(c, row.get(c))}</td>" for c in cols)
        if "error" in row:
            views = f'<td class="err">{esc(row["error"])}</td>'
        else:
            imgs = "".join(
                f'<img src="{esc(v["image"])}" loading="lazy" alt="view {k}" '
                f'title="azimuth {v["azimuth"]:g}: CLIP {v["clip_score"]:.2f}, '
                f'top-1 {esc(v["top1"])}">'
                for k, v in enumerate(row["views"])
            )
            views = f"<td>{imgs}</td>"
        rows.append(
            f'<tr data-prompt="{esc(prompt)}"{data}><td class="p">{esc(prompt)}</td>'
            f"{cells}{views}</tr>"
        )
    mean = ", ".join(f"{COLUMNS[c][0]} {_fmt(c, ev.mean.get(c))}" for c in cols if c in ev.mean)
    p = protocol
    setup = (
        f"{len(p.azimuths)} views at azimuth {', '.join(f'{a:g}' for a in p.azimuths)}, "
        f"elevation {p.elevation:g}, distance {p.distance:g}, fov {p.fov_y:g}, "
        f"{p.resolution} px, background {p.background}, unlit vertex colours; "
        f"text &quot;{esc(TEXT_PREFIX)}&quot; + prompt"
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>prd eval</title>'
        f"<style>{_STYLE}</style></head><body>\n<h1>prd eval</h1>\n"
        f"<p>Mean over {ev.mean['n_scored']} of {ev.mean['n_prompts']} prompts: {mean}.</p>\n"
        f"<p>{setup}. Click a column title to sort.</p>\n"
        f'<table id="g"><thead><tr><th data-key="prompt">prompt &#8597;</th>{head}'
        "<th>views</th></tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table>\n"
        f"<script>\n{_SCRIPT}\n</script>\n</body></html>\n"
    )
