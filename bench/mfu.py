"""Model FLOPs of one MAE / MAE-CT training step, and the peak they are divided by (MFU).

What is counted: matmul FLOPs only, 2 per multiply-add (the PaLM / Megatron MFU convention): every Linear, the
patch-embedding convolution and the two attention products. LayerNorm, softmax, GELU, residual adds, BatchNorm, the
losses, the optimizer and the queue lookup (2 B Q d per view: < 0.1 % of a ViT-L step) are not counted. Backward =
2 x forward for a layer whose input gradient is needed (one GEMM for the weight gradient, one for the input
gradient), 1 x forward where only the weight gradient is (the patch embedding: images need no gradient), 0 for
layers run under no_grad. Recomputation is not counted (none happens: no activation checkpointing).

  block(T, D) = 24 T D^2 + 4 T^2 D      one pre-norm ViT block forward, MLP ratio 4: qkv 6 T D^2, proj 2 T D^2,
                                        fc1 + fc2 16 T D^2; q kᵀ 2 T^2 D and attn·v 2 T^2 D (summed over heads)
  patch(L) = 2 L p^2 C D                the patch embedding over all L = (img / p)^2 patches (official MAE embeds
                                        every patch, then masks; maect's 'gather' masked_patch_embed executes only
                                        the K kept ones: the model FLOPs stay the official count)

MAE, per image (mask ratio r, K = int(L (1 - r)) visible patches: official MAE embeds all patches, then masks):
  2 patch(L)                            forward + weight gradient
  + 3 depth block(1 + K, D)             encoder on the visible tokens and cls
  + 3 (2 (1 + K) D Dd)                  decoder_embed
  + 3 dd block(1 + L, Dd)               decoder on all tokens (mask tokens unshuffled in) and cls
  + 3 (2 (1 + L) Dd p^2 C)              decoder_pred (applied to cls too, then dropped)
  x batch x num_views.
MAE-CT stage 3, per sample: both views through the encoder (the tuned part with gradients), per view:
  patch(L) + t block(1 + L, D)          frozen patch embedding and blocks 0..t-1: forward only, under no_grad
  + 3 (depth - t) block(1 + L, D)       tuned blocks t..depth-1: forward + backward (their input gradient is needed
                                        from the second tuned block on, and in the first one for its LayerNorm's
                                        weight gradient through qkv, so all of them count 3 x)
  + 3 (proj + pred) + proj              online projector and predictor trained, EMA target projector forward only
  proj = 2 (D h + h h + h o), pred = 2 (o ph + ph o)   (the NNCLR head's Linears; o = proj_dim)
  x 2 views x batch.
Checked against torch.utils.flop_counter.FlopCounterMode on a tiny model (tests/test_train_step.py), which counts
the same matmul/convolution FLOPs from the operators that actually ran, forward and backward.

Peak: the dense bf16 tensor-core rate from the vendor's datasheet, TFLOP/s (H100 / H200 SXM: 989.4; sparse
figures are twice these and are not used). MFU = model FLOPs per step / step time / peak.
"""
from __future__ import annotations

import torch

# dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name (first match wins)
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H200 NVL", 835), ("H100", 989), ("H200", 989),
               ("H800", 989), ("GH200", 989), ("B200", 2250), ("B100", 1750), ("A100", 312), ("A800", 312),
               ("L40S", 362), ("L4", 121), ("A10", 125)]


def block_flops(T: int, D: int, mlp_ratio: float = 4.0) -> int:
    """Forward matmul FLOPs of one pre-norm ViT block on T tokens of width D."""
    hidden = int(D * mlp_ratio)
    return 8 * T * D * D + 4 * T * D * hidden + 4 * T * T * D


def patch_flops(m) -> int:
    p = m.patch_embed.patch_size
    return 2 * m.patch_embed.num_patches * p * p * m.in_chans * m.embed_dim


def mae_flops(m, mask_ratio: float, batch: int, views: int = 1) -> float:
    """One MAE training step (forward + backward) of `batch` x `views` images; m: the MaskedAutoencoderViT."""
    L, D, p = m.patch_embed.num_patches, m.embed_dim, m.patch_embed.patch_size
    K = int(L * (1 - mask_ratio))
    Dd, dd = m.decoder_embed.out_features, len(m.decoder_blocks)
    img = (2 * patch_flops(m) + 3 * m.depth * block_flops(1 + K, D) + 3 * 2 * (1 + K) * D * Dd
           + 3 * dd * block_flops(1 + L, Dd) + 3 * 2 * (1 + L) * Dd * p * p * m.in_chans)
    return float(batch * views * img)


def ct_flops(m, n, t: int, batch: int) -> float:
    """One MAE-CT stage-3 step of `batch` samples (2 views each); m: the encoder, n: the NNCLR config (proj_hidden,
    proj_dim, pred_hidden), t: the first tuned block."""
    L, D = m.patch_embed.num_patches, m.embed_dim
    h, o, ph = n.proj_hidden, n.proj_dim, n.pred_hidden
    proj, pred = 2 * (D * h + h * h + h * o), 2 * (o * ph + ph * o)
    view = (patch_flops(m) + t * block_flops(1 + L, D) + 3 * (m.depth - t) * block_flops(1 + L, D)
            + 3 * (proj + pred) + proj)
    return float(batch * 2 * view)


def default_peak(device: torch.device, bf16: bool) -> float | None:
    """The GPU's dense bf16 peak (TFLOP/s) when the step runs in bf16 on a GPU listed above; else None (no MFU)."""
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS if k in name), None)
