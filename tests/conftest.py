import os

# Triton kernels run on CPU only through the interpreter, and it must be set before any kernel is defined.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))
