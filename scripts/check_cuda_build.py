"""Static evidence for the CUDA kernels (docs/design.md, GPU performance), printed into the CI log:
per kernel and architecture, registers / shared memory / spills from ptxas -v
(in the build log), and from the SASS of the installed module the global load
widths and any local-memory traffic (LDL/STL), which fails the check, as does a
kernel declared vectorized (VECTORIZED_KERNELS) without 128-bit global loads."""

from __future__ import annotations

import argparse
import collections
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import repkern
from repkern import _native

# Memory-bound kernels that must load global memory 16 bytes at a time (LDG.E.128): regular expressions
# over the short kernel names printed below. Each must match a kernel on every architecture (a renamed
# kernel fails the check instead of slipping through).
VECTORIZED_KERNELS = (
    r"features_kernel<.*, true>",  # sparsity one-read pass, 16-byte-load instantiations
    r"ordered_kernel<.*, \(Source\)1>",  # sparsity per-row sort kernel, Source::Vector
    r"replicate_rows_kernel<.*, true>",  # cka_test permutation/bootstrap rows, 16-byte-load instantiations
    r"hsic_terms_kernel<.*, true>",  # fused HSIC terms over Gram blocks, 16-byte-load instantiations
    r"knn_merge_rows_kernel<float, \d+, 4>|knn_merge_rows_kernel<double, \d+, 2>",  # kNN row merge, 16-byte tiles
)


def demangle(names):
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


def short(name: str) -> str:
    """Kernel name with template arguments, without namespaces and parameter list."""
    name = re.sub(r"repkern::(cuda::|emu_selftest::)?(\(anonymous namespace\)::)?", "", name)
    name = name.replace("repkern::", "").removeprefix("void ")
    cut = name.rfind(">(")
    return name[: cut + 1] if cut >= 0 else name.split("(")[0]


def ptxas_report(log_path: str) -> None:
    compiling = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
    used = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")  # ptxas omits smem when a kernel has none
    spill = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
    rows, current = [], None
    with open(log_path, errors="replace") as f:
        for line in f:
            if m := compiling.search(line):
                current = [m.group(1), m.group(2), None, None, None]
                rows.append(current)
            elif current and (m := spill.search(line)):
                current[4] = f"stack {m.group(1)} B, spills {m.group(2)}/{m.group(3)} B"
            elif current and (m := used.search(line)):
                current[2], current[3] = m.group(1), m.group(2) or "0"
    if not rows:
        print("ptxas: no kernel report in the build log (CUDA not compiled?)")
        return
    names = demangle(sorted({r[0] for r in rows}))
    print(f"ptxas -v: {len(rows)} kernel builds")
    for mangled, arch, regs, smem, spills in rows:
        print(f"  {arch:<7} regs {regs:>3}  smem {smem:>6} B  {spills}  {short(names[mangled])}")


def find_cuobjdump():
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations if spec else []) or []:
        for path in glob.glob(os.path.join(base, "*", "bin", "cuobjdump")):
            return path
    return shutil.which("cuobjdump")


def sass_report(module_path: str) -> int:
    tool = find_cuobjdump()
    if tool is None:
        print("cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
        return 1
    env = dict(os.environ, PATH=os.path.dirname(tool) + os.pathsep + os.environ.get("PATH", ""))
    sass = subprocess.run([tool, "-sass", module_path], capture_output=True, text=True, env=env)
    if sass.returncode != 0:
        print(sass.stderr)
        return 1
    stats = collections.OrderedDict()
    arch, func = None, None
    for line in sass.stdout.splitlines():
        if m := re.search(r"code for (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.search(r"Function : (\S+)", line):
            func = (arch, m.group(1))
            stats[func] = collections.Counter()
        elif func is not None:
            for op in re.findall(r"\b(LDG\.E(?:\.\w+)*|LDL\S*|STL\S*)", line):
                op = re.sub(r"\.(CONSTANT|EL|LU|STRONG\.\w+|SYS|GPU)\b", "", op)
                stats[func][op] += 1
    names = demangle(sorted({f for _, f in stats}))
    bad = 0
    print(f"SASS of {os.path.basename(module_path)}: {len(stats)} kernel builds")
    for (arch_name, mangled), counter in stats.items():
        local = sum(v for k, v in counter.items() if k.startswith(("LDL", "STL")))
        bad += local
        loads = ", ".join(f"{k}×{v}" for k, v in sorted(counter.items()) if k.startswith("LDG")) or "no global loads"
        flag = "  LOCAL MEMORY" if local else ""
        print(f"  {arch_name:<7} {loads:<40} {short(names[mangled])}{flag}")
    if bad:
        print("FAIL: kernels use local memory (LDL/STL)")
        return 1
    print("no local memory (LDL/STL) in any kernel")
    return vectorized_report(stats, names)


def vectorized_report(stats, names) -> int:
    archs = sorted({arch for arch, _ in stats})
    failed = False
    for pattern in VECTORIZED_KERNELS:
        for arch in archs:
            builds = [(short(names[m]), counter) for (a, m), counter in stats.items()
                      if a == arch and re.fullmatch(pattern, short(names[m]))]
            if not builds:
                print(f"FAIL: no {arch} kernel matches the vectorized pattern {pattern!r}")
                failed = True
            for name, counter in builds:
                if counter["LDG.E.128"] == 0:
                    print(f"FAIL: {arch} {name} is declared vectorized but has no LDG.E.128")
                    failed = True
    if failed:
        return 1
    print(f"128-bit global loads in every kernel declared vectorized ({len(VECTORIZED_KERNELS)} patterns, {len(archs)} archs)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--log", help="pip/cmake build log holding the ptxas -v output")
    args = parser.parse_args()
    if not repkern.build_info()["cuda"]:
        print("repkern was built without CUDA kernels: nothing to check")
        return 0
    if args.log:
        ptxas_report(args.log)
    return sass_report(_native._C.__file__)


if __name__ == "__main__":
    sys.exit(main())
