"""Sparsity-statistics benchmarks: repkern vs the pure-PyTorch reference, CSV rows.

    python benchmarks/bench_sparsity.py [--quick] [--csv bench_results/sparsity.csv]
"""

import argparse

from repkern import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument("--csv", default="bench_results/sparsity.csv")
    args = parser.parse_args()
    import os

    os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
    bench.run(["sparsity"], quick=args.quick, csv_path=args.csv)
