"""Packaging: a wheel built from the tree carries every shipped config, and the installed code
finds them through ``core.config.packaged_config`` without the repository (no network: the wheel
is built without build isolation, from a copy of the tree).

    .venv/bin/pytest tests/test_package.py -q
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from core.config import CONFIGS_DIR, ConfigError, packaged_config

ROOT = Path(__file__).resolve().parent.parent


def test_the_clone_links_configs_to_the_package_data():
    assert (ROOT / "configs").resolve() == CONFIGS_DIR
    assert packaged_config("pretrain.yaml") == CONFIGS_DIR / "pretrain.yaml"
    with pytest.raises(ConfigError, match="no shipped config 'nope.yaml'; shipped: .*pretrain.yaml"):
        packaged_config("nope.yaml")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / f, src / f)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for pkg in ("core", "mm", "pipelines", "jobs"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=skip)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(out), str(src)], check=True, capture_output=True)
    (whl,) = out.glob("*.whl")
    return whl


def test_wheel_carries_the_shipped_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(p.name for p in CONFIGS_DIR.iterdir() if p.suffix in (".yaml", ".json"))
    assert "pretrain.yaml" in shipped and "templates.json" in shipped
    assert {f"core/configs/{n}" for n in shipped} <= names
    assert "jobs/cli.py" in names and "mm/pretrained.py" in names


def test_installed_code_finds_its_configs_outside_the_repo(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel unpacked is its installed layout
    probe = ("from core.config import packaged_config; import mm.evaluate, jobs.demo; "
             "print(packaged_config('pretrain.yaml')); print(mm.evaluate.DEFAULT_TEMPLATES); "
             "print(jobs.demo.DemoConfig().pretrain_config)")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    assert out == [str(site / "core" / "configs" / n) for n in ("pretrain.yaml", "templates.json", "pretrain.yaml")]
    assert (site / "core" / "configs" / "pretrain.yaml").read_bytes() == (CONFIGS_DIR / "pretrain.yaml").read_bytes()
