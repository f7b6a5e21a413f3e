"""One attention function for every block. Backends: torch SDPA (default, the CPU path) and the explicit math
reference. xFormers and a measured `auto` table come with the attention-backends work.

q, k, v: [N, H, T, Dh] -> [N, H, T, Dh]. No mask, no dropout (MAE-CT uses neither).
"""
from __future__ import annotations

import math
import os

import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("sdpa", "math")
_backend = os.environ.get("MAECT_ATTENTION", "sdpa")


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not available; choose one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


def attention_ref(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(Dh)) v computed in fp32 (the math reference)."""
    s = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return (s.softmax(dim=-1) @ v.float()).to(q.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    if _backend == "math":
        return attention_ref(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
