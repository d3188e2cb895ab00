"""Gram benchmarks: repkern vs the pure-PyTorch reference; CSV + JSON rows, tables, plot.

    python benchmarks/bench_gram.py [--quick] [--device cpu|cuda[:N]] [--dtype D ...] [--csv bench_results/gram.csv]

The same as `repkern bench --op gram` (see `repkern bench --help`).
"""

from repkern.bench import cli

if __name__ == "__main__":
    raise SystemExit(cli.suite_main("gram", __doc__))
