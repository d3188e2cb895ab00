"""SAE benchmarks: repkern vs the pure-PyTorch reference and the GEMM alone, CSV rows.

    python benchmarks/bench_sae.py [--quick] [--csv bench_results/sae.csv]
"""

import argparse
import os

from repkern import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument("--csv", default="bench_results/sae.csv")
    args = parser.parse_args()
    os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
    bench.run(["sae"], quick=args.quick, csv_path=args.csv)
