#!/usr/bin/env bash
# Install robustprune on a Jetson without replacing JetPack's PyTorch.
#
#   deploy_examples/jetson/install.sh [SOURCE]     (default: this checkout)
#
# A plain `pip install .` satisfies robustprune's torch and torchvision requirements from PyPI
# when the installed ones do not fit: PyPI's torchvision pins an exact torch, and PyPI's aarch64
# torch is not JetPack's CUDA build, so pip would replace it. This script pins the torch and
# torchvision already installed as pip constraints: pip then keeps them, or stops with a
# resolution error naming the conflict; it never swaps them for PyPI's builds. Install
# JetPack's PyTorch and a torchvision built for it first (NVIDIA's Jetson wheels, or torchvision
# from source). TensorRT's Python bindings come with JetPack.
# Exit codes: 0 installed, 1 torch or torchvision missing, pip's own code if pip fails.
set -euo pipefail
source_dir=${1:-$(cd "$(dirname "$0")/../.." && pwd)}
python=${PYTHON:-python3}
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT

"$python" - "$constraints" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

pins = []
for name in ("torch", "torchvision"):
    try:
        pins.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.stderr.write(
            f"install.sh: {name} is not installed; install JetPack's PyTorch and a torchvision built "
            "for it first, so pip does not bring PyPI's builds in their place\n"
        )
        sys.exit(1)
with open(sys.argv[1], "w") as out:
    out.write("\n".join(pins) + "\n")
print("install.sh: keeping " + ", ".join(pins))
PY

"$python" -m pip install --constraint "$constraints" "$source_dir"
"$python" -c "import torch, torchvision; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| CUDA', torch.cuda.is_available())"
