"""Export a trained model as TorchScript, ONNX and a MONAI bundle (layout in :mod:`brainseg.model.export`).

    brainseg-export --model s3://bucket/runs/<run>/ --output exported/ [--opset 18]
    python infra/launch.py export --model s3://bucket/runs/<run>/ --output s3://bucket/exports/<run>/

``--model`` takes what predict.py takes (a run folder, ``model.tar.gz`` or ``model.pt``, S3 or a
path). ``--output`` is a local folder or an S3 prefix (written locally first, then uploaded).
Each format is checked against PyTorch on two input sizes before anything is uploaded. Exit
status: 0 exported, 2 a model that cannot be read or an export that does not match, 3 S3 failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from brainseg.io import s3

logger = logging.getLogger("brainseg.export")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainseg-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="s3://…/<run>/, a model.tar.gz or a model.pt (s3:// or a path)")
    parser.add_argument("--output", required=True, help="a local folder or an s3:// prefix to write the formats under")
    parser.add_argument("--opset", type=int, default=18, help="the ONNX opset (default 18)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    for noisy in ("botocore", "boto3", "smart_open", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    import torch  # only once the flags are valid

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # after torch sets its loggers: "torchvision is not installed"

    from brainseg.model.artifact import ModelError, load_model
    from brainseg.model.export import export_model

    try:
        model = load_model(args.model, torch.device("cpu"))
        if model.description.task != "segmentation":
            raise ModelError(f"model {model.source}: a {model.description.task} model; only segmentation models "
                             "are exported")
        with tempfile.TemporaryDirectory() as work:
            folder = Path(work) if args.output.startswith("s3://") else Path(args.output)
            report = export_model(model, folder, args.opset)
            if args.output.startswith("s3://"):
                prefix = args.output.rstrip("/") + "/"
                for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                    s3.put_bytes(prefix + path.relative_to(folder).as_posix(), path.read_bytes())
    except (ModelError, ValueError) as err:
        logger.error("%s", err)
        return 2
    except s3.S3Error as err:
        logger.error("S3: %s", err)
        return 3
    logger.info("exported %s to %s: %s (ONNX opset %d); largest logit difference from PyTorch %s on sizes %s",
                model.source, args.output, ", ".join(report["files"]), args.opset,
                ", ".join(f"{name} {value:.1e}" for name, value in report["max_abs_difference"].items()),
                " and ".join("x".join(map(str, size)) for size in report["checked_sizes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
