"""`mm export`: write a run's towers as Hugging Face transformers models (mm/export.py).

    mm export --model RUN --out EXPORT_DIR

EXPORT_DIR/vision (ViTModel), EXPORT_DIR/text (BertModel + tokenizer), projection.safetensors and
export_config.json; loadable with transformers alone (``mm.export.load_hf_export`` shows how).
No Ray needed. Bad paths fail with one line and exit code 2. Tested in tests/test_export.py.
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
    p.add_argument("--out", required=True, help="export directory to write (replaced)")
    add_common(p, config=False)
    return p


def _main(args: argparse.Namespace) -> int:
    from mm.evaluate import resolve_model_dir
    from mm.export import export_hf

    try:
        resolve_model_dir(args.model)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    check_out_dir(args.out)
    try:
        out = export_hf(args.model, args.out)
    except ValueError as e:
        raise UsageError(str(e)) from None
    log.info("exported %s to %s (Hugging Face transformers towers)", args.model, out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
