"""Sparsity-statistics benchmarks: repkern vs the pure-PyTorch reference; CSV + JSON rows, tables, plot.

    python benchmarks/bench_sparsity.py [--quick]
        [--device cpu|cuda[:N]] [--dtype D ...] [--csv bench_results/sparsity.csv]

The same as `repkern bench --op sparsity` (see `repkern bench --help`).
"""

from repkern.bench import cli

if __name__ == "__main__":
    raise SystemExit(cli.suite_main("sparsity", __doc__))
