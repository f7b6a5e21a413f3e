import os

# Triton kernels run on CPU only through the interpreter, and it must be set before any kernel is defined.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Measured dispatch (kernels/dispatch.py): tests never read or write the user's ~/.cache/maect, and tests that are
# not about dispatch run the committed tables (MAECT_DISPATCH=table) instead of measuring at each op's first call:
# their results do not depend on which verified backend a loaded machine happens to time fastest, and the suite does
# not pay the measurements. tests/test_dispatch.py and tests/test_kernels_check.py set measure mode themselves.
import tempfile  # noqa: E402

os.environ.setdefault("MAECT_CACHE_DIR", tempfile.mkdtemp(prefix="maect_test_cache_"))
os.environ.setdefault("MAECT_DISPATCH", "table")
