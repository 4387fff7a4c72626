"""Shared fixtures: a moto S3 server on 127.0.0.1 over real HTTP, buckets, and DICOM case writers."""

from __future__ import annotations

import io
import itertools
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from brainseg.dicom import writer
from brainseg.io import s3
from infra.data.phantom import make_phantom
from tests.support.faults import FaultyS3

_bucket_numbers = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def s3_server():
    """One moto server for the session; every test talks to it through AWS_ENDPOINT_URL."""
    with FaultyS3() as server:
        saved = {name: os.environ.get(name) for name in server.environment()}
        os.environ.update(server.environment())
        yield server
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def faults(s3_server):
    """The session server's fault rules (tests.support.faults), cleared after the test."""
    with s3_server.faults as rules:
        yield rules


@pytest.fixture(autouse=True)
def local_cache_dir(tmp_path_factory, monkeypatch):
    """Each test's runs cache fetched bytes in a folder of their own (BRAINSEG_CACHE_DIR), so a test
    that injects S3 faults never reads around them from bytes an earlier test cached."""
    monkeypatch.setenv("BRAINSEG_CACHE_DIR", str(tmp_path_factory.mktemp("brainseg-cache")))


@pytest.fixture(scope="session", autouse=True)
def sagemaker_dirs(tmp_path_factory):
    """Model and output folders of in-process training runs go to a temporary folder, never into
    the checkout (train.py's local defaults are ./model and ./output)."""
    saved = {name: os.environ.get(name) for name in ("SM_MODEL_DIR", "SM_OUTPUT_DATA_DIR")}
    os.environ["SM_MODEL_DIR"] = str(tmp_path_factory.mktemp("sm-model"))
    os.environ["SM_OUTPUT_DATA_DIR"] = str(tmp_path_factory.mktemp("sm-output"))
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def bucket() -> str:
    """A new, empty bucket."""
    name = f"test-bucket-{os.getpid()}-{next(_bucket_numbers)}"
    s3.client().create_bucket(Bucket=name)
    return name


def console_script(name: str) -> str:
    """The path of an installed console script (``pip install -e .``) of this interpreter's environment."""
    return str(Path(sys.executable).with_name(name))


def dicom_bytes(dataset) -> bytes:
    """A pydicom dataset as a DICOM file, written as it stands (no transfer-syntax change)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def put(uri: str, data: bytes) -> None:
    s3.put_bytes(uri, data)


def small_phantom(seed: int = 0, shape=(12, 40, 36)):
    return make_phantom(shape, np.random.default_rng(seed))


def put_series(base: str, folder: str, datasets, transfer_syntax: str = "explicit-le", names=None) -> dict:
    """Encode datasets and PUT them under ``base/folder/``; returns {key suffix: bytes}."""
    written = {}
    for number, dataset in enumerate(datasets, start=1):
        name = names[number - 1] if names else f"IM_{number:04d}.dcm"
        data = writer.encode(dataset, transfer_syntax)
        put(f"{base}/{folder}/{name}", data)
        written[name] = data
    return written


def put_case(root: str, case_id: str, image: np.ndarray, mask: np.ndarray, *,
             transfer_syntax: str = "explicit-le", multiframe: bool = False,
             spec: writer.SeriesSpec | None = None, mask_spec: writer.SeriesSpec | None = None) -> dict:
    """Write one case; returns {"image": {name: bytes}, "mask": {...}}."""
    spec = spec or writer.SeriesSpec(spacing=(2.0, 0.9, 0.8), patient_id=f"PID-{case_id}",
                                     patient_name=f"Doe^{case_id}")
    mask_spec = mask_spec or writer.SeriesSpec(spacing=spec.spacing, origin=spec.origin,
                                               orientation=spec.orientation, patient_id=spec.patient_id,
                                               patient_name=spec.patient_name)
    base = f"{root.rstrip('/')}/{case_id}"
    out = {}
    for folder, volume, series_spec in (("image", image, spec), ("mask", mask, mask_spec)):
        datasets = ([writer.multiframe_dataset(volume, series_spec)] if multiframe
                    else writer.slice_datasets(volume, series_spec))
        out[folder] = put_series(base, folder, datasets, transfer_syntax)
    return out


def synthetic_dataset(name: str, cases: int, shape=(32, 64, 64)) -> str:
    """A new bucket ``<name>-<pid>`` holding ``cases`` synthetic cases under ``ds/``; returns the URI."""
    from infra.data.synth import SynthSpec, write_dataset

    bucket = f"{name}-{os.getpid()}"
    s3.client().create_bucket(Bucket=bucket)
    write_dataset(cases, f"s3://{bucket}/ds/", SynthSpec(shape=shape))
    return f"s3://{bucket}/ds/"
