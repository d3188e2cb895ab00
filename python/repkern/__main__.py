"""Command line: ``repkern info | demo | bench`` (also ``python -m repkern ...``)."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _info(_args) -> int:
    import repkern

    info = repkern.build_info()
    print(f"repkern {info['version']} (torch {info['torch']})")
    if info["cuda"]:
        print(f"  CUDA kernels: compiled with nvcc {info['cuda_compiler']} for {info['cuda_archs']}")
    else:
        print("  CUDA kernels: not compiled (no nvcc at build time)")
    print(f"  CPU kernels:  {info['cxx_compiler']}, -march={info['cpu_arch'] or 'default'}")
    print(f"  emulator:     {'repkern._emu present' if info['emulator'] else 'absent'}")
    devices = info["cuda_devices"]
    print(f"  devices:      cpu ({os.cpu_count()} cores)" + "".join(f", cuda:{i} {d}" for i, d in enumerate(devices)))
    return 0


def _demo(args) -> int:
    """Small Gram demo: each kernel on random activations, checked against the
    reference, timed, and one CUDA kernel run through the emulator."""
    import torch

    import repkern
    from repkern import reference

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() and repkern.build_info()["cuda"] else "cpu")
    n, d = (256, 64) if args.quick else (2048, 256)
    x = torch.randn(n, d, device=device)
    print(f"Gram matrices of {n} samples × {d} features (float32, {device}):")
    for kernel, kwargs in [("linear", {}), ("cosine", {}), ("rbf", {}), ("rbf", {"center": True})]:
        label = kernel + (" centered" if kwargs else "")
        t0 = time.perf_counter()
        k = repkern.gram(x, kernel, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        ref = reference.gram(x, kernel, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        err = (k - ref).abs().max().item()
        print(f"  {label:<13} repkern {1e3 * (t1 - t0):8.2f} ms   reference {1e3 * (t2 - t1):8.2f} ms   "
              f"max |diff| {err:.2e}   symmetric: {bool(torch.equal(k, k.mT))}")
    if repkern.build_info()["emulator"]:
        os.environ["REPKERN_BACKEND"] = "emu"
        xs = torch.randn(70, 9)
        k = repkern.gram(xs, "rbf")
        err = (k - reference.gram(xs, "rbf")).abs().max().item()
        os.environ.pop("REPKERN_BACKEND")
        print(f"CUDA Gram kernel on the CPU emulator (70 × 9, rbf): max |diff| vs reference {err:.2e}")
    return 0


def _bench(args) -> int:
    from repkern import bench

    if args.csv:
        os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
    bench.run(args.op or bench.SUITES, quick=args.quick, csv_path=args.csv)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="repkern", description="Fast kernels for representation analysis")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="build configuration and visible devices").set_defaults(fn=_info)
    demo = sub.add_parser("demo", help="small Gram demo, checked against the reference")
    demo.add_argument("--quick", action="store_true", help="smaller problem")
    demo.set_defaults(fn=_demo)
    bench_parser = sub.add_parser("bench", help="benchmarks against the pure-PyTorch reference")
    bench_parser.add_argument("--op", action="append", help="suite to run (repeatable); default: all")
    bench_parser.add_argument("--quick", action="store_true", help="small shapes only")
    bench_parser.add_argument("--csv", default="bench_results/bench.csv", help="CSV output path")
    bench_parser.set_defaults(fn=_bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
