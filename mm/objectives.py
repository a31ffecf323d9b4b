"""Training objectives: each is a module with ``step(model, batch) -> (loss, metrics)``; weights
come from config and a weight of 0 leaves the objective out.

* ``Contrastive`` (ITC/VTC): CLIP or SigLIP loss, by ``model.cfg.loss``, over gathered features.
* ``MaskedLanguage`` (MLM): BERT masking, predicted by the text tower alone or, with
  ``conditioned``, by the fusion encoder attending to the image/video (FLAVA's MMM, ALBEF's MLM).
* ``MaskedVision`` (MIM/MVM): MAE with a light decoder; random patch masking for images, tube
  masking for video; per-patch-normalised pixel targets.
* ``Matching`` (ITM/VTM): fused [CLS] -> match/no-match, with a hard negative image per text and
  a hard negative text per image sampled from the contrastive similarities (ALBEF).
* ``Captioning`` (CoCa's captioning loss, BLIP's LM loss): the caption decoder
  (``model.decoder``) predicts each next caption token from the vision tokens; padding (and
  BLIP's prompt prefix) is not predicted. CoCa = contrastive + captioning (OpenCLIP weights them
  1 and 2).

``ObjectiveSet`` is the one module the loop calls (and DDP wraps): one forward per micro-batch
runs every objective on the same batch, sharing the towers' outputs through a per-batch cache.
Callers add objectives (fine-tuning's classifier, ...) by passing factories
``(model, tokens) -> Objective`` to ``build_objectives``.

A batch is a dict of tensors: ``pixels`` (B,3,H,W) or ``frames`` (B,T,3,H,W), ``input_ids`` and
``attention_mask`` (B,L); or, with ``train.frozen_features``, the locked towers' pooled
``vision_feature`` (B,Wv) and ``text_feature`` (B,Wt), which only the contrastive objective
uses. Tested in tests/test_objectives.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mm import losses
from mm.data import TokenInfo
from mm.masking import mask_tokens, random_patch_mask, tube_mask
from mm.models import VLModel
from mm.models.heads import ITMHead, MaskedPatchDecoder, build_mlm_head


@dataclass(frozen=True)
class ContrastiveConfig:
    weight: float = 1.0
    # OpenCLIP's --local-loss: each rank scores its own rows against the gathered columns.
    local_loss: bool = True


@dataclass(frozen=True)
class MLMConfig:
    weight: float = 0.0
    mask_prob: float = 0.15


@dataclass(frozen=True)
class MIMConfig:
    weight: float = 0.0
    image_mask_ratio: float = 0.75  # MAE
    video_mask_ratio: float = 0.9  # VideoMAE tube masking
    decoder_width: int = 64
    decoder_depth: int = 1
    decoder_heads: int = 4
    norm_pix: bool = True


@dataclass(frozen=True)
class ITMConfig:
    weight: float = 0.0
    hard_negatives: bool = True  # else uniform random negatives
    # With hard_negatives: the share of negatives drawn by similarity (ALBEF: 1.0); the rest are
    # drawn uniformly. Early in training, or on corpora whose captions repeat the same content
    # in other words, the most similar pairs are often true matches, and with 1.0 the ITM loss
    # stayed at its prior (0.637) for 300 steps on the demo corpus; uniform ones teach it first.
    hard_fraction: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.hard_fraction <= 1.0:
            raise ValueError("hard_fraction must be in [0, 1]")


@dataclass(frozen=True)
class CaptioningConfig:
    weight: float = 0.0  # CoCa (OpenCLIP coca_*): caption_loss_weight 2.0 beside contrastive 1.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")


@dataclass(frozen=True)
class ObjectivesConfig:
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    mlm: MLMConfig = field(default_factory=MLMConfig)  # text tower alone
    fusion_mlm: MLMConfig = field(default_factory=MLMConfig)  # image/video-conditioned
    mim: MIMConfig = field(default_factory=MIMConfig)
    itm: ITMConfig = field(default_factory=ITMConfig)
    captioning: CaptioningConfig = field(default_factory=CaptioningConfig)


# -- shared per-batch features ------------------------------------------------------------------
def vision_input(batch: dict) -> torch.Tensor:
    """(B, T, 3, H, W): videos as they are, images as one-frame videos."""
    return batch["frames"] if "frames" in batch else batch["pixels"][:, None]


def vision_tokens(model: VLModel, batch: dict) -> torch.Tensor:
    """The unmasked vision tokens (B, 1 + T*N, Wv), computed once per batch (shared with
    ``paired_features``); objectives that need no text features (captioning) call this alone."""
    cache = batch.setdefault("_cache", {})
    if "pair" in cache and "vision_tokens" in cache["pair"]:
        return cache["pair"]["vision_tokens"]
    if "vision_tokens" not in cache:
        if "vision_feature" in batch:
            raise ValueError("this objective needs the vision tower's tokens; train.frozen_features only "
                             "keeps pooled features (turn it off)")
        cache["vision_tokens"] = model.vision_tokens(vision_input(batch))
    return cache["vision_tokens"]


def paired_features(model: VLModel, batch: dict) -> dict[str, torch.Tensor]:
    """Vision and text tokens and embeddings of the unmasked pair, computed once per batch."""
    cache = batch.setdefault("_cache", {})
    if "pair" not in cache and "vision_feature" in batch:  # train.frozen_features: the towers' pooled output
        cache["pair"] = {"vision": model.embed_vision_features(batch["vision_feature"]),
                         "text": model.embed_text_features(batch["text_feature"])}
    if "pair" not in cache:
        v = vision_tokens(model, batch)
        t = model.text_tokens(batch["input_ids"], batch["attention_mask"])
        cache["pair"] = {"vision_tokens": v, "text_tokens": t, "vision": model.project_vision(v),
                         "text": model.project_text(t, batch["attention_mask"])}
    return cache["pair"]


class Objective(nn.Module):
    """Base: ``name`` keys its metrics (``loss/<name>``), ``weight`` scales its loss."""

    name = "objective"

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def step(self, model: VLModel, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


class Contrastive(Objective):
    name = "contrastive"

    def __init__(self, cfg: ContrastiveConfig) -> None:
        super().__init__(cfg.weight)
        self.local_loss = cfg.local_loss

    def step(self, model, batch):
        f = paired_features(model, batch)
        scale, bias = model.scale()
        if model.cfg.loss == "siglip":
            loss, logits = losses.siglip_loss(f["vision"], f["text"], scale, bias)
        else:
            loss, logits = losses.clip_loss(f["vision"], f["text"], scale, local_loss=self.local_loss)
        rank, _ = losses.world()
        b = logits.shape[0]
        local = logits[:, rank * b:(rank + 1) * b].detach()  # (B, B) this rank's block
        batch["_cache"]["similarity"] = local
        target = torch.arange(b, device=local.device)
        acc = (logits.detach().argmax(1) == target + rank * b).float().mean()
        return loss, {"logit_scale": scale.detach(), "acc": acc}


class MaskedLanguage(Objective):
    def __init__(self, cfg: MLMConfig, model: VLModel, tokens: TokenInfo, conditioned: bool) -> None:
        super().__init__(cfg.weight)
        if conditioned and model.fusion is None:
            raise ValueError("objectives.fusion_mlm needs a fusion encoder: set model.fusion.depth > 0")
        self.name = "fusion_mlm" if conditioned else "mlm"
        self.conditioned = conditioned
        self.mask_prob = cfg.mask_prob
        self.tokens = tokens
        self.head = build_mlm_head(model.text.width, model.vocab_size)

    def step(self, model, batch):
        ids, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], mask_id=self.tokens.mask_id,
                                  vocab_size=self.tokens.vocab_size, special_ids=self.tokens.special_ids,
                                  prob=self.mask_prob)
        h = model.text_tokens(ids, batch["attention_mask"])
        if self.conditioned:
            h = model.fuse(h, batch["attention_mask"], paired_features(model, batch)["vision_tokens"])
        logits = self.head(h)  # (B, L, V)
        loss = losses.mlm_loss(logits, labels)
        picked = labels != -100
        acc = (logits.detach().argmax(-1)[picked] == labels[picked]).float().mean()
        return loss, {"acc": acc}


class MaskedVision(Objective):
    name = "mim"

    def __init__(self, cfg: MIMConfig, model: VLModel) -> None:
        super().__init__(cfg.weight)
        self.cfg = cfg
        v = model.vision
        if not v.supports_masking:
            raise ValueError("objectives.mim needs a ViT vision tower (a CNN tower cannot drop patches)")
        self.decoder = MaskedPatchDecoder(v.width, cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads,
                                          v.num_patches, v.cfg.max_frames, v.patch_px ** 2 * 3)

    def step(self, model, batch):
        frames = vision_input(batch)  # (B, T, 3, H, W)
        b, t = frames.shape[:2]
        n = model.vision.num_patches
        if t == 1:
            keep_idx, mask = random_patch_mask(b, n, self.cfg.image_mask_ratio, device=frames.device)
        else:
            keep_idx, mask = tube_mask(b, t, n, self.cfg.video_mask_ratio, device=frames.device)
        tokens = model.vision_tokens(frames, keep_idx)  # (B, 1 + T*K, Wv): visible patches only
        pred = self.decoder(tokens, keep_idx, t)  # (B, T*N, p*p*3)
        loss = losses.masked_patch_loss(pred, model.vision.patchify(frames), mask, self.cfg.norm_pix)
        return loss, {}


def sample_negatives(similarity: torch.Tensor, same: torch.Tensor, hard: bool,
                     hard_fraction: float = 1.0) -> torch.Tensor:
    """For each row i of a (B, B) similarity, sample a column j != i, with probability
    softmax(similarity[i]) when ``hard`` (ALBEF) else uniformly, or from the mixture
    ``hard_fraction * softmax + (1 - hard_fraction) * uniform``; ``same`` (B, B) marks pairs that
    are not negatives (duplicate captions), excluded unless a row has nothing else."""
    b = similarity.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=similarity.device)
    weights = torch.full_like(similarity, 1.0 / max(b - 1, 1), dtype=torch.float)
    if hard:
        weights = hard_fraction * similarity.float().masked_fill(eye, float("-inf")).softmax(1) + (
            1.0 - hard_fraction) * weights
    weights = weights.masked_fill(eye | same, 0.0) + 1e-12
    weights = weights.masked_fill(eye, 0.0)
    return torch.multinomial(weights, 1).squeeze(1)


class Matching(Objective):
    name = "itm"

    def __init__(self, cfg: ITMConfig, model: VLModel) -> None:
        super().__init__(cfg.weight)
        if model.fusion is None:
            raise ValueError("objectives.itm needs a fusion encoder: set model.fusion.depth > 0")
        self.hard = cfg.hard_negatives
        self.hard_fraction = cfg.hard_fraction
        self.head = ITMHead(model.text.width)

    def step(self, model, batch):
        f = paired_features(model, batch)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        b = ids.shape[0]
        if b < 2:
            raise ValueError("ITM needs at least 2 samples per batch for negatives")
        sim = batch["_cache"].get("similarity")
        if sim is None:
            sim = (f["text"] @ f["vision"].T).detach().T
        same = (ids[:, None, :] == ids[None, :, :]).all(-1) & (mask[:, None, :] == mask[None, :, :]).all(-1)
        with torch.no_grad():
            neg_image = sample_negatives(sim.T, same, self.hard, self.hard_fraction)  # per text, an image
            neg_text = sample_negatives(sim, same, self.hard, self.hard_fraction)  # per image, a text
        v, t = f["vision_tokens"], f["text_tokens"]
        texts = torch.cat([t, t, t[neg_text]])
        masks = torch.cat([mask, mask, mask[neg_text]])
        images = torch.cat([v, v[neg_image], v])
        fused = model.fuse(texts, masks, images)[:, 0]  # (3B, Wt)
        logits = self.head(fused)
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
        acc = (logits.detach().argmax(1) == labels).float().mean()
        return losses.itm_loss(logits, labels), {"acc": acc}


def caption_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_ids: Sequence[int] = (),
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corpus captions ``[CLS] words [SEP] [PAD]...`` -> decoder inputs, their mask and the labels
    (B, L'): inputs drop the last position, labels are the ids shifted left with -100 on padding.
    ``prompt_ids`` (BLIP's prompt, without specials) are inserted after [CLS]: fed to the decoder,
    labelled -100 (not predicted)."""
    ids, mask = input_ids, attention_mask
    if len(prompt_ids):
        b = ids.shape[0]
        prompt = torch.as_tensor(list(prompt_ids), dtype=ids.dtype, device=ids.device).expand(b, -1)
        ids = torch.cat([ids[:, :1], prompt, ids[:, 1:]], 1)
        mask = torch.cat([mask[:, :1], torch.ones_like(prompt, dtype=mask.dtype), mask[:, 1:]], 1)
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    if len(prompt_ids):
        labels[:, :len(prompt_ids)] = -100
    return ids[:, :-1], mask[:, :-1], labels


