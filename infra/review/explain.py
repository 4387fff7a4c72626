"""What the model looked at, for the review's worst and best test case (``brainseg-review RUN
--report DIR --explain``): the maps; :mod:`infra.review.report` draws them. Imports torch, which
the rest of the review does not.

Both maps come from the run's own model (``model/model.pt``) on the case's crop: the 32×64×64
voxels around the tumour the training job kept, every sequence normalised as the network saw it.
The network sees only the crop (a full volume gives it more context), so the maps explain the
model's answer on that crop, which the overlays beside them show.

- **Occlusion sensitivity** (after Zeiler and Fergus; MONAI's ``OcclusionSensitivity`` does the
  same for a classifier's one score): a cube of ``OCCLUDER`` voxels, every sequence set to zero
  (the body mean) inside it, placed in turn on every cell of a grid over the crop; a voxel's value
  is how much the predicted tumour's summed probability fell with its cell hidden, as a share of
  the whole. High where the model's evidence is; near 0 where hiding changes nothing; below 0
  where hiding adds tumour.
- **Gradient saliency** per sequence (vanilla gradients, as ``monai.visualize.VanillaGrad``, but of
  a segmentation's tumour logits summed over its predicted voxels instead of a class score):
  ``|d score / d voxel|``, each sequence its own row, scaled by the largest value over all of
  them, so the rows compare: the sequence whose voxels move the prediction most is the one the
  model reads. GradCAM needs a classifier head and a chosen layer; on a U-Net the skip connections
  carry full resolution past any one layer, so it is not used.
"""

from __future__ import annotations

import numpy as np
import torch

from brainseg.model.artifact import LoadedModel, load_model

OCCLUDER = 8  # voxels per side of the hidden cube, and the grid it is placed on
BATCH = 8  # occluded crops per forward pass


def _tumour_probability(output: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """``(N, D, H, W)`` probability of any structure from the network's ``(N, C, D, H, W)`` output."""
    if sigmoid:
        return torch.sigmoid(output).amax(dim=1)
    return 1.0 - torch.softmax(output, dim=1)[:, 0]


def _padded(image: np.ndarray, multiple: int) -> tuple[torch.Tensor, tuple]:
    """``image`` ``(C, D, H, W)`` zero-padded at the end of each axis to a multiple of ``multiple``."""
    shape = image.shape[1:]
    pad = [(-n) % multiple for n in shape]
    padded = np.pad(image, [(0, 0)] + [(0, p) for p in pad])
    return torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32)), tuple(shape)


def occlusion_map(network: torch.nn.Module, image: np.ndarray, sigmoid: bool, multiple: int = 16) -> np.ndarray:
    """``(D, H, W)``: the share of the predicted tumour's summed probability lost with each cell of
    an ``OCCLUDER`` grid hidden (every sequence zeroed there); ``image`` is ``(C, D, H, W)``."""
    tensor, shape = _padded(image, multiple)
    with torch.no_grad():
        base = _tumour_probability(network(tensor[None]), sigmoid)[0]
        region = base > 0.5 if bool((base > 0.5).any()) else torch.ones_like(base, dtype=torch.bool)
        total = float(base[region].sum())
        cells = [(z, y, x) for z in range(0, shape[0], OCCLUDER) for y in range(0, shape[1], OCCLUDER)
                 for x in range(0, shape[2], OCCLUDER)]
        found = np.zeros(shape, dtype=np.float32)
        for start in range(0, len(cells), BATCH):
            group = cells[start:start + BATCH]
            hidden = tensor[None].repeat(len(group), 1, 1, 1, 1)
            for number, (z, y, x) in enumerate(group):
                hidden[number, :, z:z + OCCLUDER, y:y + OCCLUDER, x:x + OCCLUDER] = 0.0
            left = _tumour_probability(network(hidden), sigmoid)
            for number, (z, y, x) in enumerate(group):
                lost = (total - float(left[number][region].sum())) / max(total, 1e-6)
                found[z:z + OCCLUDER, y:y + OCCLUDER, x:x + OCCLUDER] = lost
    return found


def saliency_maps(network: torch.nn.Module, image: np.ndarray, sigmoid: bool, multiple: int = 16) -> np.ndarray:
    """``(C, D, H, W)``: ``|d score / d input|`` per sequence, the score the tumour logits summed over
    the predicted tumour (the whole crop when nothing is predicted)."""
    tensor, shape = _padded(image, multiple)
    tensor = tensor[None].requires_grad_(True)
    output = network(tensor)
    with torch.no_grad():
        region = _tumour_probability(output, sigmoid)[0] > 0.5
        region = region if bool(region.any()) else torch.ones_like(region)
    logits = output[0].amax(dim=0) if sigmoid else output[0, 1:].amax(dim=0) - output[0, 0]
    logits[region].sum().backward()
    gradient = tensor.grad[0].abs().numpy()
    return gradient[(slice(None), *(slice(0, n) for n in shape))]


def _multiple(loaded: LoadedModel) -> int:
    """What each side of the network's input must divide by: one halving per level below the top."""
    return 2 ** max(len(loaded.description.network.get("channels", ())) - 1, 1)


def load_explainer(uri: str) -> LoadedModel:
    """The run's model on the CPU.

    Raises:
        ModelError: no readable model there; s3.S3Error: S3 failed.
    """
    return load_model(uri, torch.device("cpu"))


def explain_crop(loaded: LoadedModel, crop: dict) -> tuple[np.ndarray, np.ndarray]:
    """The occlusion map ``(D, H, W)`` and the saliency maps ``(C, D, H, W)`` of one prediction crop."""
    image = crop["image"].astype(np.float32)
    image = image[None] if image.ndim == 3 else image
    sigmoid = loaded.description.scheme.sigmoid
    return (occlusion_map(loaded.network, image, sigmoid, _multiple(loaded)),
            saliency_maps(loaded.network, image, sigmoid, _multiple(loaded)))
