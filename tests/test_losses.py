"""Loss functions: values against hand computations, and the distributed variants on a real
2-process gloo group (gathered-with-gradient features give the same loss and gradients as one
process computing the global batch; local loss equals the full loss).

    .venv/bin/pytest tests/test_losses.py -x -q
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mm.losses import clip_loss, itm_loss, masked_patch_loss, mlm_loss, siglip_loss


def _feats(n=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1))


def test_clip_loss_matches_hand_computation_and_perfect_pairs_score_low():
    img, txt = _feats()
    scale = torch.tensor(10.0)
    loss, logits = clip_loss(img, txt, scale)
    ref = scale * img @ txt.T
    labels = torch.arange(8)
    expect = (F.cross_entropy(ref, labels) + F.cross_entropy(ref.T, labels)) / 2
    assert torch.allclose(loss, expect) and logits.shape == (8, 8)
    perfect, _ = clip_loss(img, img, torch.tensor(100.0))
    assert perfect < 0.01 < loss


def test_siglip_loss_counts_every_pair_once_per_image():
    img, txt = _feats(4, 8)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    loss, logits = siglip_loss(img, txt, scale, bias)
    z = scale * img @ txt.T + bias
    signs = 2 * torch.eye(4) - 1
    assert torch.allclose(loss, -F.logsigmoid(signs * z).sum() / 4)
    assert logits.shape == (4, 4)


def test_mlm_loss_ignores_unmasked_and_survives_empty_mask():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), -100)
    labels[0, 2] = 3
    assert torch.allclose(mlm_loss(logits, labels), F.cross_entropy(logits[0, 2][None], torch.tensor([3])))
    empty = mlm_loss(logits, torch.full((2, 5), -100))
    empty.backward()
    assert empty.item() == 0.0 and logits.grad is not None


def test_masked_patch_loss_only_on_hidden_patches_with_normalised_targets():
    target = torch.randn(2, 6, 12) * 5 + 3
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, :3] = True
    t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    pred = t.clone()
    pred[:, 3:] += 100.0  # errors on visible patches do not count
    assert masked_patch_loss(pred, target, mask).item() < 1e-8
    pred[:, :3] += 1.0
    assert masked_patch_loss(pred, target, mask).item() == pytest.approx(1.0, rel=1e-5)


def test_itm_loss_is_cross_entropy():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    labels = torch.tensor([1, 0])
    assert torch.allclose(itm_loss(logits, labels), F.cross_entropy(logits, labels))


# -- two processes, gloo --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, kind: str, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    img, txt = _feats(8, 16)
    img = img[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    txt = txt[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    scale = torch.tensor(10.0)
    if kind == "siglip":
        loss, _ = siglip_loss(img, txt, scale, torch.tensor(-5.0))
    else:
        loss, _ = clip_loss(img, txt, scale, local_loss=kind == "local")
    loss.backward()
    q.put((rank, loss.item(), img.grad.tolist(), txt.grad.tolist()))  # plain data: no shared memory
    dist.barrier()
    dist.destroy_process_group()


def _run_pair(kind: str):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, kind, q)) for r in range(2)]
    for p in procs:
        p.start()
    out = sorted(q.get(timeout=120) for _ in range(2))
    for p in procs:
        p.join(timeout=60)
    return out


@pytest.mark.parametrize("kind", ["full", "local", "siglip"])
def test_gathered_losses_match_the_global_batch(kind):
    results = _run_pair(kind)
    img, txt = _feats(8, 16)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    scale = torch.tensor(10.0)
    if kind == "siglip":
        z = scale * img @ txt.T - 5.0
        ref = -F.logsigmoid((2 * torch.eye(8) - 1) * z).sum() / 8  # global batch convention
        ref.backward()
        # Each rank sums its 4 image rows against all 8 texts, / 4: the two add up to 2 * ref.
        assert math.isclose(sum(r[1] for r in results), 2 * ref.item(), rel_tol=1e-5)
    else:
        ref, _ = clip_loss(img, txt, scale)
        ref.backward()
        if kind == "full":
            assert all(math.isclose(r[1], ref.item(), rel_tol=1e-5) for r in results)
        # Full: every rank holds the global loss; local: each rank half the rows, mean = global.
        assert math.isclose(sum(r[1] for r in results) / 2, ref.item(), rel_tol=1e-5)
    # Gradients: the all_gather backward sums every rank's contribution, so a rank's feature
    # gradient is d(sum of rank losses)/d(feature); DDP then averages parameter gradients.
    grad_img = torch.tensor([row for r in results for row in r[2]])
    grad_txt = torch.tensor([row for r in results for row in r[3]])
    # Here the summed rank losses are 2x the global loss in all three variants, hence 2x the
    # gradient, which DDP's averaging over 2 ranks brings back to the global-batch gradient.
    factor = 2.0
    assert torch.allclose(grad_img, img.grad * factor, atol=1e-5), (grad_img - img.grad * factor).abs().max()
    assert torch.allclose(grad_txt, txt.grad * factor, atol=1e-5)
