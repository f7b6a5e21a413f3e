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
    for must in ("maect/kernels/__init__.py", "maect/kernels/queue_topk.py", "maect/dataloading/__init__.py",
                 "maect/_csrc/ops.cpp", "maect/presets/tiny.yaml", "maect/models/attention_table.json",
                 "maect/kernels/masking_table.json"):
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
    code = ("import kernels, maect.kernels as mk, maect.dataloading as md, maect.kernels._cpp as c, torch\n"
            "assert kernels.WHO == 'the other kernels package', kernels.__file__\n"
            f"assert mk.__file__.startswith({str(site)!r}) and md.__file__.startswith({str(site)!r})\n"
            "assert (c._CSRC / 'ops.cpp').is_file(), c._CSRC\n"
            "q = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)\n"
            "v, i = mk.queue_topk_ref(q, q, 2)\n"
            "assert i[:, 0].tolist() == [0, 1, 2, 3]\n"
            "print('ok', mk.__file__, c._CSRC)\n")
    # run outside the checkout, with only the target folder (and the environment's torch) on the path
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "MAECT_CPP": "0"})
    print(r.stdout, r.stderr[-3000:])
    assert r.returncode == 0 and "ok" in r.stdout
