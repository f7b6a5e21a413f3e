"""The xFormers loader's diagnosis (maect.models.xformers_load) without xFormers or a GPU: a fake xformers package
directory (its cpp_lib.json says what it was built for), a fake torch CUDA version and search paths pointed at
temporary folders. Each case checks the one-line reason names the missing piece and the fix."""
from __future__ import annotations

import ctypes
import json
import logging
import os

import pytest

from maect.models import xformers_load as X

CU128 = {"version": {"cuda": 1208, "hip": None, "torch": "2.10.0+cu128", "python": "3.10.19"}}


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A fake xformers install built per `meta`, a torch with CUDA `torch_cuda`, a system loader that finds
    nothing by bare name, and dlopen calls recorded."""
    xdir = tmp_path / "site" / "xformers"
    xdir.mkdir(parents=True)
    calls = []

    def setup(meta=CU128, torch_cuda="13.0", installed=True):
        if meta is not None:
            (xdir / "cpp_lib.json").write_text(json.dumps(meta))
        monkeypatch.setattr(X, "_xformers_dir", lambda: str(xdir) if installed else None)
        monkeypatch.setattr(X, "_torch_cuda", lambda: torch_cuda)
        monkeypatch.delitem(__import__("sys").modules, "xformers", raising=False)
        return calls
    real = X._dlopen

    def dlopen(path):
        calls.append(path)
        if os.sep not in path:                       # a bare soname: the system search finds nothing here
            raise OSError(f"{path}: cannot open shared object file: No such file or directory")
        real(path)                                   # a path: the real dlopen (a garbage file fails for real)
    monkeypatch.setattr(X, "_dlopen", dlopen)
    monkeypatch.setattr(X, "_import", lambda notes: ("0.0.35", None))   # never import a real xformers here
    X.reset()
    yield setup
    X.reset()


def test_build_metadata_parsing():
    assert X.build_cuda_major(CU128["version"]) == 12
    assert X.build_cuda_major({"cuda": 1300, "torch": None}) == 13
    assert X.build_cuda_major({"cuda": 1208, "torch": "2.9.0+cu130"}) == 13     # the torch tag wins (toolkit != family)
    assert X.build_cuda_major({"cuda": None, "torch": "2.10.0"}) is None


def test_not_installed(fake):
    fake(installed=False)
    st = X.diagnose([])
    assert not st.ok and "xformers is not installed" in st.reason and ".[gpu]" in st.reason


def test_torch_without_cuda(fake):
    fake(torch_cuda=None)
    st = X.diagnose([])
    assert not st.ok and "built without CUDA" in st.reason and "CUDA-only" in st.reason


def test_xformers_built_without_cuda(fake):
    fake(meta={"version": {"cuda": None, "hip": None, "torch": "2.10.0+cpu"}})
    st = X.diagnose([])
    assert not st.ok and "installed xformers was built without CUDA" in st.reason and "cpp_lib.json" in st.reason


def test_runtime_library_missing(fake, tmp_path, monkeypatch):
    """The case measured on the H200: a CUDA 12.8 wheel beside a CUDA 13 torch and no libcudart.so.12 anywhere."""
    calls = fake()
    empty = tmp_path / "lib"
    empty.mkdir()
    monkeypatch.setenv("LD_LIBRARY_PATH", str(empty))
    monkeypatch.setattr(X.sys, "path", [str(tmp_path / "nowhere")])
    monkeypatch.setattr(X.site, "getsitepackages", lambda: [str(tmp_path / "site-packages")])
    monkeypatch.setattr(X.site, "getusersitepackages", lambda: str(tmp_path / "user-site"))
    dirs = X.search_dirs()
    assert os.path.join(str(tmp_path / "nowhere"), "nvidia", "cuda_runtime", "lib") in dirs and str(empty) in dirs
    st = X.diagnose(dirs)
    print(st.reason)
    assert not st.ok
    assert "CUDA 12 build (2.10.0+cu128)" in st.reason and "ships CUDA 13's runtime" in st.reason
    assert "libcudart.so.12 not found" in st.reason and "pip install 'nvidia-cuda-runtime-cu12'" in st.reason
    assert f"searched: {empty}" in st.reason           # only existing folders are listed
    assert calls == ["libcudart.so.12"]                 # the system search was tried last


def test_runtime_library_found_but_broken(fake, tmp_path):
    fake()
    lib = tmp_path / "nvidia" / "cuda_runtime" / "lib"
    lib.mkdir(parents=True)
    (lib / "libcudart.so.12").write_bytes(b"not an ELF file")
    st = X.diagnose([str(lib)])
    print(st.reason)
    assert not st.ok and f"found {lib}/libcudart.so.12 but it does not load" in st.reason


def test_runtime_preloaded_then_imported(fake, tmp_path, monkeypatch, caplog):
    """Found in the wheel's folder: loaded by path with RTLD_GLOBAL before the import, and the log says so."""
    calls = fake()
    lib = tmp_path / "nvidia" / "cuda_runtime" / "lib"
    lib.mkdir(parents=True)
    (lib / "libcudart.so.12").write_bytes(b"")
    monkeypatch.setattr(X, "_dlopen", lambda path: calls.append(path))
    monkeypatch.setattr(X, "search_dirs", lambda: [str(tmp_path / "empty"), str(lib)])
    with caplog.at_level(logging.INFO, logger="maect"):
        st = X.load_xformers()
        X.load_xformers()                              # cached: one diagnosis, one log line
    assert st.ok and st.cudart == str(lib / "libcudart.so.12") and calls == [st.cudart]
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "xformers 0.0.35 loaded; preloaded" in msgs[0] and "RTLD_GLOBAL" in msgs[0], msgs


def test_same_cuda_major_needs_no_preload(fake):
    calls = fake(meta={"version": {"cuda": 1300, "hip": None, "torch": "2.10.0+cu130"}})
    st = X.diagnose([])
    assert st.ok and st.cudart is None and calls == []


def test_extension_load_failure_reports_the_innermost_cause(monkeypatch):
    """xFormers wraps dlopen's error twice (xFormersInvalidLibException <- OSError <- OSError): the reason carries
    the innermost message, the one naming the missing library."""
    try:
        try:
            try:
                raise OSError("libcudart.so.12: cannot open shared object file: No such file or directory")
            except OSError as inner:
                raise OSError("Could not load this library: .../xformers/_C.so") from inner
        except OSError as mid:
            raise RuntimeError("xFormers can't load C++/CUDA extensions") from mid
    except RuntimeError as e:
        assert X._innermost(e).startswith("libcudart.so.12: cannot open shared object file")


def test_real_dlopen_error_is_an_oserror(tmp_path):
    """The seam the loader relies on: ctypes raises OSError with the loader's message for a bad file."""
    bad = tmp_path / "libbad.so"
    bad.write_bytes(b"\0" * 16)
    with pytest.raises(OSError):
        ctypes.CDLL(str(bad), mode=ctypes.RTLD_GLOBAL)
