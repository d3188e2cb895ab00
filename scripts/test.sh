#!/usr/bin/env bash
# The test command: sets everything up on a fresh machine, then
#  1. builds repkern strict (warnings are errors) with the CPU kernels at every instruction-set level and
#     the CUDA kernels: for the visible GPU when there is one (the `cuda` test backend then runs on it),
#     else for sm_80 and sm_90a as a compile check (spills and local memory are errors too); reports
#     registers/shared memory per kernel and the SASS load widths (no LDL/STL allowed);
#  2. cross-compiles the CPU kernels and bindings for aarch64 (strict) where aarch64-linux-gnu-g++ exists;
#  3. runs the emulator smoke tests against an AddressSanitizer+UBSan build of repkern._emu;
#  4. runs the whole test suite: every CPU kernel test once per instruction-set level this CPU runs, the
#     CUDA kernels through the emulator, the copies on emulated CPUs without AVX-512/AVX (qemu-user, where
#     installed); the `demo` extra is installed and required, so the suite also runs
#     `repkern demo --quick` on the real model (tests/test_cli.py);
#  5. runs `repkern selftest` (every public op against the reference) on the CPU kernels, on the emulated
#     CUDA kernels, and (--quick) on emulated CPUs without AVX-512 and without AVX where qemu-user exists.
# Right after the build report it builds the documentation (docs/, Sphinx; the `docs` extra) with warnings
# as errors, so a docstring that breaks the API reference fails the tests.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [ -z "${REPKERN_CUDA_ARCHS:-}" ] && ! nvidia-smi -L > /dev/null 2>&1; then
  export REPKERN_CUDA_ARCHS="80-real;90a-real"  # no GPU: compile for two architectures as a check
fi
export REPKERN_STRICT=ON
export REPKERN_EMU=ON
# shellcheck disable=SC1091
source scripts/setup.sh test,demo,docs
export REPKERN_REQUIRE_DEMO=1
# The SAE packages of the parity tests (the `parity` extra), with torch held at the installed build. A failed
# install is reported and tests/test_sae_parity.py then skips, naming the missing package.
echo "torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')" > build/torch-constraint.txt
PARITY=$(python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["parity"])' \
  2>/dev/null || true)  # tomllib: Python >= 3.11
# shellcheck disable=SC2086
if [ -z "$PARITY" ] || ! python -m pip install -q -c build/torch-constraint.txt $PARITY; then
  echo "WARNING: the SAE parity packages did not install; tests/test_sae_parity.py will skip"
fi
# dictionary-learning (through nnsight) pulls a torchvision built for another torch: its operators fail to load
# and break transformers' model imports. Nothing here needs torchvision.
python -m pip uninstall -y -q torchvision 2>/dev/null || true
python -m pip install -q "pybind11>=2.12" "cmake>=3.26" ninja nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
PYBIND11_DIR=$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')

python -m repkern info

echo "== CUDA build report"
python scripts/check_cuda_build.py --log build/pip-install.log

echo "== docs (Sphinx, warnings are errors)"
# -E: read every page again (the API pages depend on the installed docstrings, which Sphinx does not track)
python -m sphinx -E -W --keep-going -b html docs build/docs

echo "== aarch64 cross-build of the CPU kernels and bindings (strict)"
if command -v aarch64-linux-gnu-g++ > /dev/null; then
  cmake -S . -B build/aarch64 -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_SYSTEM_NAME=Linux \
    -DCMAKE_SYSTEM_PROCESSOR=aarch64 -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ -DREPKERN_CUDA=OFF -DREPKERN_EMU=OFF \
    -DPython_EXECUTABLE="$(command -v python)" \
    -DPython_INCLUDE_DIR="$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
    -Dpybind11_DIR="$PYBIND11_DIR" > build/aarch64-configure.log 2>&1 || { tail -n 40 build/aarch64-configure.log; exit 1; }
  cmake --build build/aarch64 > build/aarch64-build.log 2>&1 || { tail -n 40 build/aarch64-build.log; exit 1; }
  echo "ok: $(file -b build/aarch64/_C*.so | cut -d, -f1-2)"
else
  echo "skipped: no aarch64-linux-gnu-g++ (Debian: apt-get install g++-aarch64-linux-gnu)"
fi

echo "== emulator under AddressSanitizer + UBSan (smoke subset)"
cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DREPKERN_CUDA=OFF -DREPKERN_EMU=ON \
  -DREPKERN_EMU_SANITIZE=ON -Dpybind11_DIR="$PYBIND11_DIR" > build/asan-configure.log
cmake --build build/asan --target _emu > build/asan-build.log 2>&1 || { tail -n 40 build/asan-build.log; exit 1; }
ASAN_OPTIONS=detect_leaks=0 \
  LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
  REPKERN_EMU_LIBRARY="$(ls "$ROOT"/build/asan/_emu*.so)" \
  python -m pytest -q -p no:cacheprovider -m emu_smoke tests

echo "== test suite"
python -m pytest -q tests "$@"

echo "== repkern selftest: CPU kernels, then the CUDA kernels on the emulator"
python -m repkern selftest --device cpu
REPKERN_BACKEND=emu python -m repkern selftest --device cpu --quick

echo "== repkern selftest --quick on emulated CPUs: AMD Zen 3 (AVX2, no AVX-512), Intel Nehalem (SSE4.2, no AVX)"
if command -v qemu-x86_64 > /dev/null && [ "$(uname -m)" = x86_64 ]; then
  for model in EPYC-Milan Nehalem; do
    log="build/selftest-qemu-$model.log"
    if ! qemu-x86_64 -cpu "$model" "$(command -v python)" -m repkern selftest --device cpu --quick > "$log" 2>&1; then
      grep -v "TCG doesn't support" "$log" | tail -n 60
      exit 1
    fi
    echo "qemu -cpu $model: backend $(grep -v "TCG doesn't" "$log" | awk 'NR == 4 {print $5}'); $(tail -n 1 "$log")"
  done
else
  echo "skipped: no qemu-x86_64 (Debian: apt-get install qemu-user)"
fi
