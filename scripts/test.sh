#!/usr/bin/env bash
# The test command: sets everything up on a fresh machine, then
#  1. builds repkern with the CUDA kernels for sm_80 and sm_90a (warnings, spills
#     and local memory are errors) and reports registers/shared memory per kernel
#     and the SASS load widths (no LDL/STL allowed);
#  2. runs the emulator smoke tests against an AddressSanitizer+UBSan build of repkern._emu;
#  3. runs the whole test suite; the `demo` extra is installed and required, so the suite
#     also runs `repkern demo --quick` on the real model (tests/test_cli.py).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export REPKERN_CUDA_ARCHS="${REPKERN_CUDA_ARCHS:-80-real;90a-real}"
export REPKERN_STRICT=ON
# shellcheck disable=SC1091
source scripts/setup.sh test,demo
export REPKERN_REQUIRE_DEMO=1
python -m pip install -q "pybind11>=2.12" "cmake>=3.26" ninja nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm

echo "== CUDA build report"
python scripts/check_cuda_build.py --log build/pip-install.log

echo "== emulator under AddressSanitizer + UBSan (smoke subset)"
cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DREPKERN_CUDA=OFF -DREPKERN_EMU_SANITIZE=ON \
  -Dpybind11_DIR="$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')" > build/asan-configure.log
cmake --build build/asan --target _emu > build/asan-build.log 2>&1 || { tail -n 40 build/asan-build.log; exit 1; }
ASAN_OPTIONS=detect_leaks=0 \
  LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
  REPKERN_EMU_LIBRARY="$(ls "$ROOT"/build/asan/_emu*.so)" \
  python -m pytest -q -p no:cacheprovider -m emu_smoke tests

echo "== test suite"
python -m pytest -q tests "$@"
