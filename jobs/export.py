"""`mm export`: write a run's towers in a format other libraries load (mm/export.py).

    mm export --model RUN --to openclip|hf --out EXPORT_DIR

``hf``: EXPORT_DIR/vision (a timm model dir), EXPORT_DIR/text (transformers + tokenizer),
projection.safetensors and export_config.json. ``openclip``: open_clip_config.json +
open_clip_model.safetensors, loaded with ``open_clip.create_model_and_transforms("local-dir:DIR")``.
No Ray needed. Bad paths and a model part the format cannot hold fail with one line and exit
code 2, before anything is written. Tested in tests/test_export.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from jobs.cli import UsageError, add_common, check_out_dir, run

log = logging.getLogger("mm.export")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm export", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="run dir (with model/) or model dir")
    p.add_argument("--to", required=True, choices=("openclip", "hf"),
                   help="openclip: OpenCLIP local-dir; hf: timm + transformers directories")
    p.add_argument("--out", required=True, help="export directory to write (replaced)")
    add_common(p, config=False)
    return p


def _main(args: argparse.Namespace) -> int:
    from mm.evaluate import resolve_model_dir
    from mm.export import ExportError, export

    try:
        resolve_model_dir(args.model)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    check_out_dir(args.out)
    try:
        out = export(args.model, args.out, args.to)
    except ExportError as e:
        raise UsageError(str(e)) from None
    log.info("exported %s to %s (%s)", args.model, out, args.to)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
