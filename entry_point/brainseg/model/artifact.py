"""The model artifact: one torch file holding the weights and their :class:`ModelDescription`,
written by training to ``<run>/model/model.pt`` and into SageMaker's ``model.tar.gz``, read back
with ``weights_only=True`` (a file someone else could write cannot run code when it is read).

A model is named by where it lies: a run folder (``s3://…/<run>/``), a ``model.tar.gz``, a
``model.pt``, or a local folder holding ``model.pt``.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from brainseg.io import s3
from brainseg.model.description import ModelDescription
from brainseg.model.networks import NetworkSpec, build_model

MODEL_FILE = "model.pt"
DESCRIPTION_FILE = "model.json"
RUN_MODEL = "model/" + MODEL_FILE  # inside a run folder
MAX_ARCHIVE_MEMBER_BYTES = 4 * 2**30  # a model.pt larger than 4 GiB inside model.tar.gz is refused


class ModelError(ValueError):
    """A model that cannot be found, read or built; the message names its location."""


def load_tensors(data: bytes, what: str):
    """``torch.load`` with ``weights_only=True``: tensors and plain values only.

    Raises:
        ValueError: not a torch file, or it holds objects other than tensors and plain values; the
            message names ``what``.
    """
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found:
            raise ValueError(f"{what} is refused: it holds objects other than tensors and plain values (the "
                             f"first: {found.group(1)}), which torch.load(weights_only=True) does not load because "
                             "unpickling them could run code; save a dict of tensors and plain values") from None
        operand = re.search(r"Unsupported operand \d+", str(err))
        raise ValueError(f"{what} is refused: a pickle torch.load(weights_only=True) cannot read "
                         f"({operand.group(0) if operand else 'an unsupported instruction'}); write it with "
                         "torch.save") from None
    except Exception as err:  # torch raises RuntimeError, KeyError, EOFError, ... on bytes that are no torch file
        raise ValueError(f"{what} cannot be read as a torch file: {type(err).__name__}: {str(err)[:300]}") from None


def artifact_bytes(description: ModelDescription, state_dict: dict) -> bytes:
    """The torch file of a model: ``{"description": {...}, "state_dict": {...}}``."""
    buffer = io.BytesIO()
    torch.save({"description": description.to_dict(),
                "state_dict": {name: tensor.detach().cpu() for name, tensor in state_dict.items()}}, buffer)
    return buffer.getvalue()


@dataclass
class LoadedModel:
    """A network with its weights, in eval mode, and its description."""

    description: ModelDescription
    network: torch.nn.Module
    source: str


def _from_archive(data: bytes, source: str) -> bytes:
    """``model.pt`` from a ``model.tar.gz`` (read, never extracted)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
            members = {member.name.removeprefix("./"): member for member in archive.getmembers()}
            member = members.get(MODEL_FILE)
            if member is None or not member.isfile():
                raise ModelError(f"model {source}: the archive holds no top-level {MODEL_FILE} (it holds "
                                 f"{', '.join(sorted(members)[:8]) or 'nothing'})")
            if member.size > MAX_ARCHIVE_MEMBER_BYTES:
                raise ModelError(f"model {source}: {MODEL_FILE} is {member.size} bytes, more than a model can be")
            return archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ModelError(f"model {source}: not a readable .tar.gz archive ({err})") from None


def _read(location: str) -> tuple[bytes, str]:
    """The bytes of the model file ``location`` names, and the file's own location."""
    if location.startswith("s3://"):
        if location.endswith((".pt", ".tar.gz", ".tgz")):
            candidates = [location]
        else:  # a run folder, or a folder holding model.pt
            folder = location.rstrip("/") + "/"
            candidates = [folder + RUN_MODEL, folder + MODEL_FILE]
        for candidate in candidates:
            data = s3.read_uri(candidate)
            if data is not None:
                return data, candidate
        raise ModelError(f"model {location}: no such object (looked for {', '.join(candidates)})")
    path = Path(location)
    if path.is_dir():
        path = next((p for p in (path / MODEL_FILE, path / RUN_MODEL) if p.is_file()), path / MODEL_FILE)
    try:
        return path.read_bytes(), str(path)
    except OSError as err:
        raise ModelError(f"model {location}: cannot be read ({err.strerror or err})") from None


def read_artifact(location: str) -> tuple[ModelDescription, dict, str]:
    """The description, the state dict and the file's location of the model at ``location``.

    Raises:
        ModelError: nothing there, not a model file, or a bare state dict without a description.
        s3.S3Error: S3 failed.
    """
    data, source = _read(location)
    if source.endswith((".tar.gz", ".tgz")):
        data = _from_archive(data, source)
        source += f"!{MODEL_FILE}"
    try:
        payload = load_tensors(data, f"model {source}")
    except ValueError as err:
        raise ModelError(str(err)) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        raise ModelError(f"model {source}: weights without a description (a bare state dict, written before models "
                         "described themselves, or a checkpoint); retrain, or use the run's newer model/model.pt")
    try:
        description = ModelDescription.from_dict(payload.get("description"), f"model {source}")
    except ValueError as err:
        raise ModelError(str(err)) from None
    return description, payload["state_dict"], source


def load_model(location: str, device: torch.device) -> LoadedModel:
    """The network at ``location`` built from its description, its weights loaded, in eval mode.

    Raises:
        ModelError: as :func:`read_artifact`, or weights that do not fit the described network.
    """
    description, state_dict, source = read_artifact(location)
    try:
        network = build_model(NetworkSpec(**description.network))
        network.load_state_dict(state_dict)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ModelError(f"model {source}: its weights do not fit the network it describes: {str(err)[:300]}") from None
    return LoadedModel(description, network.to(device).eval(), source)


def write_model_dir(model_dir: Path, description: ModelDescription, state_dict: dict, code_root: Path) -> None:
    """SageMaker's model folder (``model.tar.gz``): ``model.pt``, ``model.json`` (the description,
    readable without torch) and ``code/`` (``inference.py``, the ``brainseg`` package and the
    requirements), the layout SageMaker's PyTorch serving container loads a handler from."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / MODEL_FILE).write_bytes(artifact_bytes(description, state_dict))
    (model_dir / DESCRIPTION_FILE).write_text(json.dumps(description.to_dict(), indent=1, sort_keys=True))
    code = model_dir / "code"
    for source in [code_root / "inference.py", code_root / "requirements.txt",
                   *sorted((code_root / "brainseg").rglob("*.py"))]:
        target = code / source.relative_to(code_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
