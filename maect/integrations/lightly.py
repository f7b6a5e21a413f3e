"""lightly's nearest-neighbour memory bank with its search on maect.kernels.queue_topk.

    from maect.integrations.lightly import NNMemoryBankModule      # instead of lightly.models.modules'
    memory_bank = NNMemoryBankModule(size=(2 ** 16, 128))

Importing this module imports lightly (`pip install lightly`; checked against lightly 1.6.0, where the class is
lightly.models.modules.nn_memory_bank.NNMemoryBankModule on top of memory_bank.MemoryBankModule).

Not replaced: lightly.models.utils.nearest_neighbors (VICRegL) receives an already materialised distance tensor
[B, N, M] (torch.cdist of features or grid positions) and takes its smallest entries, so there is no matrix left to
avoid and its order is Euclidean distance, not cosine similarity. `most_similar_index` below is lightly's other
search (lightly.models.utils.most_similar_index: normalise, einsum, argmax) and is replaced exactly.
"""
from __future__ import annotations

import ast
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from lightly.models.modules.nn_memory_bank import NNMemoryBankModule as _LightlyNNMemoryBankModule
from torch import Tensor

from maect.kernels import queue_topk

from .nnclr import replaced_rows, search_dtype

__all__ = ["NNMemoryBankModule", "nearest_index", "most_similar_index"]


def nearest_index(output: Tensor, bank: Tensor, who: str = "NNMemoryBankModule") -> Tensor:
    """Index [B] int64 of the bank row [Q, D] with the largest cosine similarity to each output row [B, D].

    Ranks what lightly's lines rank (F.normalize both, einsum, argmax), computed by queue_topk(normalized=False):
    rows normalised inside the op (eps 1e-12, F.normalize's), fp32 products and sums, the lower index first among
    equal similarities (torch.argmax's first maximum). Where lightly's einsum runs in bf16 / fp16 (autocast, or
    bank and output in that dtype) it rounds the similarities to that dtype; this search does not, so it may pick a
    different row only among rows within that rounding of the best one, and then picks the more similar one.
    Non-finite values and fp64 run lightly's own lines for the rows concerned, so they return what lightly
    returns: a row of output holding a NaN / inf gets index 0 (the argmax of its all-NaN row); a bank holding one
    makes every row run lightly's lines (the first NaN row of the bank wins); fp64 output and bank are searched by
    lightly's lines in fp64 (queue_topk has no fp64 path; the [B, Q] matrix is then allocated).
    """
    if output.dim() != 2 or bank.dim() != 2 or output.shape[1] != bank.shape[1]:
        raise ValueError(f"{who}: output must be [B, D] for a bank of [Q, D]={tuple(bank.shape)}, got "
                         f"{tuple(output.shape)}")
    dt = search_dtype(output, bank, who)
    if output.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=output.device)
    with torch.no_grad(), torch.autocast(output.device.type, enabled=False):
        out, bk = output.detach().to(dt), bank.detach().to(dt)
        redo = replaced_rows(out, bk, dt)
        if redo is not None and bool(redo.all()):
            return _lightly_lines(out, bk)
        idx = queue_topk(out, bk, 1, normalized=False)[1][:, 0]
        if redo is not None:                        # lightly's lines for these rows: its picks, exactly
            idx[redo] = _lightly_lines(out[redo], bk)
        return idx


def _lightly_lines(output: Tensor, bank: Tensor) -> Tensor:
    """lightly's own search (F.normalize both, the similarity matrix, argmax: the first NaN or maximum wins)."""
    return (F.normalize(output, dim=1) @ F.normalize(bank, dim=1).t()).argmax(dim=1)


