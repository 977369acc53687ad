"""Building a `Config` from YAML and dotted overrides, and writing it back.

Every key is checked on load: an unknown key, a wrong type or a null where none is allowed raises
`ConfigError` naming the dotted key; the sections' own `__post_init__` checks the values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from medseg.config.sections import Config, ConfigError

LEGACY_VALUES = {"data.cache": {True: "memory", False: "off"}}
"""Values older medseg versions wrote (run folders' config.yaml), read as their new spelling."""


def load_config(path: Path | str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when `path` is None) and apply ``key=value`` overrides.

    Args:
        path: YAML file whose sections mirror `Config`.
        overrides: dotted assignments such as ``train.epochs=2`` or ``model.filters=[8,16,32]``;
            values are parsed as YAML.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or out-of-range value.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides or []:
        _apply_override(raw, item)
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated `Config` from nested plain data (as read from YAML)."""
    return _build(Config, raw, "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain data (lists, str paths) suitable for YAML, inverse of `from_dict`."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Copy of `cfg` with ``key=value`` overrides applied (see `load_config`)."""
    raw = to_dict(cfg)
    for item in overrides:
        _apply_override(raw, item)
    return from_dict(raw)


def save_config(
    cfg: Config, path: Path, comment: str = "", only: Sequence[str] | None = None
) -> None:
    """Write `cfg` as YAML (sections in dataclass order, lists of numbers on one line).

    Args:
        cfg: the config.
        path: the YAML file.
        comment: lines written first, each prefixed ``# ``.
        only: dotted keys or sections to write (``model``, ``train.batch_size``); the others are
            left out, so loading the file gives them their defaults. None writes every key.
    """
    raw = to_dict(cfg)
    if only is not None:
        raw = _select(raw, only)
    header = "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines())
    path.write_text(header + yaml.dump(raw, Dumper=_Dumper, sort_keys=False))


def _select(raw: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The parts of nested `raw` named by dotted `keys`, in `raw`'s order."""
    wanted = [key.split(".", 1) for key in keys]
    out = {}
    for name, value in raw.items():
        inner = [rest[0] for head, *rest in wanted if head == name and rest]
        if [name] in wanted:
            out[name] = value
        elif inner:
            out[name] = _select(value, inner)
    return out


class _Dumper(yaml.SafeDumper):
    """Safe YAML with block mappings and lists of scalars on one line (``[16, 32, 64]``)."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = not any(isinstance(v, (list, dict)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def replace(cfg: Config, **sections: Any) -> Config:
    """Copy of `cfg` with dotted keys replaced: ``replace(cfg, **{"data.root": p})``."""
    raw = to_dict(cfg)
    for key, value in sections.items():
        section, name = key.split(".", 1)
        raw[section][name] = str(value) if isinstance(value, Path) else value
    return from_dict(raw)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, train, infer)")
    return raw


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(
            f"override {item!r} must look like section.key=value, e.g. train.epochs=2"
        )
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:  # absent, or a section left empty in the YAML file
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        valid = ", ".join(prefix + name for name in fields)
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; valid keys here: {valid}")
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: _coerce(hints[name], _upgraded(raw[name], prefix + name), prefix + name)
        for name in raw
    }
    return cls(**kwargs)


def _upgraded(value: Any, key: str) -> Any:
    """`value`, or its current spelling when it is one that older medseg versions wrote."""
    legacy = LEGACY_VALUES.get(key, {})
    return legacy[value] if isinstance(value, bool) and value in legacy else value


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if value is None:
        raise ConfigError(f"{key} must not be null")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        item_type = args[0]
        return tuple(_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key} must be a path, got {value!r}")
        return Path(value).expanduser()
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover - programming error
