"""CKA benchmarks: repkern vs the pure-PyTorch reference (and the per-pair loop); CSV + JSON rows, tables, plot.

    python benchmarks/bench_cka.py [--quick | --full]
        [--device cpu|cuda[:N]] [--dtype D ...] [--csv bench_results/cka.csv]

--full adds tiled RBF CKA at n=32768 on the CPU, n=131072 on a GPU (no n×n approach fits there).
Otherwise the same as `repkern bench --op cka` (see `repkern bench --help`).
"""

from repkern.bench import cli

if __name__ == "__main__":
    raise SystemExit(cli.suite_main("cka", __doc__, flags={"full": "also the largest tiled case (minutes)"}))
