"""``python -m reports SWEEP_DIR``: write REPORT.md, report.json and plots/ for a sweep."""

import argparse
import sys

from reports import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports", description=__doc__)
    parser.add_argument("sweep_dir")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.sweep_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
