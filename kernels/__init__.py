"""maect kernels: drop-in ops for SSL code (`from maect.kernels import queue_topk, random_masking, unshuffle`).
Importing this package imports nothing else of maect (only maect/__init__.py, which is a few lines).

Public ops
    queue_topk(query, queue, k, exclude_ids=None, queue_ids=None, normalized=True) -> (values, indices)
    random_masking(x, mask_ratio, noise=None, generator=None) -> (x_visible, mask, ids_restore)
    unshuffle(x_visible, mask_token, ids_restore) -> x_full

The one dispatch rule (backend_for):
    MAECT_KERNELS=0                                   -> "ref"
    CUDA tensor and Triton importable                 -> "triton"
    CPU tensor and the compiled csrc extension loads  -> "cpp"
    otherwise                                         -> "ref"
Each backend module may still decline a given input (dtype/shape) and fall back to the reference.
"""
from __future__ import annotations

import os

from torch import Tensor

from . import masking as _masking
from . import queue_topk as _queue_topk

__all__ = ["queue_topk", "random_masking", "unshuffle", "backend_for", "queue_topk_ref", "random_masking_ref",
           "unshuffle_ref"]

queue_topk_ref = _queue_topk.queue_topk_ref
random_masking_ref = _masking.random_masking_ref
unshuffle_ref = _masking.unshuffle_ref


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:  # a broken triton install must not break the reference path
        return False


def _cpp_available() -> bool:
    try:
        from . import _cpp
    except ImportError:
        return False
    return _cpp.load() is not None


def backend_for(t: Tensor) -> str:
    """Which implementation runs for tensors on t's device: 'triton', 'cpp' or 'ref'."""
    if os.environ.get("MAECT_KERNELS", "1") == "0":
        return "ref"
    if t.is_cuda and _triton_available():
        return "triton"
    if t.device.type == "cpu" and _cpp_available():
        return "cpp"
    return "ref"


def _impl(module, op: str, backend: str):
    """The backend's function for op, or None (-> reference). Triton functions live next to their reference
    (module.<op>_triton); compiled CPU ops live in kernels/_cpp.py (_cpp.<op>)."""
    if backend == "triton":
        return getattr(module, f"{op}_triton", None)
    if backend == "cpp":
        from . import _cpp
        return getattr(_cpp, op, None)
    return None


def queue_topk(query: Tensor, queue: Tensor, k: int, exclude_ids: Tensor | None = None,
               queue_ids: Tensor | None = None, normalized: bool = True):
    """Top-k cosine neighbours of each query row in the queue; see kernels/queue_topk.py for the contract."""
    backend = backend_for(query)
    impl = _impl(_queue_topk, "queue_topk", backend)
    if impl is None:
        return _queue_topk.queue_topk_ref(query, queue, k, exclude_ids, queue_ids, normalized)
    return impl(query, queue, k, exclude_ids, queue_ids, normalized)


def random_masking(x: Tensor, mask_ratio: float, noise: Tensor | None = None, generator=None):
    """MAE per-sample random masking; see kernels/masking.py for the contract."""
    backend = backend_for(x)
    impl = _impl(_masking, "random_masking", backend)
    if impl is None:
        return _masking.random_masking_ref(x, mask_ratio, noise, generator)
    return impl(x, mask_ratio, noise, generator)


def unshuffle(x: Tensor, mask_token: Tensor, ids_restore: Tensor) -> Tensor:
    """Insert mask tokens and restore the original token order; see kernels/masking.py."""
    backend = backend_for(x)
    impl = _impl(_masking, "unshuffle", backend)
    if impl is None:
        return _masking.unshuffle_ref(x, mask_token, ids_restore)
    return impl(x, mask_token, ids_restore)
