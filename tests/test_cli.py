"""Every command: bad input fails before any work with one line on stderr and exit code 2.

Runs the real entry points in-process (they must fail before Ray starts), plus `--help` of each
`python -m jobs.<cmd>` in a subprocess, as `ray job submit` would run it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobs import cli

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"\xff\xd8not really")
    (d / "a.txt").write_text("a caption")
    return d


def _fails(capsys, argv, *needles):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, err)
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_unknown_command(capsys):
    _fails(capsys, ["frobnicate"], "valid choices", "curate")


def test_curate_bad_inputs(capsys, tmp_path, src):
    out = tmp_path / "out"
    _fails(capsys, ["curate", str(tmp_path / "missing"), "--out", str(out)], "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, ["curate", str(empty), "--out", str(out)])
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _fails(capsys, ["curate", str(src), "--out", str(a_file)], "file")
    _fails(capsys, ["curate", str(src), "--out", str(out), "--set", "images.colour=3"], "images.colour")
    _fails(capsys, ["curate", str(src), "--out", str(out), "--set", "modality=audio"], "image", "video")
    bad = tmp_path / "bad.yaml"
    bad.write_text("images: [oops\n")
    _fails(capsys, ["curate", str(src), "--out", str(out), "--config", str(bad)], "YAML")
    assert not out.exists(), "nothing may be written when the input is bad"


def test_training_and_eval_bad_paths(capsys, tmp_path):
    missing = str(tmp_path / "missing")
    out = tmp_path / "run"
    _fails(capsys, ["pretrain", "--data", missing, "--out", str(out)])
    _fails(capsys, ["finetune", "--init", missing, "--data", missing, "--task", "classify", "--out", str(out)])
    _fails(capsys, ["evaluate", "--model", missing, "--data", missing, "--out", str(out / "eval.json")])
    assert not out.exists()


def test_demo_bad_config(capsys, tmp_path):
    _fails(capsys, ["demo", "--out", str(tmp_path / "d"), "--set", "n_imagez=3"], "n_imagez")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("cmd", ["curate", "pretrain", "finetune", "evaluate", "pipeline", "refresh", "demo"])
def test_module_help(cmd):
    r = subprocess.run([sys.executable, "-m", f"jobs.{cmd}", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout.lower()


def test_out_dir_accepts_a_file_uri(tmp_path):
    """``--out file:///…`` is a local directory, not a bucket (it was refused as "bucket  does not exist")."""
    cli.check_out_dir(f"file://{tmp_path / 'out'}")
