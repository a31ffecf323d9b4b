"""The typed config loader: YAML + --set overrides onto frozen dataclasses, clear errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from core.config import ConfigError, load_config


@dataclass(frozen=True)
class Inner:
    image_px: int = 64
    lr: float = 1e-3
    mode: Literal["joint", "divided"] = "joint"
    enabled: bool = True
    names: tuple[str, ...] = ("a", "b")
    path: str | None = None


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    seed: int = 0


def test_defaults_without_file():
    cfg = load_config(Outer)
    assert cfg == Outer()


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  image_px: 32\n  mode: divided\nseed: 3\n")
    cfg = load_config(Outer, str(p), ["inner.lr=0.5", "inner.names=x,y,z", "inner.path=/tmp/a"])
    assert cfg.inner.image_px == 32 and cfg.inner.mode == "divided" and cfg.seed == 3
    assert cfg.inner.lr == 0.5 and cfg.inner.names == ("x", "y", "z") and cfg.inner.path == "/tmp/a"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 4  # frozen


def test_int_is_accepted_for_float_and_not_reverse():
    assert load_config(Outer, None, ["inner.lr=1"]).inner.lr == 1.0
    assert load_config(Outer, None, ["inner.lr=2e-3"]).inner.lr == 2e-3  # YAML 1.1 reads this as a string
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(Outer, None, ["inner.lr=fast"])
    with pytest.raises(ConfigError, match="inner.image_px"):
        load_config(Outer, None, ["inner.image_px=1.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("inner.colour=3", "unknown config key 'inner.colour'; valid keys here: enabled, image_px"),
        ("nope=1", "unknown config key 'nope'"),
        ("inner.mode=spatial", "valid choices: joint, divided"),
        ("inner.enabled=maybe", "valid choices: true, false"),
        ("inner.image_px=big", "expected an integer"),
        ("noequals", "KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key_and_choices(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(Outer, None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, str(scalar))
    # A YAML file that would need an unsafe loader is refused, not executed.
    evil = tmp_path / "evil.yaml"
    evil.write_text("seed: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, str(evil))
