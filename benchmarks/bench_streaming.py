"""Streaming / minibatch CKA and cka_test benchmarks: repkern vs plain PyTorch; CSV + JSON rows, tables, plot.

    python benchmarks/bench_streaming.py [--quick]
        [--device cpu|cuda[:N]] [--dtype D ...] [--csv bench_results/streaming.csv]

The same as `repkern bench --op streaming` (see `repkern bench --help`).
"""

from repkern.bench import cli

if __name__ == "__main__":
    raise SystemExit(cli.suite_main("streaming", __doc__))
