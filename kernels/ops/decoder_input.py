"""decoder_input: MAE's decoder input in one pass.

decoder_input(x[N, c+K, D], mask_token[D], ids_restore[N, L], pos_embed[c+L, D] | [1, c+L, D] | None, cls=True)
    -> [N, c+L, D], c = 1 if cls else 0: official MAE's decoder input (models_mae.py forward_decoder: append mask
    tokens, unshuffle, re-attach the cls token, add decoder_pos_embed) written in one pass:
        out[n, 0]     = x[n, 0] + pos[0]                                                  (cls only)
        out[n, c + l] = (x[n, c + r] if r < K else mask_token) + pos[c + l],   r = ids_restore[n, l]
    dtype: the promotion of x, mask_token and pos_embed (under bf16 autocast: bf16 tokens, fp32 token and fp32
    position table -> fp32, exactly what MAE's torch.cat + add give). Each element is one addition in that dtype
    (computed in fp32, or fp64 for fp64 outputs, and rounded once), so the result equals the reference exactly.
Differentiable in x, mask_token and pos_embed (MAE's is fixed sin-cos, so unused). K == 0 and K == L are defined.
The one-pass backends rely on ids_restore being a permutation of 0..L-1 per row, which random_masking guarantees.

This file holds the op's contract, input check, reference (decoder_input_ref), the Triton launcher
(decoder_input_triton), the compiled CPU op's wrapper (decoder_input_cpp; csrc/masking.cpp), MAE's structure around
a standalone unshuffle op (_decoder_input_standalone), its measurement pieces, backends and public function. The
Triton kernels and their autograd Function are unshuffle's (kernels/ops/unshuffle.py: _DecoderInput, with the cls
row and the position add), imported from there, as is decoder_input_dtype.

Backends (BACKENDS): ref (MAE's torch code: cat + gather + add), cpp / triton (MAE's structure around the standalone
unshuffle op of that backend), fused (one pass: the compiled op on CPU, the Triton kernel on CUDA; the Triton kernel in
the interpreter on CPU when the compiled op is not built). Which one runs: kernels/dispatch.py (static default: OP.default).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._util import triton
from .. import dispatch
from .._util import clone, cpp_why, exact, masking_key, masking_meta, measurement_rows, records_grad, triton_why
from .unshuffle import _DecoderInput, _triton_declines, check_unshuffle, decoder_input_dtype, \
    unshuffle_cpp, unshuffle_triton

BACKENDS = ("ref", "cpp", "triton", "fused")


def check_decoder_input(x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos_embed: Tensor | None,
                        cls: bool) -> None:
    check_unshuffle(x, mask_token, ids_restore, int(cls), "decoder_input")
    T, D = int(cls) + ids_restore.shape[1], x.shape[2]
    if pos_embed is not None and (pos_embed.dim() not in (2, 3) or tuple(pos_embed.shape[-2:]) != (T, D)
                                  or pos_embed.numel() != T * D):
        raise ValueError(f"decoder_input: pos_embed must be [{T}, {D}] or [1, {T}, {D}] (cls={cls}), got "
                         f"{tuple(pos_embed.shape)}")


def decoder_input_ref(x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos_embed: Tensor | None = None,
                      cls: bool = True) -> Tensor:
    """Reference: official MAE's lines (cat mask tokens, gather by ids_restore, cat the cls token back, add the
    position embedding), with torch.cat's dtype promotion made explicit so it holds with and without autocast."""
    check_decoder_input(x, mask_token, ids_restore, pos_embed, cls)
    c, D = int(cls), x.shape[2]
    N, L = ids_restore.shape
    dt = decoder_input_dtype(x, mask_token, pos_embed)
    x = x.to(dt)
    filler = mask_token.reshape(1, 1, D).to(dt).expand(N, L + c - x.shape[1], D)
    x_ = torch.cat([x[:, c:, :], filler], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    x = torch.cat([x[:, :c, :], x_], dim=1)
    return x if pos_embed is None else x + pos_embed.reshape(1, c + L, D)


def decoder_input_triton(x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos_embed: Tensor | None = None,
                         cls: bool = True) -> Tensor:
    """decoder_input in one Triton pass (backward: one scatter pass + the mask-token partial sums); same contract as
    decoder_input_ref for ids_restore from random_masking (a permutation)."""
    check_decoder_input(x, mask_token, ids_restore, pos_embed, cls)
    if triton is None:
        raise RuntimeError("decoder_input_triton: triton is not installed")
    if _triton_declines(x, ids_restore.shape[1]):
        return decoder_input_ref(x, mask_token, ids_restore, pos_embed, cls)
    return _DecoderInput.apply(x, mask_token, ids_restore.contiguous(), pos_embed, int(cls))


# ----------------------------------------------------------------------------------------------------------------
# The compiled CPU op (csrc/masking.cpp; loaded by kernels/_cpp.py): wrapper, fake kernels, autograd.

def decoder_input_cpp(x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos_embed: Tensor | None = None,
                      cls: bool = True) -> Tensor:
    """Compiled decoder_input (the contract above). Requires kernels._cpp.load() to have succeeded."""
    check_decoder_input(x, mask_token, ids_restore, pos_embed, cls)
    return torch.ops.maect.decoder_input(x, mask_token, ids_restore, pos_embed, bool(cls))


def _cpp_setup(ctx, inputs, output):
    x, mask_token, ids_restore, pos_embed, has_cls = inputs
    ctx.has_cls, ctx.len_keep, ctx.x_dtype = has_cls, x.shape[1] - int(has_cls), x.dtype
    ctx.token_shape, ctx.token_dtype = mask_token.shape, mask_token.dtype
    ctx.pos_meta = None if pos_embed is None else (pos_embed.shape, pos_embed.dtype)
    ctx.save_for_backward(ids_restore)


def _cpp_backward(ctx, grad_out):
    """grad_x: the scatter (cast once to x's dtype, as the reference's cast backward); grad_mask_token: the masked
    rows' sum; grad_pos_embed (when it requires grad): grad_out summed over the batch."""
    (ids_restore,) = ctx.saved_tensors
    need_x, need_tok, _, need_pos, _ = ctx.needs_input_grad
    grad_x, grad_token = torch.ops.maect.decoder_input_backward(grad_out, ids_restore, ctx.len_keep, ctx.has_cls)
    grad_pos = grad_out.sum(0).to(ctx.pos_meta[1]).reshape(ctx.pos_meta[0]) if need_pos else None
    return (grad_x.to(ctx.x_dtype) if need_x else None,
            grad_token.to(ctx.token_dtype).reshape(ctx.token_shape) if need_tok else None, None, grad_pos, None)


def register_cpp() -> None:
    """Fake kernels of torch.ops.maect.decoder_input / decoder_input_backward and decoder_input's autograd formula
    (kernels/_cpp.py calls this once)."""
    @torch.library.register_fake("maect::decoder_input")
    def _(x, mask_token, ids_restore, pos_embed, has_cls):
        N, L = ids_restore.shape
        return x.new_empty(N, int(has_cls) + L, x.shape[2], dtype=decoder_input_dtype(x, mask_token, pos_embed))

    @torch.library.register_fake("maect::decoder_input_backward")
    def _(grad_out, ids_restore, len_keep, has_cls):
        N, _, D = grad_out.shape
        return grad_out.new_empty(N, int(has_cls) + len_keep, D), grad_out.new_empty(D)

    torch.library.register_autograd("maect::decoder_input", _cpp_backward, setup_context=_cpp_setup)


# ----------------------------------------------------------------------------------------------------------------
# Backends (kernels/dispatch.py) and the public function

def measurement_inputs(args: tuple) -> tuple:
    x, tok, ids, pos, cls = (tuple(args) + (None, True))[:5] if len(args) < 5 else args
    n = measurement_rows(x)
    return clone(x, n), clone(tok), ids[:n], clone(pos), cls


def verify(args, out, ref) -> str | None:
    """Exactly equal to the reference's (copies and one rounded add)."""
    return exact(("out",), out, ref)


def _decoder_input_standalone(unshuffle_op, x, mask_token, ids_restore, pos_embed, cls):
    """MAE's structure around a standalone unshuffle op: cat the cls token back, add the positions. x is promoted
    first, so the mask token is not rounded to x's dtype (as in MAE's torch.cat): equal to the reference."""
    check_decoder_input(x, mask_token, ids_restore, pos_embed, cls)
    c = int(cls)
    x = x.to(decoder_input_dtype(x, mask_token, pos_embed))
    out = torch.cat([x[:, :c], unshuffle_op(x[:, c:], mask_token, ids_restore)], dim=1)
    return out if pos_embed is None else out + pos_embed.reshape(1, out.shape[1], out.shape[2])


def decoder_input_standalone_cpp(x, mask_token, ids_restore, pos_embed=None, cls=True):
    return _decoder_input_standalone(unshuffle_cpp, x, mask_token, ids_restore, pos_embed, cls)


def decoder_input_standalone_triton(x, mask_token, ids_restore, pos_embed=None, cls=True):
    return _decoder_input_standalone(unshuffle_triton, x, mask_token, ids_restore, pos_embed, cls)


def decoder_input_fused(x, mask_token, ids_restore, pos_embed=None, cls=True):
    """One pass: the compiled op on CPU (when built), else the Triton kernel."""
    fn = decoder_input_cpp if x.device.type == "cpu" and cpp_why(x.device) is None else decoder_input_triton
    return fn(x, mask_token, ids_restore, pos_embed, cls)


def _fused_why(device: torch.device, meta: tuple = ()) -> str | None:
    return None if cpp_why(device) is None else triton_why(device)


def _meta(x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos_embed: Tensor | None = None, cls: bool = True):
    return masking_meta(x, ids_restore.shape[-1], x.shape[-1], records_grad(x, mask_token, pos_embed))


OP = dispatch.register(dispatch.Op(
    name="decoder_input", reference=decoder_input_ref, meta=_meta, key=masking_key, verify=verify,
    backends=(dispatch.Backend("ref", decoder_input_ref),
              dispatch.Backend("fused", decoder_input_fused, _fused_why),
              dispatch.Backend("cpp", decoder_input_standalone_cpp, cpp_why),
              dispatch.Backend("triton", decoder_input_standalone_triton, triton_why, cuda_timed_only=True)),
    default={"cpu": "fused", "cuda": "ref"}, prepare=measurement_inputs))


def decoder_input(x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos_embed: Tensor | None = None,
                  cls: bool = True, backend: str | None = None) -> Tensor:
    """MAE's decoder input in one pass; the contract is this module's docstring. backend: one by name (BACKENDS),
    else the decision for this shape class (kernels/dispatch.py)."""
    if x.dim() != 3 or ids_restore.dim() != 2:
        return decoder_input_ref(x, mask_token, ids_restore, pos_embed, cls)   # its error names the shape
    check_decoder_input(x, mask_token, ids_restore, pos_embed, cls)
    fn = dispatch.lookup("decoder_input", _meta(x, mask_token, ids_restore, pos_embed), x.device, backend)
    return fn(x, mask_token, ids_restore, pos_embed, cls)
