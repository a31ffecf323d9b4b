"""Checkpoints as safetensors + JSON only, written atomically; loading refuses anything else.

Exported model (DESIGN.md "Runs"):

    save_model(model, cfg, out_dir, tokenizer_dir)  # model.safetensors, config.json, tokenizer/
    model, cfg = load_model(path)                   # path: a model dir or a run dir holding model/

``config.json`` starts with ``format`` (mm-vlmodel/1), ``library`` (mm) and a ``model_type``
transformers refuses with a message naming it (``MARKER``); a user loads the dir with
``mm.load`` (mm/pretrained.py), or exports it with ``mm export`` (mm/export.py).

Training state (one directory per step checkpoint, handed to Ray Train):

    save_train_state(dir, model_state, optim_state, state)   # state.safetensors, optim.safetensors,
    model_state, optim_state, state = load_train_state(dir)  # train_state.json
    latest_complete_checkpoint(run + "/ray")                  # (step, dir) a rerun resumes from

Objective heads are keyed by objective name (``objectives.itm.head.fc.weight``, see
``mm.objectives.ObjectiveSet``); a checkpoint from before, which keyed them by position
(``objectives.3.head...``), is refused with one line (``check_named_objectives``).

``optim_state`` is torch's optimizer state dict keyed by parameter name (as produced by
``torch.distributed.checkpoint.state_dict.get_state_dict`` with ``full_state_dict``): tensors go
to safetensors, the param groups to JSON. Nothing is ever unpickled. Tested in
tests/test_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from core.storage import exists, is_uri, join, local_dir
from mm.config import ModelConfig, from_json, to_json

FORMAT = "mm-vlmodel/1"
# config.json sits beside model.safetensors as in a transformers model directory, but is not one:
# ``model_type`` makes transformers' Auto* loaders refuse it ("model type `mm-vlmodel` ... does not
# recognize this architecture") instead of guessing a class from the path (a dir named
# "bert_run/model" loaded as a BertConfig with random weights), and the note says what to do.
MARKER = {"format": FORMAT, "library": "mm", "model_type": "mm-vlmodel",
          "note": "an mm model, not a transformers one: load it with mm.load(path); "
                  "`mm export --model RUN --to hf|openclip` writes timm/transformers/OpenCLIP models"}


class CheckpointError(ValueError):
    """A checkpoint that is missing, not safetensors + JSON, or not ours."""


# -- atomic writes -----------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def local_model_dir(src: str | os.PathLike) -> str:
    """A run or model dir as a local directory: ``src`` itself when local; at a URI, its model/ only
    (not the checkpoints) fetched into core.storage's per-node cache, so each node that loads it
    (a Ray Train worker, a Ray Data actor) fetches its own copy and no shared filesystem is needed."""
    src = str(src)
    if not is_uri(src):
        return src
    return local_dir(join(src, "model")) if exists(join(src, "model", "config.json")) else local_dir(src)


def write_json(path: Path, data: Any) -> None:
    _atomic_write(Path(path), lambda t: Path(t).write_text(json.dumps(data, indent=2, sort_keys=True)))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses tensors sharing storage (transformers ties the MLM head's decoder.bias
    # to its bias): later aliases are written as copies; loading re-ties them by name.
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        out[k] = v.clone() if ptr in seen else v
        if ptr is not None:
            seen.add(ptr)
    tensors = out
    _atomic_write(Path(path), lambda t: save_file(tensors, t, metadata=metadata))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a safetensors file ({e}); refusing to load it "
                              "(checkpoints are never unpickled)") from None


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


# -- exported model ----------------------------------------------------------------------------
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def save_model(model: torch.nn.Module, cfg: ModelConfig, out_dir: str | os.PathLike,
               tokenizer_dir: str | os.PathLike | None, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``out_dir/model.safetensors``, ``out_dir/config.json`` and ``out_dir/tokenizer/``.

    ``state`` overrides ``model.state_dict()`` (e.g. a full state dict gathered from FSDP).
    """
    from mm.models import VLModel

    out = Path(out_dir)
    bare = unwrap(model)
    if not isinstance(bare, VLModel):
        raise TypeError(f"save_model expects a VLModel, got {type(bare).__name__}")
    write_tensors(out / "model.safetensors", state if state is not None else bare.state_dict(),
                  metadata={"format": FORMAT})
    meta = {**MARKER, "vocab_size": bare.vocab_size, "model": to_json(cfg)}
    if cfg.text.pretrained_path:
        # The pretrained tower's own architecture (width, positions, norms): TextConfig's fields do
        # not describe it, and its original directory may not exist where the model is loaded.
        meta["text_hf_config"] = bare.text.bert.config.to_dict()
    write_json(out / "config.json", meta)
    if tokenizer_dir is not None:
        tmp = out / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(tokenizer_dir, tmp)
        shutil.rmtree(out / "tokenizer", ignore_errors=True)
        os.replace(tmp, out / "tokenizer")
    return out


