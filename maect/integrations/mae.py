"""MAE's per-sample random masking on maect's masking op, for models written in MAE's structure.

Replaces models_mae.MaskedAutoencoderViT.random_masking (facebookresearch/mae): noise = rand(N, L); argsort of the
noise; keep the first len_keep = int(L * (1 - mask_ratio)) tokens; mask 0 kept / 1 removed, in the original order;
ids_restore = argsort of the shuffle.

    from maect.integrations import mae
    mae.patch_random_masking(model)          # model.forward_encoder's self.random_masking(x, mask_ratio) now runs it
    x_masked, mask, ids_restore = mae.random_masking(x, 0.75)             # or call it directly
"""
from __future__ import annotations

import torch
from torch import Tensor

from maect import kernels

__all__ = ["random_masking", "patch_random_masking"]


def random_masking(x: Tensor, mask_ratio: float, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's random_masking(x, mask_ratio) on maect.kernels.random_masking (the compiled / Triton op where the
    dispatch picks one, else the reference).

    Args:
        x: [N, L, D] tokens (any float dtype; patch embeddings with positions added, as MAE passes them).
        mask_ratio: fraction of tokens removed, in [0, 1]; len_keep = int(L * (1 - mask_ratio)) as in MAE.
        noise: optional [N, L] float noise (the order it sorts into decides what is kept: the smallest len_keep
            entries). None: torch.rand(N, L, device=x.device) from the global generator, the draw MAE makes, so a
            seeded run masks the same tokens.

    Returns (MAE's outputs):
        x_masked [N, len_keep, D] (x's dtype; gradients flow to x), mask [N, L] in torch's default float dtype (fp32,
        as MAE's torch.ones) with 0 = kept, 1 = removed, ids_restore [N, L] int64.

    Equal to MAE's lines on the same noise: ids_restore and mask exactly, x_masked exactly (a gather). Ties in the
    noise (equal values; rand draws them with probability ~L^2 / 2^25 per row): maect keeps the lower token index
    first (a stable order); MAE's torch.argsort leaves their order unspecified. Errors: ValueError for x not
    [N, L, D], a ratio outside [0, 1], or noise not [N, L].
    """
    x_masked, mask, ids_restore = kernels.random_masking(x, mask_ratio, noise)
    return x_masked, mask.to(torch.get_default_dtype()), ids_restore


def patch_random_masking(model: torch.nn.Module) -> torch.nn.Module:
    """Make model.random_masking (MAE's MaskedAutoencoderViT method, called as self.random_masking(x, mask_ratio)
    in forward_encoder) run `random_masking` above; returns the model. The instance attribute shadows the class's
    method, so only this model changes; `del model.random_masking` restores the original. The patched model
    pickles (torch.save(model) / torch.load(..., weights_only=False)) and still runs maect's op once loaded, where
    maect is importable. TypeError when the model has no callable random_masking (not written in MAE's
    structure)."""
    if not callable(getattr(model, "random_masking", None)):
        raise TypeError(f"patch_random_masking: {type(model).__name__} has no random_masking method to replace "
                        f"(expected MAE's MaskedAutoencoderViT structure)")

    model.random_masking = random_masking      # a module-level function: a patched model pickles (torch.save)
    return model
