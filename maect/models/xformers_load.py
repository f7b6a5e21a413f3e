"""Load xFormers beside a torch built for another CUDA major version, or say exactly why it cannot load.

Why: PyPI's xformers==0.0.35 is a CUDA 12.8 build (its xformers/cpp_lib.json: {"cuda": 1208, "torch":
"2.10.0+cu128"}) whose extension xformers/_C.so lists libcudart.so.12 among its NEEDED libraries (readelf -d). A
CUDA 13 torch (2.11+cu130) ships libcudart.so.13 only, so the extension fails to load, xFormers logs "can't load
C++/CUDA extensions" and every attention operator then refuses with "xFormers wasn't build with CUDA support".
The fix: load the CUDA 12 runtime into the process first, ctypes.CDLL(path, RTLD_GLOBAL); the dynamic linker then
resolves _C.so's NEEDED libcudart.so.12 from the library already loaded (glibc matches loaded libraries by soname).
The runtime comes from the `nvidia-cuda-runtime-cu12` wheel (setup.py's `gpu` extra), which installs
<site-packages>/nvidia/cuda_runtime/lib/libcudart.so.12.
Measured on an H200 (torch 2.11+cu130, xformers 0.0.35, this preload, 2026-11): xFormers loads and
memory_efficient_attention matches SDPA (bf16 max diff <= 0.008) but is slower than SDPA's default forward+backward
(docs/performance.md); maect's `auto` attention uses it only where bench/attention.py measured it faster.

load_xformers() -> XformersStatus(ok, reason, version, cudart, notes): call once, before anything imports xformers.
Search order for libcudart.so.<major>: <dir>/nvidia/cuda_runtime/lib for every site-packages / sys.path directory,
then every LD_LIBRARY_PATH entry, then the system loader's own search (ldconfig cache).
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import re
import site
import sys
from dataclasses import dataclass, field

import torch

log = logging.getLogger("maect")

RUNTIME_WHEEL = "nvidia-cuda-runtime-cu{major}"          # PyPI name of the CUDA <major> runtime wheel
WHEEL_LIB_DIR = os.path.join("nvidia", "cuda_runtime", "lib")


@dataclass
class XformersStatus:
    ok: bool
    reason: str | None = None          # None when ok; else one line saying why xFormers cannot run
    version: str | None = None
    cudart: str | None = None          # the runtime library preloaded, if one was
    notes: list[str] = field(default_factory=list)


_status: XformersStatus | None = None


# ------------------------------------------------------------------------------------------------ seams (tests patch)
def _xformers_dir() -> str | None:
    """The installed xformers package directory (without importing it), or None."""
    spec = importlib.util.find_spec("xformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _torch_cuda() -> str | None:
    return torch.version.cuda


def _dlopen(path: str) -> None:
    """Load a shared library into the process with its symbols global (raises OSError with dlerror's text)."""
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def search_dirs() -> list[str]:
    """Directories searched for the runtime, in order: the runtime wheel's lib folder under every site-packages
    and sys.path directory, then LD_LIBRARY_PATH's entries."""
    roots = list(sys.path)
    try:
        roots += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:             # some virtualenv builds lack getsitepackages
        pass
    dirs = [os.path.join(r, WHEEL_LIB_DIR) for r in roots if r]
    dirs += [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    seen: dict[str, None] = {}
    for d in dirs:
        seen.setdefault(os.path.abspath(d), None)
    return list(seen)


# ------------------------------------------------------------------------------------------------ build metadata
def build_info(xdir: str) -> dict | None:
    """xformers/cpp_lib.json's 'version' entry ({'cuda': 1208, 'torch': '2.10.0+cu128', ...}), None if absent."""
    try:
        with open(os.path.join(xdir, "cpp_lib.json")) as f:
            return json.load(f).get("version") or {}
    except (OSError, ValueError):
        return None


def build_cuda_major(info: dict) -> int | None:
    """The CUDA major version the extension links against: the torch tag's '+cuXYZ' (the build's torch), else
    the toolkit number ('cuda': 1208 -> 12)."""
    m = re.search(r"\+cu(\d+)", str(info.get("torch") or ""))
    if m:
        return int(m.group(1)[:-1])
    cuda = info.get("cuda")
    return int(cuda) // 100 if cuda else None


def find_library(soname: str, dirs: list[str]) -> str | None:
    for d in dirs:
        p = os.path.join(d, soname)
        if os.path.isfile(p):
            return p
    return None


def preload_cudart(major: int, dirs: list[str] | None = None) -> tuple[str | None, str | None]:
    """Load libcudart.so.<major> with RTLD_GLOBAL. Returns (what was loaded, None) or (None, why not)."""
    soname = f"libcudart.so.{major}"
    dirs = search_dirs() if dirs is None else dirs
    path = find_library(soname, dirs)
    if path is not None:
        try:
            _dlopen(path)
            return path, None
        except OSError as e:
            return None, f"found {path} but it does not load ({str(e).splitlines()[0][:200]})"
    try:
        _dlopen(soname)                # the system loader's own search (ldconfig cache, rpath)
        return f"{soname} (system library path)", None
    except OSError:
        pass
    existing = [d for d in dirs if os.path.isdir(d)]
    where = ", ".join(existing) if existing else f"no {WHEEL_LIB_DIR} directory on sys.path and none on LD_LIBRARY_PATH"
    return None, (f"{soname} not found: install the CUDA {major} runtime wheel, pip install "
                  f"'{RUNTIME_WHEEL.format(major=major)}' (setup.py's gpu extra brings it); searched: {where}")


# ------------------------------------------------------------------------------------------------ loading
def _innermost(exc: BaseException) -> str:
    """The deepest cause's message (xFormers wraps dlopen's error twice)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return str(exc).splitlines()[0][:300]


def _import(notes: list[str]) -> tuple[str | None, str | None]:
    """Import xformers + xformers.ops, its log warnings captured into notes. (version, why not)."""
    xlog = logging.getLogger("xformers")

    class Capture(logging.Filter):
        def filter(self, record):
            notes.append(record.getMessage().splitlines()[0][:300])
            return False
    cap = Capture()
    xlog.addFilter(cap)
    try:
        import xformers
        import xformers.ops  # noqa: F401
    except Exception as e:  # a broken install must not break the other backends
        return None, f"import failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    finally:
        xlog.removeFilter(cap)
    from xformers import _cpp_lib
    version = getattr(xformers, "__version__", "?")
    exc = getattr(_cpp_lib, "_cpp_library_load_exception", None)
    if exc is not None:
        return version, f"xformers {version}: its C++/CUDA extension did not load ({_innermost(exc)})"
    if not getattr(_cpp_lib, "_built_with_cuda", True):
        return version, f"xformers {version} was built without CUDA (xformers._cpp_lib._built_with_cuda is False)"
    return version, None


def diagnose(dirs: list[str] | None = None) -> XformersStatus:
    """Find, preload what is missing, import; never raises. See the module docstring."""
    xdir = _xformers_dir()
    if xdir is None:
        return XformersStatus(False, "xformers is not installed (pip install -e '.[gpu]': xformers==0.0.35 and "
                                     "its CUDA 12 runtime wheel)")
    tcuda = _torch_cuda()
    if tcuda is None:
        return XformersStatus(False, f"this torch ({torch.__version__}) is built without CUDA; every xFormers "
                                     "attention operator is CUDA-only")
    info = build_info(xdir)
    notes, cudart = [], None
    if "xformers" in sys.modules:
        notes.append("xformers was imported before maect's loader ran: no runtime preload was possible")
        info = None
    if info is None and not notes:
        notes.append(f"no cpp_lib.json in {xdir}: build unknown, imported without a preload")
    else:
        if info.get("cuda") is None and info.get("hip") is None:
            return XformersStatus(False, f"the installed xformers was built without CUDA ({xdir}/cpp_lib.json: "
                                         f"version.cuda is null)")
        need, have = build_cuda_major(info), int(tcuda.split(".")[0])
        if need is not None and need != have:
            cudart, why = preload_cudart(need, dirs)
            if why is not None:
                return XformersStatus(False, f"xformers is a CUDA {need} build ({info.get('torch')}) and torch "
                                             f"{torch.__version__} ships CUDA {have}'s runtime: {why}")
            notes.append(f"preloaded {cudart} (RTLD_GLOBAL): xformers is a CUDA {need} build "
                         f"({info.get('torch')}), torch {torch.__version__} uses CUDA {tcuda}")
    version, why = _import(notes)
    return XformersStatus(why is None, why, version, cudart, notes)


def load_xformers(dirs: list[str] | None = None) -> XformersStatus:
    """diagnose() once per process (cached), logging the outcome once (logger 'maect')."""
    global _status
    if _status is None:
        _status = diagnose(dirs)
        if _status.ok:
            log.info(f"attention: xformers {_status.version} loaded" +
                     (f"; {'; '.join(_status.notes)}" if _status.notes else ""))
        else:
            log.info(f"attention: xformers unavailable: {_status.reason}")
    return _status


def reset() -> None:
    """Forget the cached status (tests). An already-imported xformers stays imported."""
    global _status
    _status = None
