# Shared by scripts/serve and scripts/test: make .venv (or $VENV) and install the project into it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
  "$PY" -m pip install --quiet --upgrade pip
fi
install_project() {  # $1: extras: "[server]" to serve, "[dev]" (server included) to test
  "$PY" -m pip install --quiet --disable-pip-version-check -e ".${1:-}"
}
# The stock SAM 2 / SAM 3 processors need torchvision, and PyPI's torchvision imports only beside a
# matching torch: pin a pair that imports together (a CUDA build that also runs on the CPU) unless
# this venv already has a working pair. Run it before install_project, whose plain torch range the
# pair then satisfies.
install_torch_pair() {
  "$PY" -c "import torch, torchvision" 2>/dev/null \
    || "$PY" -m pip install --quiet --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
}
