#!/usr/bin/env bash
# One-time set-up on a fresh machine (safe to re-run): the Fashion-MNIST data set and the Python packages; with the
# test extras also Debian's chromium and chromium-driver (the report's browser test opens the page in them).
#   ./setup.sh           package + test extras (pytest, scipy, scikit-learn, torchvision, timm, matplotlib, submitit,
#                        lightly, webdataset, tensorboard, wandb, selenium) + chromium, chromium-driver
#   ./setup.sh --no-test package only
# A torch already installed (e.g. a CUDA build) is kept: setup.py asks for torch>=2.10 and pip leaves a
# satisfying install alone.
set -euo pipefail
cd "$(dirname "$0")"
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "setup: installing Debian package dataset-fashion-mnist into $FMNIST"
    $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    echo "setup: no apt-get here: put the four Fashion-MNIST idx .gz files in a folder and pass data.root=DIR" >&2
  fi
fi
EXTRA="[test]"; [ "${1:-}" = "--no-test" ] && EXTRA=""
# tests/test_viz_report.py drives headless Chromium through selenium and chromedriver (never skipped: it fails
# without them)
if [ -n "$EXTRA" ] && ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "setup: installing Debian packages chromium and chromium-driver (the report's browser test)"
    $SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium chromium-driver >/dev/null; }
  else
    echo "setup: no apt-get here: install chromium and its chromedriver for tests/test_viz_report.py" >&2
  fi
fi
PY=${PYTHON:-python3}
# An editable install (PEP 660; pyproject.toml asks for setuptools>=64): its import finder maps kernels/ and
# dataloading/ to maect.kernels / maect.dataloading, as setup.py's package_dir says. The build uses the setuptools
# already here when it is >= 70.1 (no download, no 'wheel' needed); otherwise pip fetches one into an isolated
# build environment.
ISO=""; $PY -c "import setuptools as s, sys; sys.exit(tuple(map(int, s.__version__.split('.')[:2])) < (70, 1))" 2>/dev/null && ISO="--no-build-isolation"
$PY -m pip install -q --disable-pip-version-check $ISO -e ".$EXTRA" 2>&1 | grep -v "Running pip as the 'root' user" || true
if [ -n "$EXTRA" ]; then  # the DALI tests run its CPU-only pipelines; DALI is a 'gpu' extra for users, installed here
  $PY -m pip install -q --disable-pip-version-check nvidia-dali-cuda130 2>&1 | grep -v "Running pip as the 'root' user" || true
fi
$PY -c "import maect, maect.kernels, maect.dataloading, torch; print(f'setup: maect ready (torch {torch.__version__}, cuda {torch.cuda.is_available()}; maect.kernels from {maect.kernels.__file__})')"