class Captioning(Objective):
    """Next-token cross-entropy of the caption decoder conditioned on the vision tokens (CoCa's
    captioning loss, BLIP's LM loss), mean over the predicted tokens of the batch.

    ``prompt_ids``: the tokens of ``model.decoder.prompt`` (the caller tokenises it with the
    corpus tokenizer: ``mm.caption.captioning_factory``); they are fed after [CLS] and masked out
    of the loss."""

    name = "captioning"

    def __init__(self, cfg: CaptioningConfig, model: VLModel, prompt_ids: Sequence[int] = ()) -> None:
        super().__init__(cfg.weight)
        if model.decoder is None:
            raise ValueError("objectives.captioning needs a caption decoder: set model.decoder.layers > 0")
        if model.cfg.decoder.prompt and not len(prompt_ids):
            raise ValueError(f"model.decoder.prompt {model.cfg.decoder.prompt!r} must be tokenised by the corpus "
                             "tokenizer: build this objective with mm.caption.captioning_factory")
        need = model.cfg.text.max_tokens - 1 + len(prompt_ids)
        if need > model.cfg.decoder.max_tokens:
            raise ValueError(f"captions of text.max_tokens {model.cfg.text.max_tokens} (plus a {len(prompt_ids)}-token "
                             f"prompt) need decoder.max_tokens >= {need}, got {model.cfg.decoder.max_tokens}")
        self.label_smoothing = cfg.label_smoothing
        self.prompt_ids = tuple(int(i) for i in prompt_ids)

    def step(self, model, batch):
        ids, mask, labels = caption_targets(batch["input_ids"], batch["attention_mask"], self.prompt_ids)
        context = model.decoder.context(vision_tokens(model, batch))
        logits = model.decoder(context, ids, mask)  # (B, L', V)
        picked = labels != -100
        if picked.any():
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                   label_smoothing=self.label_smoothing)
        else:  # keeps the graph (and DDP's reducer) intact
            loss = logits.sum() * 0.0
        acc = (logits.detach().argmax(-1)[picked] == labels[picked]).float().mean()
        return loss, {"acc": acc}


