#!/usr/bin/env bash
# The main job on a fresh machine: set up, show the build, run the demo.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck disable=SC1091
source scripts/setup.sh
python -m repkern info
python -m repkern demo "$@"
