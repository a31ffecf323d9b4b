"""Packaging: a wheel built from the tree carries every shipped config, the installed code finds
them through ``core.config.packaged_config`` without the repository, and a plain (not editable)
``pip install .`` gives an ``mm`` command that runs from any folder: ``mm demo --help`` and a
tiny real ``mm curate`` with the shipped curate.yaml. No network: the tree is copied and built
without build isolation, and installed with ``--no-deps --target`` (the dependencies are this
venv's).

    .venv/bin/pytest tests/test_package.py -q
"""

from __future__ import annotations

import json
import os
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
def src(tmp_path_factory) -> Path:
    """A copy of what `pip install .` reads (pyproject.toml, README.md and the four packages)."""
    src = tmp_path_factory.mktemp("src")
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / f, src / f)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for pkg in ("core", "mm", "pipelines", "jobs"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=skip)
    return src


@pytest.fixture(scope="module")
def wheel(src, tmp_path_factory) -> Path:
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


@pytest.fixture(scope="module")
def installed(src, tmp_path_factory) -> Path:
    """`pip install .` (a regular install: the wheel's files copied, no link back to the tree)
    into a folder of its own; its ``bin/mm`` runs with this venv's interpreter."""
    target = tmp_path_factory.mktemp("installed")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "--target", str(target), "."], cwd=src, check=True, capture_output=True)
    return target


def _run_installed(target: Path, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(PYTHONPATH=str(target), PATH=f"{target / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}")
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_pip_install_then_mm_runs_from_another_folder(installed, tmp_path):
    from pipelines.demo_corpus import generate_demo_corpus

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # not editable: the code and its configs are the installed copies, not the tree's
    assert not any(p.name.startswith("__editable__") for p in installed.iterdir())
    probe = _run_installed(installed, elsewhere, sys.executable, "-c",
                           "import core, jobs, mm, pipelines; from core.config import packaged_config; "
                           "print(*(m.__file__ for m in (core, jobs, mm, pipelines)), packaged_config('curate.yaml'))")
    assert probe.returncode == 0, probe.stderr[-2000:]
    paths = [Path(p) for p in probe.stdout.split()]
    assert all(p.is_relative_to(installed) for p in paths), paths
    shipped_curate = paths[-1]

    mm_cmd = shutil.which("mm", path=str(installed / "bin"))
    assert mm_cmd, sorted(p.name for p in (installed / "bin").iterdir())
    helped = _run_installed(installed, elsewhere, mm_cmd, "demo", "--help")
    assert helped.returncode == 0 and "usage: mm demo" in helped.stdout, helped.stderr[-2000:]

    shards = generate_demo_corpus(tmp_path / "raw", n_images=12, n_videos=2, image_px=32)["image_sources"][:1]
    curated = _run_installed(installed, elsewhere, mm_cmd, "curate", *shards, "--out", "corpus",
                             "--config", str(shipped_curate), "--set", "images.image_px=32")
    assert curated.returncode == 0, curated.stderr[-3000:]
    summary = json.loads([ln for ln in curated.stdout.splitlines() if ln.startswith("{")][-1])
    assert summary["invariant_ok"] and summary["kept"] > 0, summary
    out = elsewhere / "corpus"  # relative to the folder it ran in
    assert list((out / "data").glob("*.parquet")) and (out / "tokenizer").is_dir()


@pytest.mark.slow
def test_pip_install_then_the_whole_mm_demo_runs_from_another_folder(installed, tmp_path):
    """The whole chain (generate, curate, pretrain on Ray Train, fine-tune, evaluate, report) from
    the installed copy, in a folder that holds no repository, at a reduced size (~3 min on 2 cores)."""
    mm_cmd = shutil.which("mm", path=str(installed / "bin"))
    ran = _run_installed(
        installed, tmp_path, mm_cmd, "demo", "--out", "demo_out", "--no-progress",
        "--set", "n_images=160", "--set", "n_videos=48",
        "--set", 'pretrain_overrides=["train.max_steps=30", "train.checkpoint_every_steps=15", "data.batch_size=16"]',
        timeout=1200)
    assert ran.returncode == 0, (ran.stdout[-2000:], ran.stderr[-3000:])
    runs = tmp_path / "demo_out" / "runs"
    for run in ("pretrain", "finetune"):
        assert (runs / run / "report.html").is_file(), sorted(p.name for p in (runs / run).iterdir())
        assert json.loads((runs / run / "eval.json").read_text()), run
    assert "report:" in ran.stdout
