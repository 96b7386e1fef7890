"""The world-size-independent copy of a checkpoint's trainable state, and its loading on
another world size (another number of data-parallel ranks).

Why: DeepSpeed 0.19 refuses to load ZeRO optimizer partitions saved by another
data-parallel size, and its universal checkpoint needs an offline conversion
(``ds_to_universal``) of every checkpoint. The trainable tensors here are only the
adapters and field MLPs (0.26 MiB in the tiny run, ~22.7M values at SD size), so each
save (``prd.checkpoint.save_training_state``) also writes ``consolidated.pt``: every
trainable parameter's fp32 master weight and optimizer state by parameter name, gathered
with DeepSpeed's tensor-fragment API (``safe_get_full_*``), which is independent of how
ZeRO partitions them. A resume on another world size loads the module from DeepSpeed's
files and scatters these tensors into the new partitions (``safe_set_full_*``); a resume
on the same world size loads DeepSpeed's own files, bit for bit, and does not use this
module. The prompt stream and the RNGs of the new ranks are dealt by
``prd.checkpoint.restore_position``.

Layout of ``consolidated.pt`` (``torch.save`` of plain containers):
  params        {parameter name: {"fp32": tensor, <optimizer key>: tensor, ...}}, whole,
                on the CPU; the optimizer keys are the per-element states (AdamW:
                exp_avg, exp_avg_sq)
  scalars       optimizer entries that are not per-element (a step count)
  param_groups  the torch optimizer's groups without their "params"
"""

from __future__ import annotations

from pathlib import Path

import torch

CONSOLIDATED = "consolidated.pt"


def consolidate(engine) -> dict:
    """Every trainable parameter's fp32 master weight and optimizer state, by name, whole
    (collective: every rank calls it; the same result on every rank). Optimizer entries
    that are not per-element (a step count) are kept from the first parameter group."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    base = engine.optimizer.optimizer  # the wrapped torch optimizer (ZeRO's flat partitions)
    keys, scalars = [], {}
    for flat in base.param_groups[0]["params"]:
        for key, value in base.state[flat].items():
            if torch.is_tensor(value) and value.shape == flat.shape:
                keys.append(key)
            else:
                scalars[key] = value.clone() if torch.is_tensor(value) else value
    params = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        full = {"fp32": safe_get_full_fp32_param(p).cpu()}
        for key in keys:
            full[key] = safe_get_full_optimizer_state(p, key).cpu()
        params[name] = full
    groups = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    return {"params": params, "scalars": scalars, "param_groups": groups}


def scatter_consolidated(engine, consolidated: dict) -> None:
    """Put a ``consolidate`` result into this rank's ZeRO partitions and the module's
    weights (any world size); KeyError naming parameters that do not match."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    saved = consolidated["params"]
    trainable = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    if saved.keys() != trainable.keys():
        missing, extra = (
            sorted(trainable.keys() - saved.keys()),
            sorted(saved.keys() - trainable.keys()),
        )
        raise KeyError(f"consolidated checkpoint: missing {missing[:5]}, unexpected {extra[:5]}")
    base = engine.optimizer.optimizer
    # Before its first step the torch optimizer has no state (it creates it lazily) and
    # ZeRO has not tied the parameters' fragments to it: create the entries, then let ZeRO
    # tie them (what it does itself after the first step), then fill them in.
    keys = sorted({k for tensors in saved.values() for k in tensors if k != "fp32"})
    for flat in (f for g in base.param_groups for f in g["params"]):
        for key in keys:
            base.state[flat].setdefault(key, torch.zeros_like(flat))
        for key, value in consolidated["scalars"].items():
            base.state[flat][key] = value.clone() if torch.is_tensor(value) else value
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    for name, p in trainable.items():
        for key, value in saved[name].items():
            if key == "fp32":
                safe_set_full_fp32_param(p, value.to(p.device))
                with torch.no_grad():
                    p.copy_(value.to(p.dtype))
            else:
                safe_set_full_optimizer_state(p, value.to(p.device), key)
    for group, saved_group in zip(base.param_groups, consolidated["param_groups"]):
        group.update(saved_group)


def load_resharded(engine, ckpt_dir: Path, tag: str, consolidated: dict) -> None:
    """Load checkpoint ``tag`` of ``ckpt_dir``, saved on another world size, into
    ``engine`` (collective): the module's weights from DeepSpeed's files, then the fp32
    master weights and optimizer state from ``consolidated`` (its ``consolidated.pt``)."""
    load_path, _ = engine.load_checkpoint(
        str(ckpt_dir),
        tag=tag,
        load_module_strict=False,
        load_optimizer_states=False,
        load_lr_scheduler_states=False,
        load_module_only=True,
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {Path(ckpt_dir) / tag}")
    scatter_consolidated(engine, consolidated)
