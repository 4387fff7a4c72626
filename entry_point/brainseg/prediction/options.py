"""Configuration of a prediction job and the layout of what it writes: free of torch, so the
launcher checks the flags and the review tools read the outputs on a laptop.

Under ``<output_uri>/``::

    prediction.json            the job's settings and models (written first)
    <case>/segmentation.dcm    DICOM SEG on the case's first sequence, or on --seg-series (--output-format seg)
    <case>/<case>.nii.gz       the label map as NIfTI on the same grid (--output-format nifti)
    <case>/volumes.csv         predicted volumes (ml) per structure, Dice/IoU/HD95 when a mask exists;
                               written after the SEG: a case is complete when it exists
    shards/<k>-of-<n>.csv      every case of shard k: predicted, skipped (with the reason) or excluded
    predictions.csv            all shards' rows, once every shard finished
    complete.json              counts; written last, by the shard that finds every shard done
"""

from __future__ import annotations

import argparse
import difflib
import re
from dataclasses import dataclass, field, fields

from brainseg.config import (
    CASE_PER_HELP,
    CASES_PER,
    LAYOUTS,
    PRECISIONS,
    REGISTRATION_HELP,
    REGISTRATIONS,
)
from brainseg.flags import OneLineParser, add_flag, metavar, parse_bool, sagemaker_arguments
from brainseg.labels import parse_roi_labels
from brainseg.locations import check_identity_key_uri, inside

SHARD = re.compile(r"(\d+)/(\d+)")
OUTPUT_FORMATS = ("seg", "nifti")


def _field(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class PredictOptions:
    """Everything a prediction job is configured by; every field is a ``--flag`` of ``predict.py``."""

    model: tuple = _field((), "s3://…/<run>/, a model.tar.gz or a model.pt (s3:// or a path); several, "
                              "comma-separated or repeated, are an ensemble (probabilities averaged) (required)")
    data_uri: str = _field("", "s3:// prefix holding one folder per case, with the sequence folders the model "
                               "was trained on, or (--layout studies) any tree of DICOM studies; a mask, when "
                               "present, is scored (required)")
    output_uri: str = _field("", "s3:// prefix the predictions are written under (required)")
    index_uri: str = _field("", "where the header index lives (default <data_uri>/.brainseg/index.jsonl)")
    identity_key_uri: str = _field("", "where the key of the index's identity hashes lives: s3://... or env:NAME "
                                       "(default beside the index)")
    cases: tuple = _field((), "predict only these case IDs (comma-separated; default every case)")
    roi_labels: str = _field("", "RTSTRUCT masks (scored when present): ROI names to label values, as train.py's "
                                 "--roi-labels")
    output_format: tuple = _field(("seg",), "what each case's prediction is written as: seg (DICOM SEG, one "
                                            "segment per structure), nifti (a label map in the training label "
                                            "values, .nii.gz), or both: seg,nifti (default seg)")
    seg_series: str = _field("", "the sequence whose series the DICOM SEG is drawn on, e.g. flair (default the first "
                                 "sequence present); a series on a grid of its own gets the prediction on its own "
                                 "voxels (nearest voxel)")
    mirror: bool = _field(False, "test-time augmentation: average the 8 mirrorings of the volume (8x the compute)")
    postprocess: bool = _field(True, "apply the postprocessing the model chose on its validation cases (an "
                                     "ensemble: the rules all its models share)")
    postprocessing: str = _field("", "a cross-validation's <name>-cv.json (s3:// or a path): apply the "
                                     "postprocessing chosen on its folds' validation cases pooled instead of the "
                                     "models' own")
    sw_batch_size: int = _field(2, "windows per forward pass")
    sw_overlap: float = _field(-1.0, "sliding-window overlap in [0, 1) (default: each model's own)")
    precision: str = _field("fp32", "fp32, bf16 or fp16 autocast (fp16 on a GPU only)")
    memory_budget_mb: int = _field(8192, "MiB one case may hold while it is predicted; a larger case is skipped "
                                         "with the reason")
    overwrite: bool = _field(False, "predict cases whose outputs are already complete again (default: skip them, "
                                    "so a rerun continues an interrupted job)")
    shard: str = _field("", "k/n: predict the k-th (0-based) of n interleaved shards of the cases (default: this "
                            "host's place among a SageMaker job's hosts, else 0/1)")
    max_header_mb: int = _field(1, "refuse an object whose header does not end within this many MiB")
    layout: str = _field("auto", "folders: <case>/<sequence>/*.dcm; studies: any tree of DICOM objects, a case per "
                                 "study, its series named by --sequence-rules; auto: folders when there are any")
    sequence_rules: str = _field("", "the studies layout's rules telling series apart (YAML, a path or s3:// URI; "
                                     "empty: the shipped brain MRI rules), as train.py's")
    registration: str = _field("rigid", REGISTRATION_HELP)
    case_per: str = _field("study", CASE_PER_HELP)

    def __post_init__(self) -> None:
        for name in ("model", "cases", "output_format"):  # comma-separated, repeated, or both
            parts = (part.strip() for item in getattr(self, name) for part in str(item).split(","))
            object.__setattr__(self, name, tuple(part for part in parts if part))
        object.__setattr__(self, "output_format", tuple(dict.fromkeys(self.output_format or ("seg",))))
        unknown = [name for name in self.output_format if name not in OUTPUT_FORMATS]
        if unknown:
            raise ValueError(f"output_format {','.join(self.output_format)!r}: {', '.join(unknown)} is not one of "
                             f"{', '.join(OUTPUT_FORMATS)}")
        models = self.model
        if not models:
            raise ValueError("model: expected at least one model location (--model s3://bucket/runs/<run>/)")
        for name in ("data_uri", "output_uri"):
            value = getattr(self, name)
            if not value.startswith("s3://"):
                raise ValueError(f"{name} {value!r}: expected an s3:// URI")
        if inside(self.output_uri, self.data_uri):
            raise ValueError(f"output_uri {self.output_uri} is inside data_uri {self.data_uri}: predictions would be "
                             "read as cases; write them elsewhere")
        if self.index_uri and not self.index_uri.startswith("s3://"):
            raise ValueError(f"index_uri {self.index_uri!r}: expected an s3:// URI")
        check_identity_key_uri(self.identity_key_uri, self.data_uri)
        parse_roi_labels(self.roi_labels)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.sw_batch_size < 1 or self.max_header_mb < 1:
            raise ValueError(f"sw_batch_size {self.sw_batch_size}, max_header_mb {self.max_header_mb}: expected at "
                             "least 1")
        if self.sw_overlap != -1.0 and not 0.0 <= self.sw_overlap < 1.0:
            raise ValueError(f"sw_overlap {self.sw_overlap}: expected a value in [0, 1), or -1 for each model's own")
        if self.memory_budget_mb < 64:
            raise ValueError(f"memory_budget_mb {self.memory_budget_mb}: expected at least 64")
        if self.shard:
            parse_shard(self.shard)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r}: expected one of {', '.join(LAYOUTS)}")
        if self.registration not in REGISTRATIONS:
            raise ValueError(f"registration {self.registration!r}: expected one of {', '.join(REGISTRATIONS)}")
        if self.case_per not in CASES_PER:
            raise ValueError(f"case_per {self.case_per!r}: expected one of {', '.join(CASES_PER)}")
        if self.postprocessing and not self.postprocess:
            raise ValueError(f"postprocessing {self.postprocessing} with postprocess false: apply a cross-validation's "
                             "postprocessing or none, not both")

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v, tuple) else v for f in fields(self) for v in [getattr(self, f.name)]}


