"""Carry wheels too large for one device call (nvidia-dali-cuda130: ~199 MB) to the GPU machine in chunks.

The device tool copies the working tree plus up to 64 MiB of git-ignored paths per call, and git-ignored files
already on a warm machine stay there between calls. So: here, `prepare` downloads the wheels for the device's Python
and platform, packs them (plus any --add files, e.g. the Fashion-MNIST test split) into one tar and splits it into
chunks under .whl/stage/ (git-ignored); each device call carries manifest.json and one chunk; the last call runs
`install`, which checks every chunk's sha256, reassembles the tar, checks it and each wheel against the manifest,
runs `pip install --no-deps --no-index --target .whl/site` and imports DALI from there. bench/gpu_suite.py puts
.whl/site on its steps' PYTHONPATH when it exists. docs/development.md lists the calls.

  python tools/stage_wheels.py prepare                  # here: download, bundle, split; prints the device calls
  python tools/stage_wheels.py receive                  # device: which chunks arrived intact, which are missing
  python tools/stage_wheels.py install                  # device: reassemble, verify, install, import check
  python tools/stage_wheels.py split A.whl B.whl --dest DIR --chunk-mib 50   # bundle + split given files only

Exit status: 0 done; 1 a chunk, the bundle or a wheel is missing or corrupt (the message names it and says which
call to repeat), or the install or import check failed; 2 bad arguments.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE, SITE, DATA = ROOT / ".whl" / "stage", ROOT / ".whl" / "site", ROOT / ".whl" / "data"
MiB = 2 ** 20
CALL_LIMIT_MIB = 64            # the device tool's limit per call: working tree + carried paths
DALI = "nvidia-dali-cuda130"
# Dependencies pip resolves for DALI that are not staged: already on the device (torch and maect need them; a
# second numpy on PYTHONPATH would shadow the one torch was built against) or codecs the JPEG pipeline never loads
# (DALI dlopens them only for nvCOMP inflate, TIFF and JPEG 2000). --keep NAME stages one anyway.
NOT_STAGED = {"numpy", "packaging", "typing-extensions", "typing_extensions", "wheel", "setuptools", "pyyaml",
              "nvidia-libnvcomp-cu13", "nvidia-nvtiff-cu13", "nvidia-nvjpeg2k-cu13"}
FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"      # maect.dataloading.datasets.FASHION_MNIST_ROOT
FMNIST_TEST = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


class StageError(Exception):
    """A missing or corrupt piece, or a failed install: the message says what and what to do."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def tree_mib(root: Path = ROOT) -> float:
    """MiB the device tool copies anyway: tracked files plus untracked ones git does not ignore."""
    try:
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                               capture_output=True, timeout=60).stdout.decode().split("\0")
    except Exception:          # not a git checkout: assume a small tree
        return 1.0
    return sum((root / n).stat().st_size for n in names if n and (root / n).is_file()) / MiB


def auto_chunk_mib() -> float:
    """The largest chunk that still fits one call with the working tree and the manifest (2 MiB margin)."""
    return max(1.0, min(60.0, CALL_LIMIT_MIB - tree_mib() - 2.0))


def wheel_project(name: str) -> str:
    """'nvidia_dali_cuda130-2.4.0-py3-none-....whl' -> 'nvidia-dali-cuda130' (PEP 503 normalised)."""
    return name.split("-")[0].replace("_", "-").lower()


