# Shared by scripts/serve and scripts/test: make .venv (or $VENV) and install the project into it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
  "$PY" -m pip install --quiet --upgrade pip
fi
install_project() {  # $1: extras, e.g. "[dev]"
  "$PY" -m pip install --quiet --disable-pip-version-check -e ".${1:-}"
}
