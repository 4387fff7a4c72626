"""Deployable copies of a trained model for teams that do not run brainseg: TorchScript, ONNX and a
MONAI bundle, each checked against the PyTorch network it came from.

Under the export folder::

    model.ts                   TorchScript (traced; ``torch.jit.load``), logits for any spatial size
                               the network divides evenly
    model.onnx                 ONNX (opset :data:`OPSET`, torch.export), input ``image``
                               ``(batch, channels, D, H, W)`` float32, output ``logits``; batch and
                               spatial sizes are dynamic
    bundle/configs/metadata.json   MONAI bundle metadata: the network's inputs and outputs, versions,
                                   and ``brainseg``: the model description (sequences in channel
                                   order, labels and regions, target spacing, normalisation, sliding
                                   window, postprocessing)
    bundle/configs/inference.json  ``network_def`` (the MONAI network and its arguments), the sliding
                                   window inferer, MONAI transforms for the preprocessing and the
                                   activation and threshold
    bundle/models/model.pt     the state dict ``network_def`` loads
    export.json                what was written, from which model, and the largest difference of each
                               format's logits from PyTorch's on two input sizes

The input each format expects is the network's: the sequences stacked in the description's order,
each z-scored (mean and standard deviation of its voxels above 10% of its 0.5-99.5 percentile
range) or min-max scaled, resampled to the target spacing, in (slice, row, column) order; the
sliding window, sigmoid (regions) or softmax (classes) and the postprocessing rules come after.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import monai
import numpy as np
import onnxruntime
import torch
from monai.bundle import ConfigParser

from brainseg.model.artifact import LoadedModel
from brainseg.model.networks import NetworkSpec, network_arguments

OPSET = 18
TOLERANCE = 1e-3  # the largest absolute logit difference from PyTorch an export may have


def check_sizes(description) -> list[tuple]:
    """Two input sizes to check an export on: the training patch, and one a level's worth larger
    along every axis (so a size fixed at export time would show)."""
    step = 2 ** (len(description.network["channels"]) - 1)
    patch = tuple(description.patch_size)
    return [patch, tuple(size + step for size in patch)]


def output_channels(description) -> list[str]:
    """What each output channel of the network is: a region each (sigmoid), or background and a
    class each (softmax)."""
    names = list(description.scheme.names)
    return names if description.scheme.regions else ["background", *names]


def _example(channels: int, size: tuple, seed: int) -> torch.Tensor:
    return torch.randn(1, channels, *size, generator=torch.Generator().manual_seed(seed))


def write_torchscript(network: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation and tracer notes
        torch.jit.trace(network, example, check_trace=False).save(str(path))


def write_onnx(network: torch.nn.Module, example: torch.Tensor, path: Path, opset: int = OPSET) -> None:
    dynamic = {0: torch.export.Dim("batch", min=1, max=1024), 2: torch.export.Dim.DYNAMIC,
               3: torch.export.Dim.DYNAMIC, 4: torch.export.Dim.DYNAMIC}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(network, (example,), dynamo=True, opset_version=opset, input_names=["image"],
                                    output_names=["logits"], dynamic_shapes=(dynamic,), verbose=False)
    program.save(str(path))


def bundle_files(model: LoadedModel) -> dict:
    """``{relative path: bytes}`` of a MONAI bundle of ``model``."""
    description = model.description
    spec = NetworkSpec(**description.network)
    name, arguments = network_arguments(spec)  # DynUNet's supervision heads idle in eval mode
    regions = bool(description.scheme.regions)
    names = list(description.scheme.names)
    metadata = {
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported from brainseg run {description.run_name or 'model'}"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__, "required_packages_version": {},
        "task": "brain tumour segmentation of multi-sequence MRI",
        "description": f"brainseg {spec.name} trained on {', '.join(description.sequences)}; "
                       f"{'sigmoid regions' if regions else 'softmax classes'} {', '.join(names)}",
        "authors": "brainseg", "copyright": "see the training data's terms", "intended_use": "research only",
        "data_type": "dicom", "image_classes": ", ".join(description.sequences), "label_classes": description.labels,
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "MR",
                                 "num_channels": spec.in_channels, "spatial_shape": list(description.patch_size),
                                 "dtype": "float32", "value_range": [], "is_patch_data": True,
                                 "channel_def": {str(i): s for i, s in enumerate(description.sequences)}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": spec.out_channels,
                                 "spatial_shape": list(description.patch_size), "dtype": "float32",
                                 "value_range": [0, 1], "is_patch_data": True,
                                 "channel_def": {str(i): s for i, s in enumerate(output_channels(description))}}},
        },
        "brainseg": description.to_dict(),
    }
    spacing = list(reversed(description.target_spacing))  # MONAI's (x, y, z) of NIfTI
    inference = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": f"monai.networks.nets.{name}", **arguments},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            *([{"_target_": "Spacingd", "keys": "image", "pixdim": spacing, "mode": "bilinear"}] if spacing else []),
            {"_target_": "Transposed", "keys": "image", "indices": [0, 3, 2, 1]},
            {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True}
            if description.normalization == "zscore" else
            {"_target_": "ScaleIntensityRangePercentilesd", "keys": "image", "lower": 0.5, "upper": 99.5, "b_min": 0.0,
             "b_max": 1.0, "clip": True, "channel_wise": True},
        ]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(description.patch_size), "sw_batch_size": 2,
                    "overlap": description.sw_overlap, "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "sigmoid": regions, "softmax": not regions},
            {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5} if regions else
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        ]},
    }
    weights = io.BytesIO()
    torch.save({key: value.detach().cpu() for key, value in model.network.state_dict().items()}, weights)
    return {"configs/metadata.json": json.dumps(metadata, indent=1).encode(),
            "configs/inference.json": json.dumps(inference, indent=1).encode(),
            "models/model.pt": weights.getvalue(),
            "docs/README.md": _readme(description).encode()}


def _readme(description) -> str:
    return (f"# brainseg model {description.run_name or ''}\n\n"
            "`configs/inference.json` holds the network (`network_def`), the sliding-window inferer and MONAI "
            "transforms close to brainseg's preprocessing; `configs/metadata.json` `brainseg` is the exact record "
            "(sequences in channel order, labels, regions, target spacing, normalisation, postprocessing). "
            "brainseg z-scores each sequence with the mean and standard deviation of its voxels above 10% of "
            "its 0.5-99.5 percentile range; `NormalizeIntensityd(nonzero=True)` approximates that. Research use "
            "only.\n")


def _bundle_network(folder: Path) -> torch.nn.Module:
    """The bundle's network as MONAI builds it from ``inference.json``, with the bundle's weights."""
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(folder / "models" / "model.pt", map_location="cpu", weights_only=True))
    return network.eval()


def export_model(model: LoadedModel, folder: Path, opset: int = OPSET) -> dict:
    """Write every format of ``model`` under ``folder`` and check each against PyTorch on two input
    sizes; returns (and writes as ``export.json``) what was written and the differences.

    Raises:
        ValueError: a format's logits differ from PyTorch's by more than :data:`TOLERANCE`.
    """
    network = model.network.to("cpu").eval()
    description = model.description
    channels = description.network["in_channels"]
    folder.mkdir(parents=True, exist_ok=True)
    example = _example(channels, tuple(description.patch_size), seed=0)
    write_torchscript(network, example, folder / "model.ts")
    write_onnx(network, example, folder / "model.onnx", opset)
    files = ["model.ts", "model.onnx"]
    for relative, data in bundle_files(model).items():
        (folder / "bundle" / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / "bundle" / relative).write_bytes(data)
        files.append(f"bundle/{relative}")
    scripted = torch.jit.load(str(folder / "model.ts"), map_location="cpu")
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    bundled = _bundle_network(folder / "bundle")
    differences = {"torchscript": 0.0, "onnx": 0.0, "bundle": 0.0}
    checked = []
    for seed, size in enumerate(check_sizes(description), start=1):
        image = _example(channels, size, seed)
        with torch.no_grad():
            expected = network(image).numpy()
            found = {"torchscript": scripted(image).numpy(), "onnx": session.run(["logits"], {"image": image.numpy()})[0],
                     "bundle": bundled(image).numpy()}
        for name, logits in found.items():
            differences[name] = max(differences[name], float(np.abs(logits - expected).max()))
        checked.append(list(size))
    report = {"model": model.source, "run_name": description.run_name, "onnx_opset": opset, "files": files,
              "input": {"name": "image", "channels": list(description.sequences), "layout": "NCDHW float32"},
              "output": {"name": "logits", "channels": output_channels(description),
                         "activation": "sigmoid" if description.scheme.regions else "softmax"},
              "checked_sizes": checked, "max_abs_difference": differences, "tolerance": TOLERANCE,
              "torch": torch.__version__, "monai": monai.__version__}
    (folder / "export.json").write_text(json.dumps(report, indent=1))
    worst = {name: value for name, value in differences.items() if value > TOLERANCE}
    if worst:
        raise ValueError(f"the export of {model.source} differs from PyTorch beyond {TOLERANCE}: {worst}")
    return report