# ---------------------------------------------------------------------------------------------- here: prepare
def download(dest: Path, python_version: str, platforms: list[str], version: str | None, keep: set[str]) -> list[Path]:
    """pip download DALI and its dependencies as the device's wheels into dest; returns the wheels to stage."""
    if version is None:
        try:
            from importlib.metadata import version as installed
            version = installed(DALI)          # the version the CPU tests here run against
        except Exception:
            version = None
    spec = f"{DALI}=={version}" if version else DALI
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", str(dest), spec]
    for p in platforms:
        cmd += ["--platform", p]
    print("stage: " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise StageError(f"pip download failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    wheels = sorted(dest.glob("*.whl"))
    skip = {n.lower() for n in NOT_STAGED} - {k.lower() for k in keep}
    staged = [w for w in wheels if wheel_project(w.name) not in skip]
    for w in wheels:
        if w not in staged:
            print(f"stage: not staging {w.name} ({wheel_project(w.name)} is in NOT_STAGED; --keep to stage it)")
    return staged


def split(files: dict[str, Path], dest: Path, chunk_mib: float) -> dict:
    """Pack files ({name in bundle: path}; wheels under wheels/, anything else under data/) into dest/bundle.tar,
    split it into dest/bundle.partNN of chunk_mib MiB, write dest/manifest.json and return it. The tar is deleted:
    only the chunks travel."""
    if chunk_mib <= 0:
        raise StageError(f"--chunk-mib must be > 0, got {chunk_mib}")
    dest.mkdir(parents=True, exist_ok=True)
    for old in list(dest.glob("bundle.part*")) + [dest / "manifest.json"]:
        old.unlink(missing_ok=True)
    bundle = dest / "bundle.tar"
    members = []
    with tarfile.open(bundle, "w") as tar:          # no compression: wheels are zip files already
        for name, path in files.items():
            tar.add(path, arcname=name)
            members.append({"name": name, "size": path.stat().st_size, "sha256": sha256(path)})
    size, step = bundle.stat().st_size, max(1, int(chunk_mib * MiB))
    chunks = []
    with open(bundle, "rb") as f:
        for k in range(1, -(-size // step) + 1):
            part = dest / f"bundle.part{k:02d}"
            part.write_bytes(f.read(step))
            chunks.append({"name": part.name, "size": part.stat().st_size, "sha256": sha256(part)})
    manifest = {"format": 1, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "chunk_mib": chunk_mib,
                "bundle": {"name": bundle.name, "size": size, "sha256": sha256(bundle)},
                "chunks": chunks, "members": members}
    bundle.unlink()
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def plan(dest: Path, manifest: dict, site: Path = SITE) -> list[str]:
    """The device calls, one line each: what to carry and what to run."""
    rel = lambda p: os.path.relpath(p, ROOT)        # noqa: E731
    man = rel(dest / "manifest.json")
    lines, n = [], len(manifest["chunks"])
    for k, c in enumerate(manifest["chunks"], 1):
        cmd = (f"python tools/stage_wheels.py receive --dest {rel(dest)}" if k < n else
               f"python tools/stage_wheels.py install --dest {rel(dest)} --target {rel(site)} && "
               "python bench/gpu_suite.py --out bench/results/gpu_suite_<gpu>_<date>.json")
        lines.append(f"call {k}/{n}: carry [{man!r}, {rel(dest / c['name'])!r}] ({c['size'] / MiB:.1f} MiB); "
                     f"run: {cmd}")
    return lines


# ------------------------------------------------------------------------------------------ device: receive
def load_manifest(dest: Path) -> dict:
    path = dest / "manifest.json"
    if not path.exists():
        raise StageError(f"{path} not found: carry it with every call (python tools/stage_wheels.py prepare makes it)")
    return json.loads(path.read_text())


def check_chunks(dest: Path, manifest: dict) -> tuple[list[str], list[str], list[str]]:
    """(intact, missing, corrupt) chunk names; corrupt ones are described with sizes and hashes."""
    ok, missing, bad = [], [], []
    for c in manifest["chunks"]:
        p = dest / c["name"]
        if not p.exists():
            missing.append(c["name"])
        elif p.stat().st_size != c["size"] or sha256(p) != c["sha256"]:
            bad.append(f"{c['name']} ({p.stat().st_size} bytes, sha256 {sha256(p)[:12]}; the manifest says "
                       f"{c['size']} bytes, {c['sha256'][:12]})")
        else:
            ok.append(c["name"])
    return ok, missing, bad


def receive(dest: Path) -> int:
    manifest = load_manifest(dest)
    ok, missing, bad = check_chunks(dest, manifest)
    n = len(manifest["chunks"])
    print(f"stage: {len(ok)}/{n} chunks intact in {dest}" + (f"; missing: {', '.join(missing)}" if missing else "")
          + ("; all present: run install" if len(ok) == n else ""))
    if bad:
        print(f"stage: corrupt: {'; '.join(bad)}: carry these chunks again", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------ device: install
def assemble(dest: Path, manifest: dict, out_dir: Path) -> dict[str, Path]:
    """Check the chunks, join them, check the bundle, unpack it into out_dir and check every member.
    Returns {member name: path}. Raises StageError naming the first missing or corrupt piece."""
    ok, missing, bad = check_chunks(dest, manifest)
    if missing or bad:
        what = (f"missing chunks {', '.join(missing)}" if missing else "") + ("; " if missing and bad else "") + \
               (f"corrupt chunks: {'; '.join(bad)}" if bad else "")
        raise StageError(f"cannot assemble {dest / manifest['bundle']['name']}: {what}. Carry them again (the machine "
                         f"keeps carried files only while it stays warm); `receive` lists what is present")
    bundle = dest / manifest["bundle"]["name"]
    with open(bundle, "wb") as f:
        for c in manifest["chunks"]:
            with open(dest / c["name"], "rb") as part:
                shutil.copyfileobj(part, f, MiB)
    got = sha256(bundle)
    if got != manifest["bundle"]["sha256"]:
        raise StageError(f"{bundle}: sha256 {got[:12]} after joining intact chunks, the manifest says "
                         f"{manifest['bundle']['sha256'][:12]}: the manifest and the chunks come from different "
                         "prepare runs; carry manifest.json and the chunks of one run")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    with tarfile.open(bundle) as tar:
        for m in tar.getmembers():
            if not m.isfile() or m.name.startswith(("/", "..")) or "/../" in m.name:
                raise StageError(f"{bundle}: unexpected member {m.name!r}")
        tar.extractall(out_dir, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    bundle.unlink()
    paths = {}
    for m in manifest["members"]:
        p = out_dir / m["name"]
        if not p.exists() or sha256(p) != m["sha256"]:
            raise StageError(f"{p}: missing or sha256 differs from the manifest after unpacking")
        paths[m["name"]] = p
    return paths


def pip_install(wheels: list[Path], target: Path) -> str:
    """pip install --no-deps --no-index --target; where pip itself is missing, unpack the wheels (a wheel is a zip
    laid out for site-packages). Returns the method used."""
    target.mkdir(parents=True, exist_ok=True)
    have_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if have_pip:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile", "--upgrade",
               "--disable-pip-version-check", "--target", str(target), *map(str, wheels)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise StageError(f"pip install failed (exit {r.returncode}): {r.stderr.strip()[-800:]}")
        return "pip install --no-deps --target"
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(target)
        for data in target.glob("*.data"):            # purelib / platlib payloads belong at the top level
            for sub in ("purelib", "platlib"):
                if (data / sub).is_dir():
                    shutil.copytree(data / sub, target, dirs_exist_ok=True)
            shutil.rmtree(data)
    return "unzip (no pip on this machine)"


def import_check(target: Path, module: str) -> str:
    """Import `module` in a fresh interpreter with target first on PYTHONPATH; returns its version and path."""
    code = (f"import importlib; m = importlib.import_module({module!r}); "
            "print(getattr(m, '__version__', '?'), m.__file__)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        raise StageError(f"installed into {target}, but `import {module}` fails: {last} (a module the device lacks: "
                         "prepare again with --keep NAME)")
    return r.stdout.strip()


def install(dest: Path, target: Path, data_dir: Path, check_module: str | None = "nvidia.dali") -> dict:
    """Assemble, verify, install the wheels into target, copy data members into data_dir, check the import."""
    t0 = time.perf_counter()
    manifest = load_manifest(dest)
    paths = assemble(dest, manifest, dest / "unpacked")
    wheels = [p for n, p in paths.items() if n.startswith("wheels/")]
    method = pip_install(wheels, target) if wheels else "nothing to install"
    for n, p in paths.items():
        if n.startswith("data/"):
            out = data_dir / n[len("data/"):]
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, out)
    shutil.rmtree(dest / "unpacked")
    res = {"target": str(target), "wheels": [p.name for p in wheels], "method": method,
           "data": [n[len("data/"):] for n in paths if n.startswith("data/")]}
    if check_module:
        res["import"] = import_check(target, check_module)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def status(dest: Path = STAGE, target: Path = SITE) -> dict:
    """What is staged and installed here (for gpu_suite's record); never raises."""
    out = {"stage": str(dest), "installed": target.is_dir() and any(target.iterdir())}
    try:
        manifest = load_manifest(dest)
        ok, missing, bad = check_chunks(dest, manifest)
        out.update(chunks=len(manifest["chunks"]), intact=len(ok), missing=missing, corrupt=bad)
    except StageError as e:
        out["manifest"] = str(e)
    return out


def fake_wheel(folder: Path, name: str = "maect_stage_probe", version: str = "0.1") -> Path:
    """A minimal valid wheel (one module, dist-info with RECORD) for tests and the suite's dry run."""
    files = {f"{name}/__init__.py": f"__version__ = {version!r}\n",
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: maect\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n"}
    record = "".join(f"{n},,\n" for n in files) + f"{name}-{version}.dist-info/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for n, text in files.items():
            z.writestr(n, text)
        z.writestr(f"{name}-{version}.dist-info/RECORD", record)
    path.write_bytes(buf.getvalue())
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="here: download the device's wheels, bundle and split them")
    pr.add_argument("--python-version", default="3.12", help="the device's Python (default 3.12)")
    pr.add_argument("--platform", action="append", default=None,
                    help="wheel platform tags (default: manylinux_2_28/2_27/2_17/2014 x86_64)")
    pr.add_argument("--dali-version", default=None, help="default: the version installed here, else the newest")
    pr.add_argument("--keep", action="append", default=[], help="stage this dependency although NOT_STAGED lists it")
    pr.add_argument("--wheel", action="append", default=[], type=Path, help="stage these wheels instead of downloading")
    pr.add_argument("--add", action="append", default=[], type=Path, help="also carry this file (to .whl/data/)")
    pr.add_argument("--no-fmnist", action="store_true", help="do not add the Fashion-MNIST test split (4.4 MB)")
    sp = sub.add_parser("split", help="bundle and split the given files only")
    sp.add_argument("files", nargs="+", type=Path)
    for s in (pr, sp):
        s.add_argument("--dest", type=Path, default=STAGE)
        s.add_argument("--chunk-mib", type=float, default=None,
                       help="chunk size (default: 64 MiB per call minus the working tree minus 2, at most 60)")
    for name, hlp in (("receive", "device: check the chunks present"), ("install", "device: assemble and install")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("--dest", type=Path, default=STAGE)
        if name == "install":
            s.add_argument("--target", type=Path, default=SITE)
            s.add_argument("--data-dir", type=Path, default=DATA)
            s.add_argument("--check-import", default="nvidia.dali", help="module to import afterwards ('' : none)")
    a = p.parse_args(argv)
    try:
        if a.cmd == "receive":
            return receive(a.dest)
        if a.cmd == "install":
            res = install(a.dest, a.target, a.data_dir, a.check_import or None)
            print(f"stage: installed {len(res['wheels'])} wheels into {res['target']} ({res['method']}, "
                  f"{res['seconds']} s); data: {res['data']}; import: {res.get('import', '-')}")
            return 0
        chunk = a.chunk_mib or auto_chunk_mib()
        if a.cmd == "split":
            files = {f"{'wheels' if f.suffix == '.whl' else 'data'}/{f.name}": f for f in a.files}
        else:
            wheels = a.wheel or download(STAGE.parent / "download", a.python_version, a.platform or [
                "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"],
                a.dali_version, set(a.keep))
            files = {f"wheels/{w.name}": w for w in wheels}
            files.update({f"data/{f.name}": f for f in a.add})
            fm = Path(FMNIST_ROOT)
            if not a.no_fmnist and all((fm / n).exists() for n in FMNIST_TEST):
                files.update({f"data/fashion-mnist/{n}": fm / n for n in FMNIST_TEST})
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise StageError(f"not a file: {', '.join(missing)}")
        manifest = split(files, a.dest, chunk)
        total = sum(c["size"] for c in manifest["chunks"]) / MiB
        print(f"stage: {len(files)} files, {total:.1f} MiB in {len(manifest['chunks'])} chunks of <= {chunk:.1f} MiB "
              f"under {a.dest} (working tree {tree_mib():.1f} MiB travels with each call). Device calls, back to "
              "back (a machine idle for long goes back, and the chunks with it):")
        print("\n".join("  " + line for line in plan(a.dest, manifest)))
        return 0
    except StageError as e:
        print(f"stage_wheels: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
