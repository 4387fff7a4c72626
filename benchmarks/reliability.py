"""Reliability benchmark: what hostile bytes, a flaky network and bad input do to the job.

    python benchmarks/reliability.py [--headers 20000] [--cases 200] [--masks 1000] [--reads 300] [--probability 0.2]
                                     [--parts fuzz,masks,faults,training,bad_input] [--out benchmarks/results/reliability.json]

Each part counts what was tried, what survived (the right bytes, the right weights, a clear
refusal) and what was lost (an exception that escaped, wrong numbers, a traceback, data changed):

* fuzz: seeded 1-4 byte mutations of real headers (``tests.support.fuzz``), parsed in memory; then whole
  cases with one mutated slice each, indexed from the embedded S3 by ``build_catalog``.
* masks: cases whose mask is a mutated RT Structure Set (anywhere: it is all header) or DICOM SEG
  (its header), ``--masks`` of each, indexed by ``build_catalog``.
* faults: every fault the embedded S3 injects (``tests.support.faults``) on ``--probability`` of the
  requests, against ranged, whole and streamed reads, plain and conditional writes; seconds
  against the same work without faults.
* training: the same short ``train.py`` run clean and through a flaky network (4% of GETs and PUTs
  failing in every way), weights compared; and a resume whose newest checkpoint is damaged.
* bad input: ``train.py`` in a subprocess with each bad input: exit status, reason, no traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support: the fault-injecting S3 and the header fuzzer

from brainseg.commands import train  # noqa: E402
from brainseg.data.catalog import build_catalog  # noqa: E402
from brainseg.io import s3  # noqa: E402
from brainseg.run import ownership  # noqa: E402
from infra.data.synth import SynthSpec, write_dataset  # noqa: E402
from tests.support.faults import FaultyS3  # noqa: E402
from tests.support.fuzz import MASK_KINDS, PHI_TOKENS, fuzz_headers, write_fuzzed_cases, write_fuzzed_masks  # noqa: E402

BUCKET = "bench-reliability"
PARTS = ("fuzz", "masks", "faults", "training", "bad_input")
OUTPUT_BUCKET = "bench-reliability-runs"  # bad inputs write (or refuse to write) here, outside the data bucket
GET_FAULTS = ("slowdown", "error500", "reset", "cut", "short", "short-checksum")
PUT_FAULTS = ("slowdown", "error500", "reset", "lost-reply")
FLAKY_NETWORK = [{"fault": fault, "method": method, "probability": 0.04}
                 for method, kinds in (("GET", ("slowdown", "reset", "cut", "short", "short-checksum")),
                                       ("PUT", ("slowdown", "error500", "reset", "lost-reply")))
                 for fault in kinds]
TINY = ["--channels", "8,16,32", "--patch-size", "32,32,32", "--res-units", "1", "--batch-size", "2",
        "--warmup-steps", "2", "--lr", "3e-3", "--memory-budget-mb", "64", "--log-every", "1000"]


def fuzz(headers: int, cases: int) -> dict:
    started = time.perf_counter()
    parsed = fuzz_headers(headers)
    parsed["seconds"] = round(time.perf_counter() - started, 1)
    parsed["lost"] = len(parsed.pop("mistakes"))
    root = f"s3://{BUCKET}/fuzz/"
    write_fuzzed_cases(root, cases, seed=cases)
    started = time.perf_counter()
    try:
        catalog = build_catalog(root)
        outcome = {"ok": len(catalog.cases), "excluded": len(catalog.exclusions),
                   "lost": sum("unexpected" in item.reason for item in catalog.exclusions)}
    except Exception as err:  # the figure this benchmark exists to report
        outcome = {"ok": 0, "excluded": 0, "lost": cases, "escaped": f"{type(err).__name__}: {err}"}
    return {"headers": parsed, "cases": {"tried": cases, **outcome,
                                         "seconds": round(time.perf_counter() - started, 1)}}


def mask_fuzz(cases: int) -> dict:
    """Per mask kind (RTSTRUCT, SEG): ``cases`` cases whose mask has 1-4 mutated header bytes,
    indexed from S3 by one ``build_catalog``; lost: an escaped exception (every case), a reason from
    the last line of defence or quoting an identifier."""
    out = {}
    for kind in MASK_KINDS:
        root = f"s3://{BUCKET}/fuzz-{kind}/"
        write_fuzzed_masks(root, kind, cases, seed=cases)
        started = time.perf_counter()
        try:
            catalog = build_catalog(root)
            outcome = {"usable": len(catalog.cases), "excluded": len(catalog.exclusions),
                       "lost": sum("unexpected" in item.reason or any(token in item.reason for token in PHI_TOKENS)
                                   for item in catalog.exclusions)}
        except Exception as err:  # the figure this benchmark exists to report
            outcome = {"usable": 0, "excluded": 0, "lost": cases, "escaped": f"{type(err).__name__}: {err}"}
        out[kind] = {"tried": cases, **outcome, "seconds": round(time.perf_counter() - started, 1)}
    return out


def _read_work(rng: np.random.Generator, reads: int) -> list:
    """``(name, call, expected)`` read operations over three objects."""
    blob = f"s3://{BUCKET}/faults/blob.bin"
    lines_uri = f"s3://{BUCKET}/faults/lines.jsonl"
    data = rng.bytes(1 << 20)
    lines = [json.dumps({"line": n, "value": rng.random()}).encode() for n in range(30_000)]
    s3.put_bytes(blob, data)
    s3.put_bytes(lines_uri, b"\n".join(lines) + b"\n")
    work = []
    for _ in range(reads):
        start = int(rng.integers(0, len(data) - 65536))
        stop = start + int(rng.integers(1, 65536))
        work.append(("ranged", lambda a=start, b=stop: s3.get_range(BUCKET, "faults/blob.bin", a, b), data[start:stop]))
    work += [("whole", lambda: s3.read_uri(blob), data)] * max(1, reads // 10)
    work += [("streamed", lambda: list(s3.read_lines(lines_uri)), lines)] * max(1, reads // 60)
    return work


def _write_work(rng: np.random.Generator, writes: int, tag: str) -> list:
    work = []
    for number in range(writes):
        payload = rng.bytes(10_000)
        uri = f"s3://{BUCKET}/faults/{tag}/put-{number}.bin"
        conditional = number % 4 == 0

        def write_and_read(uri=uri, payload=payload, conditional=conditional):
            try:
                s3.put_bytes(uri, payload, if_none_match=conditional)
            except s3.Conflict:
                # A create answered 412 after its own lost reply; its callers (the run claim, the
                # identity key) read back what is there, as this does.
                if not conditional:
                    raise
            return s3.read_uri(uri)

        work.append(("conditional put" if conditional else "put", write_and_read, payload))
    return work


def _run(work: list) -> dict:
    survived, lost, errors = 0, 0, []
    s3.reset_stats()
    started = time.perf_counter()
    for _name, call, expected in work:
        try:
            ok = call() == expected
        except Exception as err:  # counted, not raised: a lost operation is the measurement
            ok = False
            errors.append(f"{type(err).__name__}: {str(err)[:200]}")
        survived += ok
        lost += not ok
    return {"tried": len(work), "survived": survived, "lost": lost, "seconds": round(time.perf_counter() - started, 2),
            "retries": s3.stats()["retries"], "errors": errors[:3]}


def faults(server: FaultyS3, reads: int, probability: float) -> dict:
    rng = np.random.default_rng(0)
    results = {"get": {"clean": _run(_read_work(rng, reads))}, "put": {"clean": _run(_write_work(rng, reads // 3,
                                                                                                   "clean"))}}
    for method, kinds, make in (("get", GET_FAULTS, lambda tag: _read_work(rng, reads)),
                                ("put", PUT_FAULTS, lambda tag: _write_work(rng, reads // 3, tag))):
        for fault in kinds:
            work = make(fault)
            server.faults.set({"fault": fault, "method": method.upper(), "key": "/faults/", "probability": probability})
            outcome = _run(work)
            outcome["injected"] = server.faults.injected()
            server.faults.clear()
            results[method][fault] = outcome
            print(json.dumps({f"{method} {fault}": outcome}), flush=True)
    return results


def _weights(output: str, run: str) -> dict:
    pointer = json.loads(s3.read_uri(f"{output}/{run}/checkpoints/latest.json"))
    data = s3.read_uri(f"{output}/{run}/checkpoints/{pointer['checkpoint']}")
    return torch.load(io.BytesIO(data), weights_only=True)["model"]


def training(server: FaultyS3) -> dict:
    dataset = f"s3://{BUCKET}/train/"
    write_dataset(10, dataset, SynthSpec(shape=(32, 64, 64)))
    output = f"s3://{BUCKET}/runs"
    common = ["--data-uri", dataset, "--output-uri", output, *TINY, "--epochs", "2", "--steps-per-epoch", "4",
              "--checkpoint-steps", "2", "--num-workers", "2", "--deterministic", "true", "--max-val-cases", "1"]
    seconds = {}
    for run in ("clean", "flaky"):
        if run == "flaky":
            server.faults.set(*FLAKY_NETWORK)
        started = time.perf_counter()
        code = train.main(common + ["--run-name", run])
        seconds[run] = round(time.perf_counter() - started, 1)
        assert code == 0, f"{run} run failed with exit status {code}"
    injected = server.faults.injected()
    server.faults.clear()
    clean, flaky = _weights(output, "clean"), _weights(output, "flaky")
    identical = all(torch.equal(clean[name], flaky[name]) for name in clean)
    s3.put_bytes(f"{output}/clean/checkpoints/step-00000008.pt", b"torn upload")
    resumed = train.main(common + ["--run-name", "clean", "--epochs", "3"]) == 0
    summary = json.loads(s3.read_uri(f"{output}/clean/summary.json"))
    return {"flaky_network": {"faults_injected": injected, "weights_bit_identical": identical, "seconds": seconds},
            "damaged_newest_checkpoint": {"resumed_and_finished": resumed and summary["steps"] == 12}}


class _RunsCode:
    """Unpickling this would create a file: what a hostile weights file could do instead."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _bad_inputs(dataset: str, output: str, scratch: Path) -> list[tuple[str, list[str], dict, int, str]]:
    """``(what, arguments, extra environment, expected exit status, phrase of the reason)``."""
    base = ["--data-uri", dataset, "--output-uri", output, *TINY]
    bucket_root = f"s3://{BUCKET}"
    hostile = scratch / "weights.pt"
    torch.save({"model": {"weight": torch.zeros(1)}, "payload": _RunsCode(scratch / "code-ran")}, hostile)
    return [
        ("misspelled flag", base + ["--lrr", "0.1"], {}, 2, "did you mean --lr?"),
        ("abbreviated flag", base + ["--epoch", "3"], {}, 2, "did you mean --epochs?"),
        ("output inside the dataset", ["--data-uri", dataset, "--output-uri", dataset + "runs/", *TINY], {}, 2,
         "is inside data_uri"),
        ("index in a case folder", base + ["--index-uri", dataset + "case_0000/image/index.jsonl"], {}, 2,
         "not under its .brainseg/ folder"),
        ("index pointing at a DICOM", base + ["--index-uri", f"{bucket_root}/bad/IM_0001.dcm"], {}, 2,
         "not a brainseg header index"),
        ("prefix one level too high", base[:1] + [f"{bucket_root}/"] + base[2:] + ["--run-name", "up"], {}, 2,
         "cases seem to be one level down"),
        ("prefix one level too low", base[:1] + [dataset + "case_0000/"] + base[2:] + ["--run-name", "down"], {}, 2,
         "looks like a single case folder"),
        ("empty prefix", base[:1] + [f"{bucket_root}/nothing/"] + base[2:], {}, 2, "no case folders under"),
        ("too few cases for the split", base[:1] + [f"{bucket_root}/three/"] + base[2:], {}, 2,
         "cannot fill a 50/20/30"),
        ("memory budget too small", base + ["--memory-budget-mb", "16", "--patch-size", "96,96,96"], {}, 2,
         "raise --memory-budget-mb to at least"),
        ("job name with a path", base, {"TRAINING_JOB_NAME": "../other"}, 2, "TRAINING_JOB_NAME '../other'"),
        ("init weights that run code", base + ["--init-weights", str(hostile), "--run-name", "hostile"], {}, 2,
         "only tensors and plain values are loaded"),
        ("a run another job writes", base + ["--run-name", "owned"], {"BRAINSEG_HEARTBEAT_S": "1"}, 2,
         "is being written by another job"),
        ("missing bucket", base[:1] + ["s3://no-such-bucket-anywhere/ds/"] + base[2:], {}, 3,
         "does not exist"),
    ]


