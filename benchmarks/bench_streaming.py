"""Streaming / minibatch CKA and cka_test benchmarks: repkern vs plain PyTorch, CSV rows.

    python benchmarks/bench_streaming.py [--quick] [--csv bench_results/streaming.csv]
"""

import argparse
import os

import torch

from repkern.bench import run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument("--csv", default="bench_results/streaming.csv")
    args = parser.parse_args()
    if args.csv:
        os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
    run(["streaming"], device=torch.device("cuda" if torch.cuda.is_available() else "cpu"), quick=args.quick,
        csv_path=args.csv)
