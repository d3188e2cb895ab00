# Sourced by scripts/test.sh and scripts/demo.sh: makes .venv, installs torch
# and repkern (built from this tree) with the given extras, and activates it.
#   source scripts/setup.sh [extras]
# REPKERN_CUDA / REPKERN_CUDA_ARCHS / REPKERN_STRICT are read by the build.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EXTRAS=${1-}
VENV=${REPKERN_VENV:-$ROOT/.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# torch first: an unpinned requirement would pull a multi-GB CUDA build on a machine without one.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
mkdir -p "$ROOT/build"
echo "building repkern (log: build/pip-install.log)"
TARGET=$ROOT${EXTRAS:+[$EXTRAS]}
if ! python -m pip install -v "$TARGET" -Cbuild-dir="$ROOT/build/pip-{wheel_tag}" > "$ROOT/build/pip-install.log" 2>&1; then
  tail -n 60 "$ROOT/build/pip-install.log"
  echo "repkern: build failed (full log: build/pip-install.log)" >&2
  exit 1
fi
