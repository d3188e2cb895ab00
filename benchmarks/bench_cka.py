"""CKA benchmarks: repkern vs the pure-PyTorch reference (and the per-pair loop), CSV rows.

    python benchmarks/bench_cka.py [--quick | --full] [--csv bench_results/cka.csv]

--full adds tiled RBF CKA at n=32768 (no n×n approach fits this machine's memory there).
"""

import argparse
import os

import torch

from repkern.bench import cka, run_cases
from repkern.bench.timing import device_name, git_sha, measure_ceilings

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument("--full", action="store_true", help="also n=32768 (minutes)")
    parser.add_argument("--csv", default="bench_results/cka.csv")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ceilings = measure_ceilings(device, quick=args.quick)
    print(f"device: {device_name(device)}; copy {ceilings.copy_gbps:.1f} GB/s; float32 matmul "
          f"{ceilings.matmul_gflops:.1f} GFLOP/s (same run); torch {torch.__version__}; sha {git_sha()}")
    rows = run_cases(cka.cases(device, args.quick, args.full), device, ceilings)
    if args.csv:
        import csv

        from repkern.bench import CSV_FIELDS

        os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")
