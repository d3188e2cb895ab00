"""Prints the roofline table of repkern.bench.roofline (the GPU benchmark cases at the H100 SXM datasheet
numbers), or with --write replaces it in docs/benchmarks.md (between roofline.BEGIN and roofline.END)."""

from __future__ import annotations

import argparse
import os
import sys

from repkern.bench import roofline

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmarks.md")


def replace(text: str, table: str) -> str:
    """`text` with the part from roofline.BEGIN to roofline.END replaced by `table`."""
    start, end = text.index(roofline.BEGIN), text.index(roofline.END) + len(roofline.END)
    return text[:start] + table + text[end:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"replace the table in {DOC}")
    table = roofline.markdown(roofline.gpu_cases())
    if not parser.parse_args().write:
        print(table)
        return 0
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(replace(text, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
