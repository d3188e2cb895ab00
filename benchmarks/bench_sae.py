"""SAE benchmarks: repkern vs the pure-PyTorch reference and the GEMM alone; CSV + JSON rows, tables, plot.

    python benchmarks/bench_sae.py [--quick] [--device cpu|cuda[:N]] [--dtype D ...] [--csv bench_results/sae.csv]

The same as `repkern bench --op sae` (see `repkern bench --help`).
"""

from repkern.bench import cli

if __name__ == "__main__":
    raise SystemExit(cli.suite_main("sae", __doc__))
