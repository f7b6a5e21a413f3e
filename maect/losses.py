"""Loss functions, pure (no state). The MAE loss lives on the model (MaskedAutoencoderViT.forward_loss)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from maect import dist


def nnclr_loss(nn0: Tensor, nn1: Tensor, p0: Tensor, p1: Tensor, tau: float, amp=None) -> Tensor:
    """NNCLR loss, symmetric over the two views (SPEC).

    nn0, nn1: [B, D] queue neighbours of view 0 / view 1 (normalised, no grad), this rank's rows.
    p0, p1:   [B, D] predictions of view 0 / view 1 (this rank's rows).
    View-0 term: logits = nn1 · all_gather(p0)ᵀ / τ, target = the sample's global index (rank·B + i);
    view-1 term likewise with nn0 and p1. Negatives are the other predictions of the global batch.
    amp: None (default): the logits in fp32 (inputs upcast, an fp32 GEMM); or an autocast context (nnclr.loss_autocast:
    the run's bf16 autocast, as the published code computes them: the GEMM's inputs and output and the division by
    tau in bf16, the cross-entropy in fp32, autocast's rule for it).
    Returns the mean of the two cross-entropies (averaged over this rank's rows), fp32.
    """
    B = p0.shape[0]
    with amp if amp is not None else contextlib.nullcontext():
        q0 = dist.all_gather_grad(F.normalize(p0.float(), dim=1))
        q1 = dist.all_gather_grad(F.normalize(p1.float(), dim=1))
        target = torch.arange(B, device=p0.device) + dist.rank() * B
        loss0 = F.cross_entropy(nn1.float() @ q0.t() / tau, target)
        loss1 = F.cross_entropy(nn0.float() @ q1.t() / tau, target)
    return ((loss0 + loss1) / 2).float()
