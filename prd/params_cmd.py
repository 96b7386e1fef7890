"""``prd params``: trainable and frozen parameter counts, built on the meta device.

No weights are read or allocated, so the full SD 2.1 configuration counts in seconds on
any machine; ``student.pretrained`` is ignored (the in-code architecture of
``student.arch`` has the same shapes).
"""

from __future__ import annotations

import dataclasses
import json

from prd.config import load
from prd.model import build_model
from prd.student import count_parameters


def add_arguments(p) -> None:
    p.add_argument("--config", action="append", default=[], help="YAML preset (repeatable)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")


def parameter_report(cfg) -> dict:
    """Counts of UNet + VAE decoder (the paper's 2.5% base), plus the field MLPs."""
    student_cfg = dataclasses.replace(cfg.student, pretrained=None)
    cfg = dataclasses.replace(cfg, student=student_cfg)
    model = build_model(cfg, device="meta")
    report = count_parameters(model.student)
    report["field_mlps"] = sum(p.numel() for p in model.decoder.parameters())
    report["trainable_with_field"] = report["trainable"] + report["field_mlps"]
    report["arch"] = cfg.student.arch
    report["lora_rank"] = cfg.student.lora_rank
    return report


def run(args) -> int:
    print(json.dumps(parameter_report(load(args.config, args.overrides)), indent=2))
    return 0