ObjectiveFactory = Callable[[VLModel, TokenInfo], Objective]


def build_objectives(cfg: ObjectivesConfig, model: VLModel, tokens: TokenInfo,
                     extra: Sequence[ObjectiveFactory] = ()) -> list[Objective]:
    """The configured objectives with weight > 0 (contrastive first: ITM reuses its
    similarities), then ``extra`` ones built by the caller's factories."""
    out: list[Objective] = []
    if cfg.contrastive.weight > 0:
        out.append(Contrastive(cfg.contrastive))
    if cfg.mlm.weight > 0:
        out.append(MaskedLanguage(cfg.mlm, model, tokens, conditioned=False))
    if cfg.fusion_mlm.weight > 0:
        out.append(MaskedLanguage(cfg.fusion_mlm, model, tokens, conditioned=True))
    if cfg.mim.weight > 0:
        out.append(MaskedVision(cfg.mim, model))
    if cfg.itm.weight > 0:
        out.append(Matching(cfg.itm, model))
    if cfg.captioning.weight > 0:
        out.append(Captioning(cfg.captioning, model))
    out.extend(factory(model, tokens) for factory in extra)
    if not out:
        raise ValueError("no objective has a weight > 0")
    return out


class ObjectiveSet(nn.Module):
    """The model plus its objectives' heads: ``forward(batch) -> (weighted loss, metrics)``.

    The objectives are keyed by name, in order, so their heads are saved and loaded by name:
    ``objectives.<name>.*`` (``objectives.itm.head.fc.weight``), whatever else was trained."""

    def __init__(self, model: VLModel, objectives: Sequence[Objective]) -> None:
        super().__init__()
        self.model = model
        names = [o.name for o in objectives]
        if len(set(names)) != len(names) or any("." in n for n in names):
            raise ValueError(f"objective names must be distinct and free of '.': {names}")
        self.objectives = nn.ModuleDict({o.name: o for o in objectives})

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = {**batch, "_cache": {}}
        total = torch.zeros((), device=next(v for v in batch.values() if isinstance(v, torch.Tensor)).device)
        metrics: dict[str, torch.Tensor] = {}
        for obj in self.objectives.values():
            loss, extra = obj.step(self.model, batch)
            total = total + obj.weight * loss.float()
            metrics[f"loss/{obj.name}"] = loss.detach().float()
            metrics.update({f"{obj.name}/{k}": v.detach().float() for k, v in extra.items()})
        return total, metrics


__all__ = ["ContrastiveConfig", "MLMConfig", "MIMConfig", "ITMConfig", "CaptioningConfig", "ObjectivesConfig",
           "Objective", "Contrastive", "MaskedLanguage", "MaskedVision", "Matching", "Captioning", "ObjectiveSet",
           "ObjectiveFactory", "build_objectives", "sample_negatives", "vision_input", "vision_tokens",
           "paired_features", "caption_targets"]
