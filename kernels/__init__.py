"""maect kernels: drop-in ops for SSL code (`from maect.kernels import queue_topk, random_masking, unshuffle`).
Importing this package imports nothing else of maect (only maect/__init__.py, which is a few lines).

Public ops (each with its *_ref, the specification, beside it; one file per op in kernels/ops/)
    queue_topk(query, queue, k, exclude_ids=None, queue_ids=None, normalized=True) -> (values, indices)
    random_masking(x, mask_ratio, noise=None, generator=None, backend=None) -> (x_visible, mask, ids_restore)
    unshuffle(x_visible, mask_token, ids_restore, backend=None) -> x_full
    masked_patch_embed(imgs, weight, bias, pos_embed, mask_ratio, noise=None, generator=None, backend=None)
        -> (x_visible, mask, ids_restore): patch embedding + position embedding + random_masking, MAE's encoder input
    decoder_input(x, mask_token, ids_restore, pos_embed=None, cls=True, backend=None) -> [N, c+L, D]: MAE's decoder
        input (mask tokens appended, unshuffled, cls re-attached, decoder position embedding added)

Layout: kernels/ops/<op>.py holds one op whole (contract, checks, reference, Triton kernels and launcher, compiled-CPU
op wrapper, verification rule, backends, public function); kernels/_util.py the helpers they share; kernels/_cpp.py
the loader of the compiled CPU ops (csrc/); kernels/_route.py and kernels/dispatch.py which backend runs (the rule:
kernels/_route.py's docstring, docs/dispatch.md). This file only re-exports.
"""
from __future__ import annotations

from . import dispatch
from ._route import (MASKING_BACKENDS, TABLE_PATH, backend_for, choose, clear_cache, decisions,  # noqa: F401
                     load_table, mae_backends, shape_class, why_not)
from .ops.decoder_input import decoder_input, decoder_input_ref
from .ops.masked_patch_embed import masked_patch_embed, masked_patch_embed_ref
from .ops.queue_topk import queue_topk, queue_topk_ref
from .ops.random_masking import random_masking, random_masking_ref
from .ops.unshuffle import unshuffle, unshuffle_ref

__all__ = ["queue_topk", "random_masking", "unshuffle", "masked_patch_embed", "decoder_input", "backend_for", "choose",
           "queue_topk_ref", "random_masking_ref", "unshuffle_ref", "masked_patch_embed_ref", "decoder_input_ref",
           "MASKING_BACKENDS", "mae_backends", "dispatch", "decisions"]