def bad_input(server: FaultyS3, scratch: Path) -> dict:
    dataset = f"s3://{BUCKET}/train/"
    output = f"s3://{OUTPUT_BUCKET}/runs"
    s3.client().create_bucket(Bucket=OUTPUT_BUCKET)
    write_dataset(3, f"s3://{BUCKET}/three/", SynthSpec(shape=(16, 32, 32)))
    dicom = s3.read_uri(dataset + "case_0000/image/IM_0001.dcm")
    s3.put_bytes(f"s3://{BUCKET}/bad/IM_0001.dcm", dicom)
    ownership.HEARTBEAT_S = 1.0
    owner = ownership.RunLock(output, "owned", "another-job")
    owner.acquire()
    results = []
    environment = {**os.environ, "SM_MODEL_DIR": str(scratch / "model")}
    try:
        for what, arguments, extra, expected, phrase in _bad_inputs(dataset, output, scratch):
            done = subprocess.run([sys.executable, str(ROOT / "entry_point" / "train.py"), *arguments],
                                  env={**environment, **extra}, capture_output=True, text=True, timeout=600)
            text = done.stdout + done.stderr
            clear = done.returncode == expected and phrase in text and "Traceback" not in text
            results.append({"input": what, "exit": done.returncode, "clear": clear,
                            "traceback": "Traceback" in text})
            print(json.dumps(results[-1]), flush=True)
    finally:
        owner.release("finished")
    unchanged = s3.read_uri(f"s3://{BUCKET}/bad/IM_0001.dcm") == dicom and not (scratch / "code-ran").exists()
    return {"tried": len(results), "clear_refusals": sum(r["clear"] for r in results),
            "tracebacks": sum(r["traceback"] for r in results), "data_unchanged": unchanged, "inputs": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--headers", type=int, default=20_000, help="mutated headers parsed in memory")
    parser.add_argument("--cases", type=int, default=200, help="cases with a mutated slice, indexed from S3")
    parser.add_argument("--masks", type=int, default=1000, help="cases with a mutated RTSTRUCT, and as many with a "
                        "mutated SEG, indexed from S3")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which parts to run, of {','.join(PARTS)}")
    parser.add_argument("--reads", type=int, default=300, help="ranged reads per fault (whole and streamed reads and "
                                                               "writes in proportion)")
    parser.add_argument("--probability", type=float, default=0.2, help="share of requests given each fault")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reliability.json")
    args = parser.parse_args(argv)
    with FaultyS3() as server, tempfile.TemporaryDirectory() as scratch:
        os.environ.update(server.environment())
        os.environ["SM_MODEL_DIR"] = str(Path(scratch) / "model")
        s3.reset_client()
        s3.client().create_bucket(Bucket=BUCKET)
        result = {"date": time.strftime("%Y-%m-%d"),
                  "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
                  "setup": {"headers": args.headers, "cases": args.cases, "masks": args.masks, "reads": args.reads,
                            "probability": args.probability}}
        parts = args.parts.split(",")
        for part in parts:
            if part not in PARTS:
                parser.error(f"--parts {args.parts!r}: {part!r} is not one of {','.join(PARTS)}")
        runs = {"fuzz": lambda: fuzz(args.headers, args.cases), "masks": lambda: mask_fuzz(args.masks),
                "faults": lambda: faults(server, args.reads, args.probability), "training": lambda: training(server),
                "bad_input": lambda: bad_input(server, Path(scratch))}
        for part in PARTS:
            if part in parts:
                result[part] = runs[part]()
                print(json.dumps({part: result[part]}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
