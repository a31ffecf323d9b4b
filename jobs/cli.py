"""Shared command-line parsing and the ``mm`` console script.

``mm CMD ...`` and ``python -m jobs.CMD ...`` are the same thing: ``mm`` dispatches to
``jobs.<CMD>.main``. Every job takes ``--config FILE`` and repeatable ``--set KEY=VALUE``
(never one flag per hyperparameter) and ``--address`` for a Ray cluster. A bad path, an empty
input or a bad config fails before any work starts with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from core.config import ConfigError

COMMANDS = ("curate", "pretrain", "finetune", "evaluate", "pipeline", "refresh", "demo", "data", "export")
EXIT_USAGE = 2


class UsageError(ValueError):
    """A bad argument, path or input detected before any work starts."""


def add_common(parser: argparse.ArgumentParser, *, config: bool = True) -> None:
    if config:
        parser.add_argument("--config", metavar="FILE", help="YAML config file (see configs/)")
        parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                            help="override one config field, e.g. --set optim.lr=1e-3 (repeatable)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, Ray Data's INFO lines included")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="live progress of each pass (default: on in a terminal and in `ray job submit` logs)")


def run(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
        argv: Sequence[str] | None = None) -> int:
    """Parse, run ``main``, and turn expected failures into one line and exit code 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from core.runtime import set_output

    set_output(progress=getattr(args, "progress", None), verbose=getattr(args, "verbose", False))
    try:
        return int(main(args) or 0)
    except (ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


def check_out_dir(out: str) -> Path:
    """``--out`` must be a directory or not exist yet; never a file. A URI's store is asked up
    front, so a missing bucket, missing credentials or an unreachable endpoint fail here, before
    any work, in one line naming the URI."""
    from core.storage import is_uri, resolve

    if is_uri(out):
        import pyarrow.fs as pafs
        from pyarrow import ArrowException

        try:
            fs, path, _ = resolve(out)
            bucket = path.split("/", 1)[0]
            if not isinstance(fs, pafs.LocalFileSystem) and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise UsageError(f"--out {out}: bucket {bucket} does not exist (create it, or fix the URI)")
            if fs.get_file_info(path).type == pafs.FileType.File:
                raise UsageError(f"--out {out} is a file, expected a directory")
        except (OSError, ArrowException) as e:
            raise UsageError(f"--out {out}: {str(e).splitlines()[0]}") from None
        return Path(out)
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise UsageError(f"--out {out} is a file, expected a directory")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: mm {" + ",".join(COMMANDS) + "} ...\n\n"
              "Curate image-text and video-text corpora and train vision-language models on Ray.\n"
              "Run `mm CMD --help` for a command's options.")
        return 0 if argv else EXIT_USAGE
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"error: unknown command {cmd!r}; valid choices: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    module = importlib.import_module(f"jobs.{cmd}")
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
