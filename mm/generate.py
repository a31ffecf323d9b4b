"""Caption generation: greedy and beam search over the caption decoder, batched, without Ray.

    model = mm.load("runs/coca")
    model.generate([img_a, img_b], max_tokens=20)              # greedy -> ["a red circle", ...]
    model.generate(clips, max_tokens=20, num_beams=3)          # beam search; clips: lists of frames

The search is transformers' own ``GenerationMixin.generate`` driving the decoder's
``BertLMHeadModel`` (mm/models/decoder.py): ``encoder_hidden_states`` (the vision context) is a
model keyword that transformers expands per beam and passes to every step, so no search is
hand-written here. The key/value cache is off (``use_cache=False``): transformers 4.57's cached
BertLMHeadModel steps drift from its own forward pass (on the demo, greedy wrote "a little, a
little )" where the forward's argmax path is "a photo of a little yellow star shape at the
bottom"; tests/test_caption.py has the regression), and re-running a few-layer decoder over at
most ``max_tokens`` tokens costs little. Greedy is
``num_beams=1``; beam search ranks finished hypotheses by sum of log-probabilities / length **
``length_penalty`` (transformers' definition; 1.0 by default, 0 ranks by likelihood alone).

A caption starts with [CLS] (then ``model.decoder.prompt``'s tokens, BLIP's prefix) and ends at
[SEP] or after ``max_tokens`` new tokens; the prompt, the specials and the padding are stripped
from the returned ids and text. Tested in tests/test_caption.py (greedy against beam search on
a toy model whose greedy path is myopic).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def generate_ids(lm, context: torch.Tensor, *, bos_id: int, eos_id: int, pad_id: int, max_tokens: int = 20,
                 num_beams: int = 1, prompt_ids: Sequence[int] = (), length_penalty: float = 1.0,
                 min_tokens: int = 0) -> list[list[int]]:
    """Search ``lm`` (a transformers causal LM with cross-attention) conditioned on ``context``
    (B, M, W) -> per row the generated token ids, without the start/prompt, the end token and
    padding."""
    from transformers import GenerationConfig

    if max_tokens < 1 or num_beams < 1:
        raise ValueError("max_tokens and num_beams must be >= 1")
    b = context.shape[0]
    prefix = torch.tensor([[bos_id, *prompt_ids]], dtype=torch.long, device=context.device).expand(b, -1)
    beam = {"num_beams": num_beams, "length_penalty": length_penalty} if num_beams > 1 else {}
    gen = GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=min_tokens, do_sample=False, use_cache=False,
                           bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, **beam)
    with torch.inference_mode():
        out = lm.generate(input_ids=prefix, attention_mask=torch.ones_like(prefix), encoder_hidden_states=context,
                          generation_config=gen)
    rows = []
    for row in out[:, prefix.shape[1]:].tolist():
        if eos_id in row:
            row = row[:row.index(eos_id)]
        rows.append([t for t in row if t != pad_id])
    return rows


def sequence_logprob(lm, context: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum of log p(ids[:, i] | ids[:, :i], context) over i >= 1: (B,). For comparing searches."""
    with torch.inference_mode():
        logits = lm(input_ids=ids[:, :-1], encoder_hidden_states=context, use_cache=False).logits
        logp = logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    return logp.sum(1)


def _pixels(model, images_or_videos) -> torch.Tensor:
    if isinstance(images_or_videos, torch.Tensor):
        x = images_or_videos
        if x.ndim not in (4, 5):
            raise ValueError(f"expected (B, 3, H, W) images or (B, T, 3, H, W) videos, got shape {tuple(x.shape)}")
        return x
    preprocess = getattr(model, "preprocess", None)
    if preprocess is None:
        raise ValueError("generate takes tensors here; images, paths and clips need the preprocess "
                         "that mm.load attaches")
    return preprocess(images_or_videos)


def generate(model, images_or_videos, max_tokens: int = 20, num_beams: int = 1, *, length_penalty: float = 1.0,
             min_tokens: int = 0, batch_size: int = 32, tokenizer=None) -> list[str]:
    """Captions, one per image or video (see the module docstring). ``tokenizer``: default the run's
    (``model.tokenize.tokenizer``, attached by ``mm.load``)."""
    if getattr(model, "decoder", None) is None:
        raise ValueError("this model has no caption decoder (model.decoder.layers = 0); train one with the "
                         "captioning objective or `mm finetune --task caption`")
    if tokenizer is None:
        tokenize = getattr(model, "tokenize", None)
        if tokenize is None:
            raise ValueError("generate needs the run's tokenizer: load the model with mm.load, or pass tokenizer=")
        tokenizer = tokenize.tokenizer
    prompt_ids = prompt_token_ids(tokenizer, model.cfg.decoder.prompt)
    limit = model.cfg.decoder.max_tokens - 1 - len(prompt_ids)
    if max_tokens > limit:
        raise ValueError(f"max_tokens {max_tokens} > {limit}, what decoder.max_tokens "
                         f"{model.cfg.decoder.max_tokens} leaves after [CLS] and the prompt")
    x = _pixels(model, images_or_videos)
    ids: list[list[int]] = []
    param = next(model.decoder.parameters())
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start:start + batch_size].to(param.device)
        with torch.inference_mode():
            context = model.decoder.context(model.vision_tokens(chunk))
        ids += generate_ids(model.decoder.lm, context, bos_id=tokenizer.cls_token_id, eos_id=tokenizer.sep_token_id,
                            pad_id=tokenizer.pad_token_id, max_tokens=max_tokens, num_beams=num_beams,
                            prompt_ids=prompt_ids, length_penalty=length_penalty, min_tokens=min_tokens)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def prompt_token_ids(tokenizer, prompt: str) -> tuple[int, ...]:
    """The decoder prompt's tokens, without specials (empty for no prompt)."""
    if not prompt:
        return ()
    return tuple(tokenizer(prompt, add_special_tokens=False)["input_ids"])


__all__ = ["generate", "generate_ids", "sequence_logprob", "prompt_token_ids"]
