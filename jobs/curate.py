"""``mm curate SRC [SRC ...] --out DIR [--modality image|video] [--config FILE] [--set KEY=VALUE ...]``.

Same as ``python -m jobs.curate ...`` (for ``ray job submit``). Curates tar shards, folders and
manifests into ``DIR`` (DESIGN.md "Curate output"); see pipelines/curate.py. A missing or empty
SRC, an unknown ``--set`` key, a bad config or ``--out`` pointing at a file: one line on stderr,
exit code 2, nothing written. Prints the stats summary as JSON on stdout, one line, with
``report``: where the curation report (``DIR/report.html``, pipelines/curate_report.py) is.

    mm curate shards/{00000..00009}.tar photos/ urls.parquet --out corpus/ --set images.image_px=224
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from core.config import load_config
from jobs.cli import UsageError, add_common, check_out_dir, run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm curate", description="Curate image-text / video-text sources into Parquet.")
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="tar shards (brace patterns, globs), folders, manifests (.parquet/.jsonl/.csv); "
                        "local paths or pyarrow.fs URIs")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--modality", choices=("image", "video"), default=None,
                   help="image (default) or video; overrides the config's modality")
    add_common(p)
    return p


def main_args(args: argparse.Namespace) -> int:
    from pipelines.captions import check_language_support
    from pipelines.curate import CurateConfig, run_curate
    from pipelines.listing import expand_sources

    overrides = list(args.overrides)
    if args.modality:
        overrides.append(f"modality={args.modality}")
    cfg = load_config(CurateConfig, args.config, overrides)
    check_out_dir(args.out)
    try:
        expand_sources(args.sources)           # fails on a missing/empty SRC before anything is written
        check_language_support(cfg.captions)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if cfg.tokenizer.path:
        from pathlib import Path

        if not Path(cfg.tokenizer.path).exists():
            raise UsageError(f"tokenizer.path {cfg.tokenizer.path} does not exist")

    from core.runtime import init_ray

    init_ray(args.address)
    stats = run_curate(args.sources, args.out, cfg)
    summary = {k: stats[k] for k in ("inputs", "kept", "rejected", "invariant_ok") if k in stats}
    summary["out"] = args.out
    from core.storage import exists, join

    if exists(join(args.out, "report.html")):
        summary["report"] = join(args.out, "report.html")
    print(json.dumps(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(main_args, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
