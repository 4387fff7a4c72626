"""SageMaker hosting handler: the four functions SageMaker's PyTorch serving container calls, shipped
as ``code/inference.py`` in the model.tar.gz training writes (with the ``brainseg`` package beside it).

A request names one case, by location or by bytes:

- ``application/json``: ``{"case_uri": "s3://bucket/prefix/<case>/"}``, the case folder (one folder
  per sequence the model was trained on, as in training data);
- ``application/zip`` or ``application/x-tar`` (gzip allowed): the same folders in an archive.

The answer is the DICOM SEG on the case's first sequence (``application/dicom``, the default) or
the predicted volumes per structure (``application/json``).
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from brainseg.data.files import case_from_files
from brainseg.io import s3
from brainseg.model.artifact import load_model
from brainseg.prediction.job import algorithm_of, seg_of, volume_row
from brainseg.prediction.predictor import Predictor

MAX_REQUEST_BYTES = 2 * 2**30  # 2 GiB of DICOM per request, unpacked: a larger archive is refused
JSON, DICOM = "application/json", "application/dicom"


class RequestError(ValueError):
    """A request the handler cannot serve; the message says what was expected."""


@dataclass
class CaseRequest:
    files: dict  # {path inside the case folder: bytes}


def _check_size(total: int) -> None:
    if total > MAX_REQUEST_BYTES:
        raise RequestError(f"the request holds {total} bytes of files; at most {MAX_REQUEST_BYTES} are accepted")


def _files_at(uri: str) -> dict:
    bucket, prefix = s3.parse_uri(uri)
    prefix = prefix.rstrip("/") + "/"
    listing = s3.list_tree(bucket, prefix)
    if not listing:
        raise RequestError(f"case_uri {uri}: no objects under it")
    _check_size(sum(info.size for info in listing))
    return {info.key[len(prefix):]: s3.get_object(bucket, info.key) for info in listing}


def _files_in_zip(body: bytes) -> dict:
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        _check_size(sum(info.file_size for info in members))
        return {info.filename: archive.read(info) for info in members}


def _files_in_tar(body: bytes) -> dict:
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as archive:
        members = [member for member in archive.getmembers() if member.isfile()]
        _check_size(sum(member.size for member in members))
        return {member.name.removeprefix("./"): archive.extractfile(member).read() for member in members}


def model_fn(model_dir: str) -> Predictor:
    """The model of the unpacked model.tar.gz (its ``model.pt``)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Predictor([load_model(model_dir, device)], device)


def input_fn(body, content_type: str) -> CaseRequest:
    """The request's case files (read, never extracted to disk)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    body = body.encode() if isinstance(body, str) else bytes(body)
    try:
        if kind == JSON:
            request = json.loads(body)
            if not isinstance(request, dict) or not str(request.get("case_uri", "")).startswith("s3://"):
                raise RequestError('a JSON request is {"case_uri": "s3://bucket/prefix/<case>/"}')
            return CaseRequest(_files_at(request["case_uri"]))
        if kind == "application/zip":
            return CaseRequest(_files_in_zip(body))
        if kind in ("application/x-tar", "application/gzip", "application/x-gzip", "application/x-gtar"):
            return CaseRequest(_files_in_tar(body))
    except (json.JSONDecodeError, zipfile.BadZipFile, tarfile.TarError, EOFError) as err:
        raise RequestError(f"the {kind} body cannot be read: {err}") from None
    raise RequestError(f"content type {content_type!r}: expected {JSON}, application/zip or application/x-tar")


def predict_fn(request: CaseRequest, predictor: Predictor) -> dict:
    """The case's DICOM SEG (``segmentation``) and volumes (``volumes``)."""
    description = predictor.description
    case = case_from_files("request", request.files, description.sequences,
                           zero_fill=description.missing_sequences == "zero")
    channels = [series.read_volume() if series is not None else np.zeros(case.image.shape, np.float32)
                for series in case.images]
    prediction = predictor.predict(channels, case.summary.intensities, case.image.spacing)
    segmentation = seg_of(case, prediction, case.image, case.image.read_headers(), predictor.scheme,
                          algorithm_of(predictor.models[0].description))
    row = volume_row(case, prediction, predictor.scheme.structures, None, 0.0)
    return {"segmentation": segmentation, "volumes": {k: v for k, v in row.items() if k not in ("case_id", "seconds")}}


def output_fn(result: dict, accept: str):
    """``(body, content type)``: the SEG, or with ``Accept: application/json`` the volumes."""
    kind = (accept or DICOM).split(";")[0].strip().lower()
    if kind == JSON:
        return json.dumps(result["volumes"]), JSON
    if kind in (DICOM, "*/*", "application/octet-stream"):
        return result["segmentation"], DICOM
    raise RequestError(f"accept {accept!r}: expected {DICOM} or {JSON}")
