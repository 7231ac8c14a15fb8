#!/usr/bin/env bash
# Set up qvit on a fresh Debian/Ubuntu machine: the embedded Fashion-MNIST data (Debian package
# dataset-fashion-mnist) and a virtual environment in .venv with qvit installed in editable mode.
#   bash scripts/setup.sh          # runtime only
#   bash scripts/setup.sh --test   # plus the test extras
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else sudo=""; fi
    if [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; then
        echo "installing the embedded data set (dataset-fashion-mnist)"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "warning: cannot install dataset-fashion-mnist (not root, no sudo); run: apt-get install -y dataset-fashion-mnist" >&2
    fi
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e ".${extras}"
echo "qvit is installed in .venv ($(.venv/bin/python -c 'import qvit, torch, timm; print(f"qvit {qvit.__version__}, torch {torch.__version__}, timm {timm.__version__}")'))"
