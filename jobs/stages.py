"""What the chaining jobs share about a stage: its config reference, its loading, its failure.

    curate: {config: configs/curate.yaml, overrides: ["images.image_px=64"]}   # a StageConfig in YAML
    cfg = load_stage_config("curate", CurateConfig, stage)   # the stage's own typed config object

A chain (``mm pipeline``, ``mm refresh``) references each stage's own YAML plus overrides and never
copies their fields. ``load_stage_config`` loads that file onto the stage's config class; a
missing file is a ``UsageError`` and a bad key or value a ``ConfigError``, each naming the stage.
``StageFailed`` is a stage that did not complete: the chain stops, keeps what is done, and a rerun
resumes at that stage; ``stage_errors`` turns what a stage refuses (a bad config, a corpus, model
or tokenizer it cannot use: ValueError, FileNotFoundError) into one.

Tested through tests/test_pipeline.py and tests/test_refresh.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import ConfigError, load_config
from jobs.cli import UsageError


@dataclass(frozen=True)
class StageConfig:
    config: str | None = None          # the stage's own YAML (configs/curate.yaml, ...); None: defaults
    overrides: tuple[str, ...] = ()    # KEY=VALUE on top of it, as --set


class StageFailed(RuntimeError):
    """A stage of a chain did not complete; the message says why in one line."""


def load_stage_config(name: str, cls: type, stage: StageConfig, extra: Sequence[str] = ()) -> Any:
    """``cls`` from the stage's YAML, its overrides and ``extra`` overrides (applied last)."""
    if stage.config and not Path(stage.config).is_file():
        raise UsageError(f"{name}.config {stage.config} does not exist")
    try:
        return load_config(cls, stage.config, [*stage.overrides, *extra])
    except ConfigError as e:
        raise ConfigError(f"{name} stage: {e}") from None


@contextlib.contextmanager
def stage_errors(what: str = "") -> Iterator[None]:
    """Run a stage's call; a ValueError or FileNotFoundError it raises becomes ``StageFailed``."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise StageFailed(f"{what}: {e}" if what else str(e)) from e


__all__ = ["StageConfig", "StageFailed", "load_stage_config", "stage_errors"]
