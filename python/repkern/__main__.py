"""Command line: ``repkern info | demo | bench`` (also ``python -m repkern ...``)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _info(args) -> int:
    """Build, CPU level, GPUs and whether the build runs on them; exit 2 if a setting is unusable."""
    from repkern import _info

    info = _info.collect()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(_info.format_text(info))
    return 2 if info["errors"] else 0


def _demo(args) -> int:
    """The workflows on all-MiniLM-L6-v2 or --model (see repkern.demo); needs the `demo` extra."""
    from repkern import demo

    missing = demo.missing_requirements(args.model)
    if missing:
        print(f"repkern demo needs the `demo` extra ({', '.join(missing)} missing). Install it with:\n"
              f"  {demo.INSTALL_COMMAND}", file=sys.stderr)
        return 1
    print(f"repkern demo ({'quick' if args.quick else 'full'}): {args.model or demo.DEFAULT_MODEL} on Python "
          f"standard-library docstrings, writing to {os.path.abspath(args.out)}")
    report = demo.run(args.out, quick=args.quick, progress=not args.no_progress, model=args.model)
    print(f"report: {os.path.abspath(report)}")
    return 0


def _bench(args) -> int:
    from repkern.bench import cli

    return cli.run_command(args)


def _selftest(args) -> int:
    """Every op on the device against repkern.reference (see repkern.selftest): 0 all passed, 1 a check
    failed, 2 the device cannot run here."""
    from repkern import selftest

    return selftest.main(args.device, quick=args.quick, as_json=args.json)


def main(argv=None) -> int:
    from repkern.bench import cli as bench_cli

    parser = argparse.ArgumentParser(prog="repkern", description="Fast kernels for representation analysis")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="build configuration, CPU level, GPUs and whether this build runs on them")
    info.add_argument("--json", action="store_true", help="print the same as JSON")
    info.set_defaults(fn=_info)
    demo = sub.add_parser("demo", help="CKA, sparsity and an SAE on a real pretrained model (needs the demo extra)")
    demo.add_argument("--quick", action="store_true", help="a much smaller run (CI)")
    demo.add_argument("--out", default="repkern-demo", help="output folder (default: ./repkern-demo)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--model", metavar="NAME_OR_PATH",
                      help="another BERT-style encoder: a save_pretrained folder or a Hugging Face name in the "
                           "local cache (default: the packaged all-MiniLM-L6-v2, offline)")
    demo.set_defaults(fn=_demo)
    bench_parser = sub.add_parser("bench", help="benchmarks against the pure-PyTorch reference")
    bench_cli.add_arguments(bench_parser)
    bench_parser.set_defaults(fn=_bench)
    selftest_parser = sub.add_parser("selftest", help="every op on this device against the pure-PyTorch reference")
    selftest_parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                                 help="cpu, cuda (exit status 2 without a GPU and a CUDA build), or all (default: "
                                      "cpu, plus cuda when present)")
    selftest_parser.add_argument("--quick", action="store_true", help="smallest shapes, fewer variants and dtypes")
    selftest_parser.add_argument("--json", action="store_true", help="print the table as JSON")
    selftest_parser.set_defaults(fn=_selftest)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
