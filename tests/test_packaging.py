"""The built wheel: one top-level name (maect), the C++ sources and presets inside it, and a clean import beside an
unrelated distribution that owns the top-level name `kernels` (issue 19: installing maect must not replace it)."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    src = tmp_path_factory.mktemp("src") / "maect"      # a copy: setuptools writes build/ into the tree it builds
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "runs", "out", "*.egg-info", "__pycache__",
                                                             ".triton_cache", ".pytest_cache", "*.so"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", str(src), "-w", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("maect-*.whl")
    return whl


def test_wheel_has_one_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    print(sorted(top))
    assert top == {"maect"}
    for must in ("maect/kernels/__init__.py", "maect/kernels/ops/queue_topk.py", "maect/dataloading/__init__.py",
                 "maect/_csrc/ops.cpp", "maect/_csrc/queue_topk.cpp", "maect/_csrc/masking.cpp",
                 "maect/presets/tiny.yaml"):
        assert must in names, must
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["maect"]


def test_installed_wheel_imports_beside_a_package_named_kernels(wheel, tmp_path):
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                        "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (site / "kernels").mkdir()                              # the other distribution's top-level package
    (site / "kernels" / "__init__.py").write_text("WHO = 'the other kernels package'\n")
    # the compiled ops are not built here (a minute of compiling): the loader is patched to report none
    code = ("import maect.kernels._cpp as c\n"
            "c._loaded = None\n"
            "import kernels, maect.kernels as mk, maect.dataloading as md, torch\n"
            "assert kernels.WHO == 'the other kernels package', kernels.__file__\n"
            f"assert mk.__file__.startswith({str(site)!r}) and md.__file__.startswith({str(site)!r})\n"
            "assert (c._CSRC / 'ops.cpp').is_file(), c._CSRC\n"
            "q = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)\n"
            "v, i = mk.queue_topk(q, q, 2)\n"
            "assert i[:, 0].tolist() == [0, 1, 2, 3]\n"
            "print('ok', mk.__file__, c._CSRC)\n")
    # run outside the checkout, with only the target folder (and the environment's torch) on the path
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "MAECT_CACHE_DIR": str(tmp_path / "cache")})
    print(r.stdout, r.stderr[-3000:])
    assert r.returncode == 0 and "ok" in r.stdout


# ------------------------------------------------------------------------------------------------ source checkout
def run_py(code: str, python=sys.executable, cwd=ROOT):
    return subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"})


def test_this_interpreter_imports_one_tree():
    """maect, maect.kernels and maect.dataloading come from the same checkout (or the same installed wheel). From
    a checkout whose interpreter has another checkout installed, maect would come from here and maect.kernels from
    there: install this checkout (./setup.sh, or pip install -e .)."""
    r = run_py("import maect, maect.kernels as k, maect.dataloading as d; print(maect.__file__); print(k.__file__); "
               "print(d.__file__)")
    assert r.returncode == 0, r.stderr[-3000:]
    pkg, kern, data = (Path(p).resolve() for p in r.stdout.split())
    home = pkg.parents[1]
    assert kern.parent in (home / "kernels", pkg.parent / "kernels"), (
        f"maect is {pkg} but maect.kernels is {kern}: another checkout is installed in this interpreter; "
        f"run ./setup.sh (pip install -e .) in {home}")
    assert data.parent in (home / "dataloading", pkg.parent / "dataloading"), (pkg, data)


def see_running_interpreter(py: Path) -> None:
    """Make the venv of `py` import what this interpreter imports (torch, setuptools, wheel), whatever this
    interpreter is: the system's Python, or a venv whose own packages differ from its base interpreter's (there
    `python -m venv --system-site-packages` would reach the base's packages, e.g. an old setuptools without wheel).
    A .pth file in the venv's site-packages lists this interpreter's sys.path entries beyond its standard library,
    except the checkout itself and the editable finders' hooks; it sorts after the venv's own .pth files, so the
    venv's editable maect is found first. Paths listed in a .pth are plain entries: their own .pth files (this
    interpreter's editable maect) are not run."""
    import sysconfig
    stdlib = {Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib")}
    keep = []
    for p in sys.path:
        if not p or not Path(p).is_dir():
            continue                                   # '' (the cwd), zip archives, finder hooks
        rp = Path(p).resolve()
        if rp == ROOT or ROOT in rp.parents or rp in stdlib or rp.name == "lib-dynload":
            continue                                   # the checkout; the standard library (the venv has its own)
        keep.append(str(rp))
    out = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "zz_running_interpreter.pth").write_text("".join(p + "\n" for p in keep))


@pytest.fixture(scope="module")
def editable(tmp_path_factory):
    """A copy of the checkout installed editable (pip install -e, as ./setup.sh does) into a fresh virtual
    environment that sees this interpreter's packages (torch, setuptools, wheel: see_running_interpreter) but not
    its maect: (venv python, copy)."""
    base = tmp_path_factory.mktemp("editable")
    src = base / "clone"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "runs", "out", "*.egg-info", "__pycache__",
                                                             ".triton_cache", ".pytest_cache", "*.so"))
    venv = base / "venv"
    r = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    py = venv / "bin" / "python"
    see_running_interpreter(py)
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                        "--no-build-isolation", "--disable-pip-version-check", "-e", str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return py, src