def parse_shard(text: str) -> tuple[int, int]:
    """``"k/n"`` as ``(k, n)``.

    Raises:
        ValueError: not two integers with ``0 <= k < n``.
    """
    match = SHARD.fullmatch(text.strip())
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"shard {text!r}: expected k/n with 0 <= k < n, e.g. 0/4")
    return int(match.group(1)), int(match.group(2))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="predict.py", allow_abbrev=False,
        usage="predict.py --model s3://…/<run>/ --data-uri s3://BUCKET/STUDIES/ --output-uri s3://BUCKET/OUT/ "
              "[--FLAG VALUE ...]",
        description="Segment the cases under --data-uri with trained brainseg model(s) and write DICOM SEG and "
                    "volumes under --output-uri.")
    for spec in fields(PredictOptions):
        name, default = spec.name, spec.default
        required = name in ("model", "data_uri", "output_uri")
        if isinstance(default, tuple):
            add_flag(parser, name, spec.metadata["help"], action="append", default=[], required=required,
                     metavar="URI" if name == "model" else "TEXT")
            continue
        convert = parse_bool if isinstance(default, bool) else type(default)
        shown = "" if required or default == "" or "(default" in spec.metadata["help"] else \
            f" (default: {str(default).lower() if isinstance(default, bool) else default})"
        add_flag(parser, name, spec.metadata["help"] + shown, type=convert, default=default, required=required,
                 metavar=metavar(name, default))
    return parser


def parse_options(argv: list[str]) -> PredictOptions:
    """Options from command-line arguments (SageMaker passes ``--snake_case value`` pairs).

    Raises:
        SystemExit: a required flag is missing or a value cannot be parsed (argparse's message).
        ValueError: a value out of range.
    """
    namespace, unknown = build_parser().parse_known_args(argv)
    sagemaker_arguments(unknown, "predict.py", [f.name for f in fields(PredictOptions)])
    return PredictOptions(**vars(namespace))


def validate_predict_overrides(overrides: dict) -> PredictOptions:
    """Check ``{field: value or text}`` against the fields (for launchers); returns the options.

    Raises:
        ValueError: an unknown field, or a value that cannot be parsed or is out of range.
    """
    known = {f.name: f.default for f in fields(PredictOptions)}
    values = {}
    for name, value in overrides.items():
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
            raise ValueError(f"unknown predict option {name}{f'; did you mean {close[0]}?' if close else ''} "
                             f"(known: {', '.join(known)})")
        default = known[name]
        try:
            if isinstance(default, tuple):
                values[name] = (value,) if isinstance(value, str) else tuple(value)
            elif isinstance(default, bool):
                values[name] = parse_bool(value) if isinstance(value, str) else bool(value)
            else:
                values[name] = type(default)(value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
            raise ValueError(f"predict option {name}={value!r}: {err}") from None
    return PredictOptions(**values)
