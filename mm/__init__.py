"""The model library: towers, objectives, the training loop, checkpoints.

    import mm
    model = mm.load("runs/demo")     # a run dir, its model/, or a URI (s3://...); eval mode, no Ray
    image = model.encode_image(model.preprocess(pil_image))           # (1, D)
    text = model.encode_text(**model.tokenize(["a red circle"]))      # (1, D)
    captions = model.generate([pil_image], max_tokens=20, num_beams=3)  # a run with a caption decoder

``mm.load`` is ``mm.pretrained.load`` (the transform and tokenizer it attaches are described
there). Submodules: config, models, losses, masking, objectives, data, optim, checkpoint, train,
evaluate, export, pretrained; captioning: generate (greedy/beam search), caption (the fine-tune
and evaluation task), caption_metrics (Bleu/ROUGE_L/CIDEr).
"""

from __future__ import annotations


def load(path, cache_dir=None):
    """A saved model in eval mode with ``preprocess`` and ``tokenize`` (see ``mm.pretrained``)."""
    from mm.pretrained import load as load_pretrained

    return load_pretrained(path, cache_dir)


__all__ = ["load"]