def test_editable_install_maps_kernels_and_dataloading(editable, tmp_path):
    """setup.py's package_dir, through setuptools' editable finder: maect.kernels / maect.dataloading are the copy's
    kernels/ and dataloading/, from its root (where `python -m pytest` runs) and from elsewhere."""
    py, src = editable
    for cwd in (src, tmp_path):
        r = run_py("import maect, maect.kernels as k, maect.dataloading as d, maect.kernels._cpp as c\n"
                   "print(maect.__file__, k.__file__, d.__file__, c._CSRC)", python=py, cwd=cwd)
        assert r.returncode == 0, r.stderr[-3000:]
        got = [Path(p) for p in r.stdout.split()]
        assert got == [src / "maect" / "__init__.py", src / "kernels" / "__init__.py",
                       src / "dataloading" / "__init__.py", src / "csrc"], (cwd, got)


def test_editable_venv_sees_this_interpreters_packages(editable):
    """The fixture's venv imports torch, setuptools (and wheel, where installed) from the files this interpreter
    imports (inside a venv: the venv's, not its base interpreter's, which may lack wheel or hold an older
    setuptools)."""
    import importlib.util
    py, _ = editable
    names = ["torch", "setuptools"] + (["wheel"] if importlib.util.find_spec("wheel") else [])   # setuptools >= 70.1
    code = f"import {', '.join(names)}; print({', '.join(n + '.__file__' for n in names)})"        # needs no wheel
    r = run_py(code, python=py, cwd=py.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    mine = [str(Path(importlib.import_module(n).__file__).resolve()) for n in names]
    assert [str(Path(p).resolve()) for p in r.stdout.split()] == mine


@pytest.mark.parametrize("name", ["setup", "maect", "bench", "tests"])
def test_repository_folders_are_not_maect_submodules(editable, name):
    """In a checkout (its root on sys.path, as `python -m ...` puts it there) the repository's other top-level
    entries are not parts of the package: `import maect.setup` would run setup(), `maect.maect` a second copy of
    maect with its own state."""
    py, src = editable
    r = run_py(f"import maect.{name}", python=py, cwd=src)
    assert r.returncode == 1 and f"ModuleNotFoundError: No module named 'maect.{name}'" in r.stderr, r.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ import layers
def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (top level and inside functions), as dotted names; `from maect import x` gives
    maect.x."""
    import ast
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def under(names: set[str], pkg: str) -> list[str]:
    return sorted(n for n in names if n == pkg or n.startswith(pkg + "."))


MODEL_LAYER = ["maect/heads.py", "maect/losses.py", "maect/device.py", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "maect" / "models").glob("*.py")), *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "kernels").glob("*.py"))]


@pytest.mark.parametrize("path", MODEL_LAYER)
def test_model_layer_imports_no_data_layer(path):
    assert under(imported_modules(ROOT / path), "maect.dataloading") == []


def test_config_imports_nothing_of_validation():
    """validation checks configs (it imports config); config never imports validation, not even inside a
    function."""
    assert under(imported_modules(ROOT / "maect" / "config.py"), "maect.validation") == []
    assert "maect.config" in imported_modules(ROOT / "maect" / "validation.py")


def test_imported_modules_sees_every_form(tmp_path):
    """The rule checker itself: each import form is found."""
    f = tmp_path / "m.py"
    f.write_text("import maect.dataloading.augment\nfrom maect import dataloading\n"
                 "def g():\n    from maect.dataloading.augment import h2d\n")
    assert under(imported_modules(f), "maect.dataloading") == ["maect.dataloading", "maect.dataloading.augment",
                                                               "maect.dataloading.augment.h2d"]
