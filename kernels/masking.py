"""MAE random masking and the decoder's unshuffle.

random_masking(x[N, L, D], mask_ratio, noise[N, L] | None) -> (x_visible[N, K, D], mask[N, L], ids_restore[N, L])
    K = int(L * (1 - mask_ratio)). Per sample, the K positions with the smallest noise are kept, in ascending
    noise order (MAE's exact semantics: ids_shuffle = argsort(noise); keep ids_shuffle[:, :K]).
    Ties in noise: the lower position ranks first (stable sort). mask: 0 keep, 1 remove, in the original order,
    dtype of x. ids_restore: int64, the inverse permutation of ids_shuffle.
unshuffle(x[N, K, D], mask_token[D] (or [1, 1, D]), ids_restore[N, L]) -> [N, L, D]
    Append L-K copies of mask_token to x and put every token back at its original position:
    out[n, l] = cat(x, mask)[n, ids_restore[n, l]].
Both are differentiable (x and mask_token). K == 0 (mask_ratio 1.0) and K == L (mask_ratio 0.0) are defined.
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_masking(x: Tensor, mask_ratio: float, noise: Tensor | None) -> int:
    if x.dim() != 3:
        raise ValueError(f"random_masking: x must be [N, L, D], got shape {tuple(x.shape)}")
    if not 0.0 <= float(mask_ratio) <= 1.0:
        raise ValueError(f"random_masking: mask_ratio={mask_ratio} must be in [0, 1]")
    if noise is not None and noise.shape != x.shape[:2]:
        raise ValueError(f"random_masking: noise must be [N, L]={tuple(x.shape[:2])}, got {tuple(noise.shape)}")
    return int(x.shape[1] * (1 - float(mask_ratio)))


def check_unshuffle(x: Tensor, mask_token: Tensor, ids_restore: Tensor) -> None:
    if x.dim() != 3 or ids_restore.dim() != 2 or ids_restore.shape[0] != x.shape[0] or ids_restore.shape[1] < x.shape[1]:
        raise ValueError(f"unshuffle: x must be [N, K, D] and ids_restore [N, L>=K], got {tuple(x.shape)} and "
                         f"{tuple(ids_restore.shape)}")
    if mask_token.numel() != x.shape[2]:
        raise ValueError(f"unshuffle: mask_token must hold D={x.shape[2]} values, got shape {tuple(mask_token.shape)}")


def random_masking_ref(x: Tensor, mask_ratio: float, noise: Tensor | None = None,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Reference: rand -> two argsorts -> gathers (the official MAE path, with a stable sort for the tie rule)."""
    len_keep = check_masking(x, mask_ratio, noise)
    N, L, D = x.shape
    if noise is None:
        noise = torch.rand(N, L, device=x.device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :len_keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(N, L, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_visible, mask, ids_restore


def unshuffle_ref(x: Tensor, mask_token: Tensor, ids_restore: Tensor) -> Tensor:
    """Reference: cat(x, mask tokens) then gather by ids_restore."""
    check_unshuffle(x, mask_token, ids_restore)
    N, K, D = x.shape
    L = ids_restore.shape[1]
    filler = mask_token.reshape(1, 1, D).to(x.dtype).expand(N, L - K, D)
    full = torch.cat([x, filler], dim=1)
    return torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