def model_dir(path: str | os.PathLike) -> Path:
    """A model dir, or a run dir's ``model/``."""
    p = Path(path)
    if (p / "model" / "config.json").is_file():
        return p / "model"
    if (p / "config.json").is_file():
        return p
    raise CheckpointError(f"{path} holds no model (expected config.json + model.safetensors, or model/)")


def load_model(path: str | os.PathLike) -> tuple[torch.nn.Module, ModelConfig]:
    """Rebuild the model from a model dir or run dir; returns (model in train mode, its config)."""
    from mm.models import VLModel

    d = model_dir(path)
    meta = read_json(d / "config.json")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{d / 'config.json'} is not an {FORMAT} config")
    cfg = from_json(meta["model"])
    state = read_tensors(d / "model.safetensors")
    # Build without pretrained files: the checkpoint holds every weight, and locking is a
    # training-time choice.
    cfg_build = _without_pretrained(cfg)
    text_hf = meta.get("text_hf_config")
    if cfg.text.pretrained_path and text_hf is None:
        raise CheckpointError(f"{d / 'config.json'} has a pretrained text tower but no text_hf_config")
    model = VLModel(cfg_build, int(meta["vocab_size"]), text_hf)
    for k in ("logit_scale", "logit_bias"):  # saved as scalars before they became shape (1,)
        if k in state and state[k].ndim == 0:
            state[k] = state[k].reshape(1)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{d} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model, cfg