class NNMemoryBankModule(_LightlyNNMemoryBankModule):
    """lightly's NNMemoryBankModule (NNCLR's support set) whose nearest-neighbour search runs on queue_topk.

    Same constructor (size=(num_features, dim)), forward(output, update=False) -> neighbours, buffers (bank,
    bank_ptr) and bank update (lightly's _dequeue_and_enqueue, inherited unchanged: written after the search, a
    batch that reaches the end of the bank fills it up to the end and the pointer returns to 0) as lightly 1.6.0.

    forward(output [B, dim] float, update) -> [B, dim]: for each row of output, the row of the bank *before* this
    call's update with the largest cosine similarity (nearest_index: its tie, precision and non-finite rules).
    The neighbours are the stored bank rows, as lightly returns them: the bank's dtype (fp32 unless the module was
    cast), on output's device (the bank is copied there if it lives elsewhere, as lightly's `bank.to(output.device)`),
    no gradient.

    Differs from lightly, and why:
        * No [B, Q] similarity matrix, no normalised copy of the bank and no clone of the bank (lightly clones the
          bank so that the update cannot change it under the search; here the neighbours are gathered before the
          update). Extra memory: queue_topk's blocks, never O(B x Q).
        * An output dtype other than the bank's (a bf16 output with the fp32 bank) is searched in fp32 (fp64 when
          either is fp64); lightly's einsum raises on mixed dtypes outside autocast.
        * size=0 (lightly: a disabled bank, then an AssertionError in forward) raises a ValueError saying so.
    """

    def __init__(self, size):
        super().__init__(size)

    def forward(self, output: Tensor, update: bool = False) -> Tensor:  # type: ignore[override]  (lightly's own)
        if self.size[0] == 0:
            raise ValueError("NNMemoryBankModule: size=0 disables the memory bank; the nearest-neighbour lookup needs "
                             "size=(num_features, dim)")
        bank = self.bank.to(output.device)
        idx = nearest_index(output, bank)
        neighbours = bank.index_select(0, idx)      # a copy: the update below cannot change it
        if update:
            self._dequeue_and_enqueue(output)
        return neighbours


def most_similar_index(x: Tensor, y: Tensor) -> Tensor:
    """lightly.models.utils.most_similar_index on queue_topk: for x [B, N, C] and y [B, M, C], index [B, N] int64
    of the row of y[b] with the largest cosine similarity to x[b, n]. Same rules as nearest_index (lower index
    among ties, fp32 similarity, lightly's own lines where x or y holds a non-finite value or both are fp64); one
    queue_topk call per b."""
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"most_similar_index: x must be [B, N, C] and y [B, M, C], got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if x.shape[0] == 0:
        return torch.empty(0, x.shape[1], dtype=torch.long, device=x.device)
    return torch.stack([nearest_index(x[b], y[b], "most_similar_index") for b in range(x.shape[0])])


def _importer_file() -> str | None:
    """The source file of the module whose import statement is importing this one (None: an interactive session,
    or an import from a string)."""
    f = sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename
        if not (name.startswith("<frozen") or "importlib" in name or name == __file__ or
                name.endswith(os.path.join("integrations", "__init__.py"))):
            return name if os.path.isfile(name) else None
        f = f.f_back
    return None


def shadowing_imports(path: str) -> list[str]:
    """The grouped-import trap in the source at path: `from maect.integrations.lightly import NNMemoryBankModule`
    above a `from lightly... import ..., NNMemoryBankModule, ...` that binds the same name again, so the script runs
    lightly's class. Returns one line per such later import ("line L rebinds NAME imported from maect at line M")."""
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError, ValueError):
        return []
    ours: dict[str, int] = {}
    found = []
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0),
                   key=lambda n: n.lineno)
    for node in nodes:
        for alias in node.names:
            local = alias.asname or alias.name
            if node.module == __name__ and alias.name in __all__:
                ours[local] = node.lineno
            elif (node.module == "lightly" or node.module.startswith("lightly.")) and local in ours:
                found.append(f"line {node.lineno} rebinds {local} imported from {__name__} at line {ours[local]}")
    return found


def _warn_if_shadowed() -> None:
    path = _importer_file()
    lines = shadowing_imports(path) if path else []
    if lines:
        warnings.warn_explicit(f"{'; '.join(lines)}: that name is lightly's class again, and maect's is not used. "
                               f"Import from {__name__} after lightly's imports, or drop the name from lightly's "
                               f"import.", UserWarning, path, int(lines[0].split()[1]))


_warn_if_shadowed()
