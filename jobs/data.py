"""`mm data digits|emoji`: real labelled data sets, written through the normal curation path.

    mm data digits --out corpora/digits [--limit N] [--config configs/curate.yaml] [--set KEY=VALUE ...]
    mm data emoji  --out corpora/emoji  [--set tokenizer.path=$(python -c '...get_model_path()')]

The converter (pipelines/labelled.py) writes a folder source (image + JSON sidecar with caption
and label) into a scratch directory beside ``--out``, runs ``pipelines.curate.run_curate`` on it,
removes the scratch source, and adds ``classes.json``, ``templates.json`` and a ``converter``
entry to the corpus's manifest. The config is CurateConfig with these converter defaults under
the user's file and ``--set`` overrides: near-duplicate removal off (distinct handwritten digits
and skin-tone variants of one emoji are near-identical by pHash yet real, distinct samples;
exact duplicates are still removed) and a 20% validation split (the benchmark's held-out set).
Emoji needs Debian's ``fonts-noto-color-emoji`` and ``unicode-data``: without them, one line
and exit code 2. Tested in tests/test_labelled.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from core.config import ConfigError, build
from jobs.cli import UsageError, add_common, check_out_dir, run

log = logging.getLogger("mm.data")

CONVERTER_DEFAULTS = {
    "digits": {"dedup": {"near": False}, "output": {"val_fraction": 0.2}},
    # names like "ox" are shorter than the web default of 3 characters
    "emoji": {"dedup": {"near": False}, "output": {"val_fraction": 0.2}, "captions": {"min_caption_chars": 1}},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm data", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=sorted(CONVERTER_DEFAULTS))
    p.add_argument("--out", required=True, metavar="DIR", help="corpus directory to write")
    p.add_argument("--limit", type=int, default=0, help="first N samples only (0: all)")
    add_common(p)
    return p


def _merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_curate_config(dataset: str, path: str | None, overrides: Sequence[str]):
    """Converter defaults <- YAML file <- ``--set`` overrides, onto CurateConfig."""
    from pipelines.curate import CurateConfig

    data = copy.deepcopy(CONVERTER_DEFAULTS[dataset])
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = _merge(data, loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            node[parts[-1]] = raw
    return build(CurateConfig, data)


def convert(dataset: str, out: str, cfg, limit: int = 0) -> dict:
    """Write ``dataset`` as a curated corpus in ``out`` (Ray initialised); returns curate's stats."""
    from pipelines import labelled as L
    from pipelines.curate import run_curate

    out_p = Path(out).resolve()
    out_p.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_p.name}-source-", dir=out_p.parent))
    try:
        if dataset == "digits":
            info = L.write_digits_source(scratch, limit=limit or None)
        else:
            info = L.write_emoji_source(scratch, limit=limit or None)
        stats = run_curate([str(scratch)], str(out_p), cfg)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    L.write_class_files(out_p, info["classes"], info["templates"])
    manifest_path = out_p / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest["converter"] = {"dataset": dataset, "origin": info["origin"], "samples_written": info["n"],
                             "classes": info["classes"], "note": "inputs[] name a scratch folder removed after "
                             "curation; rerun `mm data` to regenerate it (deterministic)"}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return stats


def _main(args: argparse.Namespace) -> int:
    from pipelines import labelled as L

    cfg = load_curate_config(args.dataset, args.config, args.overrides)
    check_out_dir(args.out)
    if args.limit < 0:
        raise UsageError("--limit must be >= 0")
    if args.dataset == "emoji" and not L.emoji_available():
        raise UsageError(f"emoji needs the Debian packages fonts-noto-color-emoji and unicode-data "
                         f"({L.EMOJI_FONT}, {L.EMOJI_TEST}); apt-get install them")
    if cfg.tokenizer.path and not Path(cfg.tokenizer.path).exists():
        raise UsageError(f"tokenizer.path {cfg.tokenizer.path} does not exist")
    from core.runtime import init_ray

    init_ray(args.address)
    stats = convert(args.dataset, args.out, cfg, args.limit)
    print(json.dumps({k: stats.get(k) for k in ("inputs", "kept", "rejected", "invariant_ok")} | {"out": args.out}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
