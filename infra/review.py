"""Review what training runs wrote to S3.

    python infra/review.py s3://bucket/runs/                      # list the runs under an output URI
    python infra/review.py s3://bucket/runs/r1 [s3://…/r2 ...]    # summarise and compare runs
    python infra/review.py s3://bucket/runs/r1 s3://…/r2 --report DIR   # + DIR/index.html with PNG figures

A URI holding a run.json is a run; any other prefix is listed. Missing or partial artifacts (a run
still going, or cut short) are reported, not fatal. Nothing is written to S3.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "entry_point"), str(ROOT)]

from brainseg import s3io  # noqa: E402
from infra.runs import is_run, list_runs, load_run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("uris", nargs="+", help="an output URI to list, or one or more run URIs")
    parser.add_argument("--report", type=Path, help="write an HTML report with PNG figures to this folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from infra.report import text_summary, write_report

    try:
        runs = []
        for uri in args.uris:
            s3io.parse_uri(uri)
            if is_run(uri):
                runs.append(load_run(uri))
            else:
                listed = list_runs(uri)
                if not listed:
                    print(f"error: no runs under {uri} (no <run>/run.json)", file=sys.stderr)
                    return 2
                runs.extend(listed)
    except (ValueError, s3io.S3Error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text_summary(runs))
    if args.report:
        path = write_report(runs, args.report)
        print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
