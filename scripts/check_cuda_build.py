"""Static evidence for the CUDA kernels (docs/design.md, GPU performance), printed into the CI log:
per kernel and architecture, registers / shared memory / spills from ptxas -v
(in the build log) with the theoretical occupancy they allow (block sizes from the kernels'
`__launch_bounds__`), and from the SASS of the installed module the global load
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = os.path.join(ROOT, "csrc", "cuda")

# Per-SM limits (CUDA C++ Programming Guide, compute capabilities table; cuda_occupancy.h): registers,
# resident threads and blocks, shared memory usable by blocks (the largest carveout), the register
# allocation unit per warp, the shared memory granularity and the per-block reservation (sm_80 and later).
SM_LIMITS = {
    "sm_80": {"regs": 65536, "threads": 2048, "blocks": 32, "smem": 164 * 1024},
    "sm_90": {"regs": 65536, "threads": 2048, "blocks": 32, "smem": 228 * 1024},
}
REG_UNIT = 256  # registers are allocated per warp in units of 256
SUB_PARTITIONS = 4  # each quarter of the register file serves the warps of one scheduler
SMEM_UNIT = 128
SMEM_RESERVED = 1024

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


def limits(arch: str) -> dict:
    """SM_LIMITS of an architecture name as ptxas prints it ("sm_90a" is sm_90)."""
    return SM_LIMITS[re.match(r"sm_\d+", arch).group(0)]


def occupancy(arch: str, regs: int, smem: int, threads: int) -> tuple[float, str]:
    """(resident warps / the SM's maximum warps, the limiting resource) for a kernel using `regs`
    registers per thread and `smem` bytes of static shared memory per block of `threads` threads."""
    lim = limits(arch)
    warps = -(-threads // 32)
    regs_per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
    by_regs = (lim["regs"] // SUB_PARTITIONS // regs_per_warp) * SUB_PARTITIONS // warps if regs else lim["blocks"]
    smem_per_block = -(-smem // SMEM_UNIT) * SMEM_UNIT + SMEM_RESERVED
    candidates = {"threads": lim["threads"] // (warps * 32), "blocks": lim["blocks"], "registers": by_regs,
                  "shared memory": lim["smem"] // smem_per_block}  # on a tie the first is named
    limiter = min(candidates, key=candidates.get)
    return candidates[limiter] * warps / (lim["threads"] // 32), limiter


def launch_bounds(source_dir: str = CUDA_SOURCES) -> dict:
    """{kernel name: threads per block} from the `__launch_bounds__` of every kernel in source_dir's .cu
    files; the first argument is evaluated with the file's integer `constexpr` constants."""
    constant = re.compile(r"^constexpr int (k\w+) = ([^;]+);", re.M)
    bounds = re.compile(r"__global__ void __launch_bounds__\(([^,)]+)[^)]*\)\s*(\w+)\(")
    out = {}
    for path in sorted(glob.glob(os.path.join(source_dir, "*.cu"))):
        with open(path) as f:
            text = f.read()
        names = {}
        for name, expr in constant.findall(text):
            if set(re.findall(r"[A-Za-z_]\w*", expr)) <= set(names):  # arithmetic on earlier constants only
                names[name] = eval(expr, {"__builtins__": {}}, names)  # noqa: S307
        for expr, kernel in bounds.findall(text):
            out[kernel] = eval(expr, {"__builtins__": {}}, names)  # noqa: S307
    return out


def parse_ptxas(lines) -> list[list]:
    """[mangled name, arch, registers, smem bytes, spill text] per kernel build in ptxas -v output."""
    compiling = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
    used = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")  # ptxas omits smem when a kernel has none
    spill = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
    rows, current = [], None
    for line in lines:
        if m := compiling.search(line):
            current = [m.group(1), m.group(2), None, None, None]
            rows.append(current)
        elif current and (m := spill.search(line)):
            current[4] = f"stack {m.group(1)} B, spills {m.group(2)}/{m.group(3)} B"
        elif current and (m := used.search(line)):
            current[2], current[3] = int(m.group(1)), int(m.group(2) or 0)
    return rows


def ptxas_report(log_path: str, block_sizes: dict) -> int:
    with open(log_path, errors="replace") as f:
        rows = parse_ptxas(f)
    if not rows:
        print("ptxas: no kernel report in the build log (CUDA not compiled?)")
        return 0
    names = demangle(sorted({r[0] for r in rows}))
    print(f"ptxas -v: {len(rows)} kernel builds (occupancy: theoretical, resident warps / maximum, and its limit)")
    missing = set()
    for mangled, arch, regs, smem, spills in rows:
        name = short(names[mangled])
        threads = block_sizes.get(name.split("<")[0])
        if threads is None:
            missing.add(name.split("<")[0])
            occ = "no __launch_bounds__"
        else:
            share, limiter = occupancy(arch, regs, smem, threads)
            occ = f"{threads} threads, occupancy {100 * share:3.0f}% ({limiter})"
        print(f"  {arch:<7} regs {regs:>3}  smem {smem:>6} B  {spills}  {occ}  {name}")
    if missing:
        print(f"FAIL: no __launch_bounds__ found in {CUDA_SOURCES} for {', '.join(sorted(missing))}")
        return 1
    return 0


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
    failed = ptxas_report(args.log, launch_bounds()) if args.log else 0
    return sass_report(_native._C.__file__) or failed


if __name__ == "__main__":
    sys.exit(main())
