"""Loading typed configs: dataclass defaults <- YAML overlays <- CLI dotlist overrides.

A YAML preset may start with ``extends: other.yaml`` (a path relative to the preset) to
build on another preset; that is the only key the loader interprets. Unknown keys and
wrong types fail with the key's full name; each dataclass's ``__post_init__`` checks run
on the merged result.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

EXTENDS_KEY = "extends"


class ConfigError(ValueError):
    """A config file or override that does not fit the typed config."""


def read_overlay(path: str | Path, _seen: tuple[Path, ...] = ()) -> list[dict]:
    """The chain of YAML mappings of a preset, base first (``extends`` resolved)."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"config files extend each other in a cycle: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    base = data.pop(EXTENDS_KEY, None)
    chain = [] if base is None else read_overlay(path.parent / base, (*_seen, path))
    return [*chain, data]


def load_config(
    schema: type[T], files: list[str | Path] | None = None, overrides: list[str] | None = None
) -> T:
    """Merge YAML ``files`` (in order) and ``key=value`` overrides onto ``schema``'s defaults.

    Returns an instance of ``schema`` (nested dataclasses built through their __init__,
    so every __post_init__ check runs). Raises ConfigError naming the offending key (a
    failed __post_init__ check: the dotted name of its section, unless the check's own
    message starts with it).
    """
    merged = OmegaConf.structured(schema)
    layers: list[tuple[str, DictConfig]] = []
    for f in files or []:
        layers += [(str(f), OmegaConf.create(d)) for d in read_overlay(f)]
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        layers.append((f"override {item!r}", OmegaConf.from_dotlist([item])))
    for origin, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or _failing_key(merged, layer)
            raise ConfigError(f"{origin}: bad config key '{key}': {_message(exc)}") from None
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"bad config value at '{key}': {_message(exc)}") from None
    except ValueError as exc:  # a dataclass __post_init__ check
        raise ConfigError(_locate_check(merged, "") or str(exc)) from exc


def _message(exc: OmegaConfBaseException) -> str:
    return str(getattr(exc, "msg", None) or exc).splitlines()[0]


def _leaves(data: DictConfig, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of every leaf of a mapping (lists are leaves)."""
    out = []
    for key in data:
        value = data._get_node(key)
        name = f"{prefix}{key}"
        if isinstance(value, DictConfig) and len(value):
            out += _leaves(value, f"{name}.")
        else:
            out.append((name, value))
    return out


def _failing_key(merged: DictConfig, layer: DictConfig) -> str:
    """The first leaf of ``layer`` that does not merge (omegaconf names no key for some
    errors, e.g. a tuple of the wrong length)."""
    for key, value in _leaves(layer):
        single = OmegaConf.create()
        OmegaConf.update(single, key, value, force_add=True)
        try:
            OmegaConf.merge(merged, single)
        except OmegaConfBaseException:
            return key
    return "?"


def _locate_check(node: DictConfig, path: str) -> str | None:
    """The message of the innermost section whose __post_init__ fails, prefixed with the
    section's dotted name; None when every section of ``node`` builds."""
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
            found = _locate_check(child, f"{path}{key}.")
            if found:
                return found
    try:
        OmegaConf.to_object(node)
    except ValueError as exc:
        msg, section = str(exc), path.rstrip(".")
        return msg if not section or msg.startswith(section) else f"{section}: {msg}"
    return None


def to_yaml(cfg) -> str:
    """The full resolved config as YAML (saved beside every checkpoint)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def load_config_text(schema: type[T], text: str, overrides: list[str] | None = None) -> T:
    """``load_config`` of a YAML document held in memory (e.g. a weights file's header)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text)
        return load_config(schema, [path], overrides)
