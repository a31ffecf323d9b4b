"""The model library: towers, objectives, the training loop, checkpoints.

    import mm
    model = mm.load("runs/demo")          # a run dir or its model/; eval mode, no Ray needed

Submodules: config, models, losses, masking, objectives, data, optim, checkpoint, train.
"""

from __future__ import annotations


def load(path: str):
    """Load a saved model (safetensors + JSON only) in eval mode."""
    from mm.checkpoint import load_model

    model, _ = load_model(path)
    return model.eval()


__all__ = ["load"]
