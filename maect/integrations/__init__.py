"""Swap-in adapters: maect's kernels behind the interfaces other SSL code already calls.

    maect.integrations.nnclr_find_nn(z, queue, queue_ids=None, ids=None, topk=1, generator=None) -> (idx, nn)
        the NNCLR queue lookup of solo-learn (`NNCLR.find_nn`) and of the published MAE-CT heads
        (`ContrastiveHeadBase.find_nn`: self exclusion by sample id, uniform pick among the top-k)
    maect.integrations.lightly.NNMemoryBankModule(size)
        lightly's NNMemoryBankModule (same constructor, forward, bank update and output) searching with queue_topk
    maect.integrations.mae.random_masking(x, mask_ratio, noise=None) -> (x_masked, mask, ids_restore)
    maect.integrations.mae.patch_random_masking(model)
        MAE's per-sample random masking (models_mae.MaskedAutoencoderViT.random_masking) on maect's masking op

Importing this package imports no third-party SSL library: `maect.integrations.lightly` imports lightly when it is
first imported or accessed (lightly itself is not a dependency of maect; `pip install lightly`). Each adapter's
docstring gives its contract: the neighbours it returns, their dtype and device, the tie rule, and where it differs
from the code it replaces and why. docs/swap-in.md lists the lines to change in each project.
"""
from __future__ import annotations

import importlib

from .nnclr import nnclr_find_nn

__all__ = ["nnclr_find_nn", "lightly", "mae"]


def __getattr__(name: str):
    if name in ("lightly", "mae"):          # submodules, imported on first access
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
