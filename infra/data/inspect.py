"""Check and profile a DICOM dataset in S3 before training on it.

    brainseg-inspect s3://bucket/dataset/ [--json profile.json] [--index-uri s3://...]

Prints shapes, spacings, each sequence's intensity range, label values, tumour volume distribution,
the split and every
excluded case with its reason. Builds (or reuses) the header index the training job uses.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from brainseg.config import CASE_PER_HELP, CASES_PER, REGISTRATION_HELP, REGISTRATIONS
from brainseg.data.catalog import build_catalog
from brainseg.data.identify import load_rules
from brainseg.io import s3
from brainseg.labels import parse_roi_labels, parse_scheme
from infra.data.profile import format_profile, profile_catalog


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_uri", help="s3://bucket/prefix/ holding <case_id>/<sequence>/ and <case_id>/mask/, or "
                        "any tree of DICOM studies (--layout studies)")
    parser.add_argument("--sequences", default="image", help="sequence folders in channel order, e.g. "
                        "t1c,t1,t2,flair (default: image)")
    parser.add_argument("--layout", choices=("auto", "folders", "studies"), default="auto",
                        help="folders: <case>/<sequence>/; studies: any tree of DICOM objects, a case per study, "
                             "its series named by the sequence rules (the report lists which became which and why); "
                             "auto: folders when there are any (default)")
    parser.add_argument("--sequence-rules", default="", help="the studies layout's rules (YAML, a path or s3:// URI; "
                        "default: the shipped brain MRI rules)")
    parser.add_argument("--registration", choices=REGISTRATIONS, default="rigid", help=REGISTRATION_HELP)
    parser.add_argument("--case-per", choices=CASES_PER, default="study", help=CASE_PER_HELP)
    parser.add_argument("--missing-sequences", choices=("exclude", "zero"), default="exclude",
                        help="a case lacking a sequence: exclude it (default) or zero-fill the channel")
    parser.add_argument("--labels", default="tumour=*", help="classes by label value, as train.py's --labels; "
                        "cases with other label values are listed as excluded")
    parser.add_argument("--json", type=Path, help="also write the profile as JSON to this path")
    parser.add_argument("--index-uri", help="where the header index lives (default <data_uri>/.brainseg/index.jsonl)")
    parser.add_argument("--roi-labels", default="", help="RTSTRUCT masks: ROI names to label values, as train.py's "
                        "--roi-labels (default: every ROI as 1)")
    parser.add_argument("--identity-key-uri", default="", help="where the key of the identity hashes lives: "
                        "s3://... or env:NAME (default beside the index)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")
    parser.add_argument("--refresh-index", action="store_true", help="read every header again")
    parser.add_argument("--max-header-mb", type=int, default=1,
                        help="refuse objects whose header does not end within this many MiB (1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        catalog = build_catalog(args.data_uri, index_uri=args.index_uri, seed=args.seed,
                                refresh_index=args.refresh_index, max_header_bytes=args.max_header_mb * 2**20,
                                sequences=tuple(name.strip() for name in args.sequences.split(",")),
                                zero_fill=args.missing_sequences == "zero", labels=parse_scheme(args.labels),
                                identity_key_uri=args.identity_key_uri, roi_labels=parse_roi_labels(args.roi_labels),
                                layout=args.layout, case_per=args.case_per, sequence_rules=load_rules(args.sequence_rules),
                                registration=args.registration, show_roi_names=True)
    except (ValueError, s3.S3Error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    profile = profile_catalog(catalog)
    print(format_profile(profile))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(profile, indent=2))
        print(f"profile written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
