"""Typed configs: YAML files and `--set a.b=v` overrides mapped onto frozen dataclasses.

Each component owns a small frozen dataclass (``pipelines.images.ImageConfig``,
``mm.optim.OptimConfig`` ...); a job's config is a dataclass whose fields are those sections.
This module turns a YAML mapping plus overrides into an instance, and fails before any work with
one line that names the bad key and the valid choices.

    cfg = load_config(CurateConfig, "configs/curate.yaml", ["images.image_px=128"])
    path = packaged_config("pretrain.yaml")        # a shipped config, wherever the package lives

The shipped configs (YAML experiments, templates.json) are package data in ``core/configs/``, so
a plain ``pip install`` carries them; a clone's top-level ``configs`` is a link to that folder,
so ``--config configs/pretrain.yaml`` keeps working there.

Tested in tests/test_config.py and tests/test_package.py (the configs inside a built wheel).
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config file or override that cannot be mapped onto the typed config."""


def packaged_config(name: str) -> Path:
    """The shipped config file ``name`` (e.g. ``"pretrain.yaml"``, ``"templates.json"``)."""
    path = CONFIGS_DIR / name
    if not path.is_file():
        shipped = ", ".join(sorted(p.name for p in CONFIGS_DIR.iterdir())) if CONFIGS_DIR.is_dir() else "none"
        raise ConfigError(f"no shipped config {name!r}; shipped: {shipped}")
    return path


def load_config(cls: type, path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Load ``path`` (YAML, optional), apply ``key.sub=value`` overrides, build ``cls``."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _assign(data, key.strip().split("."), value)
    return build(cls, data)


def _assign(data: dict, parts: list[str], value: Any) -> None:
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Construct dataclass ``cls`` from a mapping, recursively, checking keys and types."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(sorted(fields))}")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"bad value {value!r} for '{key}'; valid choices: {', '.join(map(str, choices))}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"bad value {value!r} for '{key}'")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"bad value {value!r} for '{key}'; expected a list")
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"bad value {value!r} for '{key}'; expected {len(args)} items")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"bad value {value!r} for '{key}'; expected a mapping")
        args = get_args(tp)
        if args:
            return {_coerce(args[0], k, key): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"bad value {value!r} for '{key}'; valid choices: true, false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"bad value {value!r} for '{key}'; expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-3 (no dot in the mantissa) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"bad value {value!r} for '{key}'; expected a number")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"bad value {value!r} for '{key}'; expected a string")
        return str(value)
    return value


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain data, for manifests."""
    return dataclasses.asdict(cfg)


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


__all__ = ["CONFIGS_DIR", "ConfigError", "packaged_config", "load_config", "build", "to_dict", "field_names"]
