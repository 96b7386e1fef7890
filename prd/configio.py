"""Loading typed configs: dataclass defaults <- YAML overlays <- CLI dotlist overrides.

A YAML preset may start with ``extends: other.yaml`` (a path relative to the preset) to
build on another preset; that is the only key the loader interprets. Unknown keys and
wrong types fail with the key's full name; each dataclass's ``__post_init__`` checks run
on the merged result.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from omegaconf import OmegaConf
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
    so every __post_init__ check runs). Raises ConfigError naming the offending key.
    """
    merged = OmegaConf.structured(schema)
    layers: list[tuple[str, object]] = []
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
            key = getattr(exc, "full_key", None) or "?"
            msg = str(exc.msg).splitlines()[0]
            raise ConfigError(f"{origin}: bad config key '{key}': {msg}") from None
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc.msg).splitlines()[0]
        raise ConfigError(f"bad config value at '{key}': {msg}") from None
    except ValueError as exc:  # a dataclass __post_init__ check; its message names the field
        raise ConfigError(str(exc)) from exc


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
