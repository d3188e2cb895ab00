"""`repkern bench`: options, checks, run, compare.

Exit status: 0 done; 2 nothing run: a file given to --compare is missing or not a bench
result, the results cannot be written where --csv says, or the device cannot be used.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

from repkern.bench import DTYPES, SUITES

DEFAULT_CSV = "bench_results/bench.csv"


def parse_device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return torch.device("cpu") if device.type == "cpu" else device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--op", action="append", choices=SUITES, help="suite to run (repeatable); default: all")
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument("--full", action="store_true",
                        help="also the largest cases (cka: tiled RBF CKA at n=32768 on a CPU, n=131072 on a GPU; "
                             "minutes)")
    parser.add_argument("--device", type=parse_device, default=None, metavar="cpu|cuda[:N]",
                        help="where to run (default: cuda if available, else cpu); a GPU selects GPU-sized cases")
    parser.add_argument("--dtype", action="append", choices=tuple(DTYPES), dest="dtypes",
                        help="run every case in this dtype (repeatable); default: each suite's own dtypes")
    parser.add_argument("--csv", default=DEFAULT_CSV,
                        help=f"CSV output path (default {DEFAULT_CSV}); the JSON (same rows + a header: device, "
                             "driver, versions, build commit, ceilings) and the plot (.png) go next to it")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="print two earlier results (CSV or JSON) side by side and exit; runs nothing")


def _fail(message: str) -> int:
    print(f"repkern bench: {message}", file=sys.stderr)
    return 2


def _device_problem(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        return f"--device {device}: CUDA is not available ({why}; torch {torch.__version__}); use --device cpu"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible"
    import repkern

    if not repkern.build_info()["cuda"] and (os.environ.get("REPKERN_BACKEND") or "auto") != "reference":
        return (f"--device {device}: this repkern was built without CUDA kernels (no nvcc at build time); "
                "rebuild with nvcc on PATH (REPKERN_CUDA=ON) or use --device cpu")
    return None


def _unwritable(paths) -> Optional[str]:
    """Why one of `paths` cannot be written (None: all can); creates their folders, leaves no new file."""
    for path in paths:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            existed = os.path.exists(path)
            with open(path, "a"):
                pass
            if not existed:
                os.remove(path)
        except OSError as exc:
            return f"cannot write results to {path}: {_why(exc, path)}"
    return None


def _why(exc: OSError, path: str) -> str:
    why = exc.strerror or str(exc)
    if exc.filename and os.path.abspath(str(exc.filename)) != os.path.abspath(path):
        why += f": {exc.filename}"
    return why


def compare_command(path_a: str, path_b: str) -> int:
    from repkern.bench import report

    try:
        a, b = report.load(path_a), report.load(path_b)
    except report.BenchFileError as exc:
        return _fail(str(exc))
    print(report.compare(a, b, path_a, path_b))
    return 0


def run_command(args: argparse.Namespace) -> int:
    """The `repkern bench` handler."""
    if args.compare:
        return compare_command(*args.compare)
    from repkern import bench
    from repkern.bench import report

    device = args.device or bench.resolve_device(None)
    problem = _device_problem(device)
    if problem:
        return _fail(problem)
    base = os.path.splitext(args.csv)[0]
    problem = _unwritable([args.csv, base + ".json", base + ".png"])
    if problem:
        return _fail(problem)
    dtypes = [DTYPES[name] for name in dict.fromkeys(args.dtypes)] if args.dtypes else None
    device = bench.resolve_device(device)
    rows = bench.run(args.op or SUITES, device=device, quick=args.quick, full=args.full, dtypes=dtypes)
    print()
    print(report.tables(rows))
    for path, write in ((args.csv, lambda p: bench.write_csv(rows, p)),
                        (base + ".json", lambda p: bench.write_json(rows, rows.header, p))):
        try:
            write(path)
        except OSError as exc:  # the folder was writable before the run
            return _fail(f"cannot write results to {path}: {_why(exc, path)}")
        print(f"wrote {path}")
    png = base + ".png"
    try:
        report.plot(rows, png)
        print(f"wrote {png}")
    except ImportError as exc:  # matplotlib is optional (the `bench` extra)
        print(f"no plot: {exc}")
    except ValueError as exc:  # no case with a reference (e.g. everything skipped)
        print(f"no plot: {exc}")
    return 0

