"""One file per public op (queue_topk, random_masking, unshuffle, decoder_input, masked_patch_embed), each holding
the op's contract, input checks, pure-PyTorch reference (*_ref), Triton kernels and launcher, compiled-CPU-op wrapper
(with its fake kernel and autograd registration), verification rule, backends (registered with kernels/dispatch.py) and public
function; the pieces they share are in kernels/_util.py. The public functions are re-exported by maect.kernels; this package
re-exports nothing (so maect.kernels.ops.<op> is always the module).
"""
