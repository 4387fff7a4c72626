"""The command-line tools as a user runs them: synth, upload, inspect_data."""

import json
import os
import subprocess
from pathlib import Path

import pydicom

from brainseg.io import s3
from tests.conftest import console_script

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args) -> subprocess.CompletedProcess:
    return subprocess.run([console_script(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))


def test_synth_to_folder_upload_and_inspect(tmp_path, bucket):
    folder = tmp_path / "cases"
    result = run("brainseg-synth", "--cases", "3", "--out", str(folder), "--shape", "16,40,36",
                 "--transfer-syntax", "explicit-le")
    assert result.returncode == 0, result.stderr
    images = sorted((folder / "case_0001" / "image").glob("*.dcm"))
    assert len(images) == 16
    dataset = pydicom.dcmread(images[0])
    assert (dataset.Rows, dataset.Columns) == (40, 36) and dataset.Modality == "MR"

    (folder / ".DS_Store").write_bytes(b"Bud1")
    (folder / "case_0001" / "image" / "._IM_0001.dcm").write_bytes(b"AppleDouble")
    uri = f"s3://{bucket}/dataset/"
    result = run("brainseg-upload", str(folder), uri)
    assert result.returncode == 0, result.stderr
    assert "uploaded 96 file(s)" in result.stderr  # hidden files stay behind
    s3.put_bytes(uri + "case_0002/image/notes.txt", b"reader notes\n")

    profile_path = tmp_path / "profile.json"
    result = run("brainseg-inspect", uri, "--json", str(profile_path))
    assert result.returncode == 0, result.stderr
    assert "3 total, 3 usable, 0 excluded" in result.stdout
    assert "skipped (not images; their cases are kept): 1 object(s)\n  case_0002/image/notes.txt: not a DICOM file" \
        in result.stdout
    assert "16x40x36 (3)" in result.stdout
    profile = json.loads(profile_path.read_text())
    assert profile["cases"] == 3 and profile["splits"] == {"train": 2, "val": 1, "test": 0}
    assert profile["tumour_ml"]["min"] > 0
    lesions = profile["lesions_per_case"]["tumour"]  # one phantom tumour each, one of them under the 50 mm³ floor
    assert (lesions["min"], lesions["max"], lesions["cases_with_several"], lesions["uncounted"]) == (0.0, 1.0, 0, 0)
    assert "lesions     tumour: median 1.0, max 1.0, 0 case(s) with several" in result.stdout
    assert profile["layouts"] == {"single-frame": 3}
    assert profile["skipped_objects"] == [{"case_id": "case_0002", "object": "image/notes.txt",
                                           "reason": "not a DICOM file (no 'DICM' marker after the 128-byte preamble)"}]
    assert "Synthetic^" not in result.stdout + result.stderr + profile_path.read_text()


def test_upload_creates_the_local_bucket_sends_large_files_in_parts_and_skips_what_is_there(tmp_path, bucket):
    folder = tmp_path / "cases"
    (folder / "case_a" / "t1c").mkdir(parents=True)
    big = os.urandom(20 * 2**20)  # above s3transfer's 8 MiB multipart threshold
    (folder / "case_a" / "t1c" / "big.dcm").write_bytes(big)
    (folder / "case_a" / "t1c" / "small.dcm").write_bytes(b"small")
    new_bucket = f"{bucket}-made-by-upload"
    result = run("brainseg-upload", str(folder), f"s3://{new_bucket}/dataset/")
    assert result.returncode == 0, result.stderr
    assert "uploaded 2 file(s), 21.0 MB" in result.stderr and "0 already there" in result.stderr
    assert s3.read_uri(f"s3://{new_bucket}/dataset/case_a/t1c/big.dcm") == big
    etag = next(info.etag for info in s3.list_objects(new_bucket, "dataset/") if info.key.endswith("big.dcm"))
    assert etag.endswith("-3")  # a multipart upload of three 8 MiB parts
    (folder / "case_a" / "t1c" / "small.dcm").write_bytes(b"changed")
    again = run("brainseg-upload", str(folder), f"s3://{new_bucket}/dataset/")
    assert again.returncode == 0 and "uploaded 1 file(s)" in again.stderr and "1 already there" in again.stderr
    assert s3.read_uri(f"s3://{new_bucket}/dataset/case_a/t1c/small.dcm") == b"changed"


def test_the_embedded_s3_prints_what_to_export(tmp_path):
    from infra.s3server import free_port

    port = free_port()
    server = subprocess.Popen([console_script("brainseg-s3server"), "--port", str(port)], stdout=subprocess.PIPE,
                              text=True)
    try:
        banner = [server.stdout.readline() for _ in range(7)]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert banner[0].startswith("embedded S3 (moto, in memory") and f"http://127.0.0.1:{port}" in banner[0]
    assert f"export AWS_ENDPOINT_URL=http://127.0.0.1:{port}\n" in banner
    assert "export AWS_DEFAULT_REGION=us-east-1\n" in banner and "brainseg-upload" in banner[-1]


def test_synth_multiframe_compressed_straight_to_s3(bucket):
    uri = f"s3://{bucket}/mf/"
    result = run("brainseg-synth", "--cases", "2", "--out", uri, "--shape", "12,40,40",
                 "--transfer-syntax", "rle", "--multiframe")
    assert result.returncode == 0, result.stderr
    result = run("brainseg-inspect", uri)
    assert result.returncode == 0, result.stderr
    assert "multi-frame (2)" in result.stdout and "RLE Lossless (2 objects)" in result.stdout


def test_inspect_reports_exclusions(bucket):
    uri = f"s3://{bucket}/mixed/"
    assert run("brainseg-synth", "--cases", "2", "--out", uri, "--shape", "8,32,32").returncode == 0
    s3.put_bytes(uri + "case_0001/image/IM_0003.dcm", b"garbage")
    result = run("brainseg-inspect", uri)
    assert result.returncode == 0, result.stderr
    assert "case_0001: 1 image object(s) unusable: IM_0003.dcm (not a DICOM file" in result.stdout


def test_bad_input_is_explained():
    result = run("brainseg-inspect", "not-a-uri")
    assert result.returncode == 2 and "expected an S3 URI like s3://bucket/prefix/" in result.stderr
    result = run("brainseg-synth", "--cases", "1", "--out", "/tmp/x", "--shape", "10,10")
    assert result.returncode == 2 and "expected three positive numbers" in result.stderr
    result = run("brainseg-upload", "/no/such/folder", "s3://b/p/")
    assert result.returncode == 2 and "is not a folder" in result.stderr


def test_missing_credentials_are_explained(bucket):
    env = {name: value for name, value in os.environ.items()
           if name not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    env.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent",
               AWS_EC2_METADATA_DISABLED="true")  # the endpoint stays the local moto server
    result = subprocess.run([console_script("brainseg-inspect"), f"s3://{bucket}/data/"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    assert "no AWS credentials found; configure a profile or role" in result.stderr
    assert "Traceback" not in result.stderr
