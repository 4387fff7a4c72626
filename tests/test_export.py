"""Model export: TorchScript, ONNX (run with onnxruntime) and a MONAI bundle (loaded with MONAI's
ConfigParser) give PyTorch's logits, at sizes other than the one exported with."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from monai.bundle import ConfigParser

from brainseg.io import s3
from brainseg.model.artifact import artifact_bytes
from brainseg.model.description import ModelDescription
from brainseg.model.networks import NetworkSpec, build_model
from infra.launcher import cli as launch

NETWORKS = {
    "unet": NetworkSpec(name="unet", channels=(8, 16, 32), res_units=1, in_channels=2, out_channels=3),
    "dynunet-deep-supervision": NetworkSpec(name="dynunet", channels=(8, 16, 32, 64), res_units=1, in_channels=2,
                                            out_channels=3, deep_supervision=2),
}


def _model_file(tmp_path, spec: NetworkSpec) -> tuple:
    torch.manual_seed(0)
    network = build_model(spec).eval()
    description = ModelDescription(
        network=dataclasses.asdict(spec), task="segmentation", sequences=("t1c", "flair"), labels="ncr=1,ed=2,et=4",
        regions="brats", target_spacing=(2.0, 1.0, 1.0), normalization="zscore", patch_size=(16, 32, 32),
        sw_overlap=0.25, run_name="exported", postprocessing={"et": {"min_mm3": 25.0, "largest_only": False}})
    path = tmp_path / "model.pt"
    path.write_bytes(artifact_bytes(description, network.state_dict()))
    return path, network, description


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_every_format_gives_pytorchs_logits_at_other_sizes(name, tmp_path, bucket):
    path, network, description = _model_file(tmp_path, NETWORKS[name])
    output = f"s3://{bucket}/exports/{name}/"
    assert launch.main(["export", "--model", str(path), "--output", output]) == 0
    folder = tmp_path / "fetched"
    for relative in ("model.ts", "model.onnx", "export.json", "bundle/configs/metadata.json",
                     "bundle/configs/inference.json", "bundle/models/model.pt", "bundle/docs/README.md"):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(s3.read_uri(output + relative))
    report = json.loads((folder / "export.json").read_text())
    step = 2 ** (len(NETWORKS[name].channels) - 1)  # one level larger than the patch along every axis
    assert report["onnx_opset"] == 18 and report["checked_sizes"] == [[16, 32, 32], [16 + step, 32 + step, 32 + step]]
    assert all(value <= 1e-3 for value in report["max_abs_difference"].values())

    image = torch.randn(2, 2, 24, 48, 40, generator=torch.Generator().manual_seed(5))  # batch 2, a size never exported
    with torch.no_grad():
        expected = network(image).numpy()
    proto = onnx.load(str(folder / "model.onnx"))
    assert {entry.domain: entry.version for entry in proto.opset_import}[""] == 18
    assert [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim][1] == 2
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["logits"], {"image": image.numpy()})[0], expected, atol=1e-4)
    scripted = torch.jit.load(str(folder / "model.ts"))
    np.testing.assert_allclose(scripted(image).detach().numpy(), expected, atol=1e-4)

    parser = ConfigParser()
    parser.read_config(str(folder / "bundle" / "configs" / "inference.json"))
    bundled = parser.get_parsed_content("network_def")
    bundled.load_state_dict(torch.load(io.BytesIO((folder / "bundle" / "models" / "model.pt").read_bytes()),
                                       weights_only=True))
    with torch.no_grad():
        np.testing.assert_allclose(bundled.eval()(image).numpy(), expected, atol=1e-4)
    assert parser.get_parsed_content("inferer").roi_size == [16, 32, 32]
    metadata = json.loads((folder / "bundle" / "configs" / "metadata.json").read_text())
    assert metadata["network_data_format"]["inputs"]["image"]["channel_def"] == {"0": "t1c", "1": "flair"}
    assert metadata["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "wt", "1": "tc", "2": "et"}
    assert ModelDescription.from_dict(metadata["brainseg"], "bundle").to_dict() == description.to_dict()  # exactly


def test_what_cannot_be_exported_says_why(tmp_path, capsys):
    assert launch.main(["export", "--model", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "out")]) == 2
    assert "missing.pt" in capsys.readouterr().out
