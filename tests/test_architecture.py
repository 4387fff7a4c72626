"""Imports flow one way, and the heavy libraries stay in their modules: checked on the source (every
``import`` statement, function-level ones included) and by importing the laptop-side modules with
torch blocked."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "entry_point" / "brainseg"

# What each part of brainseg may import from brainseg (besides itself), lowest layer first.
ALLOWED = {
    "io": set(), "dicom": set(), "labels": set(), "layout": set(), "overlap": set(), "metric_lines": set(),
    "environment": set(), "__init__": set(), "stream_config": set(), "locations": set(), "bill": set(),
    "config": {"labels", "locations", "stream_config"}, "progress": {"metric_lines"},
    "metrics": {"detection", "overlap"}, "postprocess": {"overlap"}, "detection": {"overlap"},
    "flags": {"config", "labels"},
    "data": {"config", "dicom", "io", "labels", "stream_config"},
    "model": {"config", "io", "labels"},
    "tasks": {"config", "data", "labels", "metrics", "model", "postprocess"},
    "run": {"bill", "config", "locations", "stream_config", "data", "detection", "dicom", "environment", "io", "labels", "layout",
            "metric_lines", "metrics", "model", "overlap", "postprocess", "progress", "tasks"},
    "prediction": {"flags", "config", "locations", "stream_config", "data", "detection", "dicom", "environment", "io", "labels",
                   "layout", "metrics", "model", "overlap", "postprocess", "progress", "tasks"},
    "commands": {"flags", "config", "data", "dicom", "environment", "io", "labels", "layout", "metric_lines", "metrics", "model",
                 "overlap", "postprocess", "prediction", "progress", "run", "tasks"},
}
# Third-party libraries and the only modules that may import them.
OWNERS = {"boto3": ("brainseg/io/s3",), "botocore": ("brainseg/io/s3",), "smart_open": ("brainseg/io/s3",),
          "pydicom": ("brainseg/dicom/",), "highdicom": ("brainseg/dicom/",), "nibabel": ("brainseg/prediction/nifti",),
          "onnx": ("brainseg/model/export",), "onnxruntime": ("brainseg/model/export",)}
# Modules the launcher and the review import on a laptop without torch.
TORCH_FREE = ("brainseg.config", "brainseg.bill", "brainseg.stream_config", "brainseg.locations", "brainseg.flags", "brainseg.layout", "brainseg.overlap", "brainseg.metric_lines", "brainseg.labels",
              "brainseg.environment", "brainseg.model.description", "brainseg.prediction.options", "brainseg.postprocess", "brainseg.detection",
              "brainseg.io.store", "infra.launcher.cli", "infra.launcher.jobspec", "infra.review.cli",
              "infra.review.report")


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_brainseg_imports_flow_downwards(path):
    own = part(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
    allowed = ALLOWED[own] | {own}
    wrong = {name for name in imported(path) if name.startswith("brainseg.") and part(name) not in allowed}
    wrong |= {name for name in imported(path) if name.split(".")[0] in ("infra", "tests", "sagemaker")}
    assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_heavy_libraries_stay_in_their_modules():
    misplaced = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(ROOT / "entry_point").as_posix()
        for name in imported(path):
            owners = OWNERS.get(name.split(".")[0])
            if owners and not where.startswith(owners):
                misplaced.append(f"{where} imports {name}")
    assert not misplaced, misplaced


def test_the_laptop_side_needs_no_torch():
    script = ("import sys\n"
              "class Block:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name.split('.')[0] in ('torch', 'monai'):\n"
              "            raise ImportError('imported ' + name)\n"
              "sys.meta_path.insert(0, Block())\n"
              f"import importlib\nfor name in {TORCH_FREE!r}:\n    importlib.import_module(name)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
