import os

# Triton kernels run on CPU only through the interpreter, and it must be set before any kernel is defined.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Backend decisions (kernels/dispatch.py): tests never read or write the user's ~/.cache/maect. The session shares one
# cache folder, so the trainer's start-up decisions are measured once per shape class and read back by later runs
# (tests about the decisions set their own folder).
import tempfile  # noqa: E402

os.environ.setdefault("MAECT_CACHE_DIR", tempfile.mkdtemp(prefix="maect_test_cache_"))


import pytest  # noqa: E402


@pytest.fixture
def fresh_dispatch(monkeypatch, tmp_path):
    """No backend decision in this process, a fresh cache folder, nothing forced, MAECT_KERNELS unset (before and
    after the test); yields monkeypatch."""
    from maect.kernels import dispatch
    monkeypatch.delenv("MAECT_KERNELS", raising=False)
    monkeypatch.setenv("MAECT_CACHE_DIR", str(tmp_path / "cache"))
    dispatch.clear()
    yield monkeypatch
    dispatch.clear()