def saved_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ``ModelConfig`` saved with a model dir or run dir (its config.json only, no weights)."""
    d = model_dir(path)
    meta = read_json(d / "config.json")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{d / 'config.json'} is not an {FORMAT} config")
    return from_json(meta["model"])


def changed_model_keys(saved: ModelConfig, wanted: ModelConfig, keys) -> list[tuple[str, Any, Any]]:
    """Of the ``model.*`` keys a user set (dotted, without ``model.``: ``vision.width``), those
    whose value in ``wanted`` differs from the saved run's ``saved``: ``[(key, wanted, saved)]``,
    in ``keys`` order. A run started from another (``--init``) keeps that run's architecture, so
    the caller refuses (or applies, where it can) each one instead of dropping it silently."""
    import dataclasses

    out = []
    for key in dict.fromkeys(keys):
        a, b = wanted, saved
        for part in key.split("."):
            a, b = getattr(a, part), getattr(b, part)
        if dataclasses.is_dataclass(a):  # a whole section: name its first differing field
            out += changed_model_keys(saved, wanted, [f"{key}.{f.name}" for f in dataclasses.fields(a)])
        elif a != b:
            out.append((key, a, b))
    return out


def _without_pretrained(cfg: ModelConfig) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, pretrained_path=None),
                               text=dataclasses.replace(cfg.text, pretrained_path=None))


# -- training state ----------------------------------------------------------------------------
def flatten_optim(optim_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pname, st in optim_state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pname}::{k}"] = v
            else:
                scalars.setdefault(pname, {})[k] = v
    return tensors, {"param_groups": optim_state["param_groups"], "scalars": scalars}


def unflatten_optim(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for key, v in tensors.items():
        pname, k = key.rsplit("::", 1)
        state.setdefault(pname, {})[k] = v
    for pname, st in meta.get("scalars", {}).items():
        state.setdefault(pname, {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_train_state(directory: str | os.PathLike, model_state: dict[str, torch.Tensor], optim_state: dict,
                     state: dict) -> Path:
    d = Path(directory)
    tensors, optim_meta = flatten_optim(optim_state)
    write_tensors(d / "state.safetensors", model_state)
    write_tensors(d / "optim.safetensors", tensors)
    # JSON last: a directory without train_state.json is an incomplete checkpoint. It also holds
    # the tensor files' sizes: Ray Train copies the directory to storage file by file, in no set
    # order, so a copy cut short (a killed driver) can hold the JSON beside a torn tensor file.
    files = {name: (d / name).stat().st_size for name in TRAIN_STATE_FILES}
    write_json(d / "train_state.json", {"format": FORMAT, **state, "optimizer": optim_meta, "files": files})
    return d


TRAIN_STATE_FILES = ("state.safetensors", "optim.safetensors")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def complete_train_state(directory: str) -> dict | None:
    """The ``train_state.json`` of the step checkpoint at ``directory`` (a path or a URI) if the
    checkpoint is complete: the JSON parses, is ours, and every tensor file it lists is there with
    the size it had when written. None otherwise. Reads the JSON and two file sizes, no tensors."""
    from core.storage import join, read_json, resolve

    state = read_json(join(directory, "train_state.json"))
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("step"), int):
        return None
    fs, path, _ = resolve(directory)
    sizes = state.get("files") or dict.fromkeys(TRAIN_STATE_FILES)  # before sizes were recorded: present
    for name, size in sizes.items():
        info = fs.get_file_info(f"{path.rstrip('/')}/{name}")
        if info.type.name != "File" or (size is not None and info.size != size):
            return None
    return state


def step_checkpoints(root: str) -> list[tuple[int, str]]:
    """The ``step_NNNNNNNN`` directories under ``root`` (a run's Ray Train storage, path or URI),
    complete or not, as ``[(step, path or URI)]`` by step."""
    import pyarrow.fs as pafs

    from core.storage import join, resolve

    fs, path, _ = resolve(root)
    out = []
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        m = _STEP_DIR.match(info.base_name)
        if info.type == pafs.FileType.Directory and m:
            out.append((int(m.group(1)), join(root, info.base_name)))
    return sorted(out)


def latest_complete_checkpoint(root: str) -> tuple[int, str] | None:
    """``(step, path)`` of the newest complete step checkpoint under ``root``, or None."""
    for step, d in reversed(step_checkpoints(root)):
        state = complete_train_state(d)
        if state is not None and state["step"] == step:
            return step, d
    return None


def restore_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                  optim_state: dict) -> None:
    """Load full (unsharded) states into a plain, DDP or FSDP2 module and its optimizer. Model
    keys must match exactly; a parameter that never had a gradient has no optimizer state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(module, model_state, options=StateDictOptions(full_state_dict=True, strict=True))
    set_optimizer_state_dict(module, optimizer, optim_state,
                             options=StateDictOptions(full_state_dict=True, strict=False))


_POSITIONAL_HEAD = re.compile(r"^objectives\.\d+\.")


def check_named_objectives(keys, where: str | os.PathLike) -> None:
    """Refuse a training state whose objective heads are keyed by position (``objectives.3.head.*``,
    written before heads were keyed by name): their names cannot be told from the keys alone."""
    old = next((k for k in keys if _POSITIONAL_HEAD.match(k)), None)
    if old is not None:
        raise CheckpointError(f"{where} keys its objective heads by position ({old}), as checkpoints did before "
                              "heads were saved by objective name; this version cannot load it: train the run again")


def load_train_state(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict]:
    d = Path(directory)
    state = read_json(d / "train_state.json")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{d / 'train_state.json'} is not an {FORMAT} training state")
    model_state = read_tensors(d / "state.safetensors")
    check_named_objectives(model_state, d)
    optim_state = unflatten_optim(read_tensors(d / "optim.safetensors"), state.pop("optimizer"))
    state.pop("files", None)
    return model_state, optim_state, state


__all__ = ["FORMAT", "MARKER", "CheckpointError", "save_model", "load_model", "model_dir", "saved_model_config",
           "changed_model_keys", "unwrap", "save_train_state", "load_train_state", "check_named_objectives",
           "restore_state", "complete_train_state", "step_checkpoints", "latest_complete_checkpoint", "write_json",
           "read_json", "write_tensors", "read_tensors"]
