"""Augmentation: deterministic per generator, labels moved with the image and kept to their values,
intensity changes per channel."""

from __future__ import annotations

import numpy as np
import pytest

from brainseg.data import augment as aug


def _blob_patch():
    """A patch whose first channel is bright exactly where the label is (2 inside, 4 at the core)."""
    z, y, x = np.ogrid[:16, :32, :32]
    radius = np.sqrt(((z - 8) / 5.0) ** 2 + ((y - 14) / 9.0) ** 2 + ((x - 17) / 7.0) ** 2)
    label = np.where(radius < 1.0, 2, 0).astype(np.uint8)
    label[radius < 0.4] = 4
    image = np.stack([np.where(label > 0, 10.0, 0.0), np.linspace(-1, 1, label.size).reshape(label.shape)])
    return image.astype(np.float32), label


def test_a_patch_depends_only_on_its_generator():
    image, label = _blob_patch()
    outputs = [aug.augment(image, label, np.random.default_rng([7, task])) for task in (1, 2, 1)]
    assert np.array_equal(outputs[0][0], outputs[2][0]) and np.array_equal(outputs[0][1], outputs[2][1])
    assert not np.array_equal(outputs[0][0], outputs[1][0])
    for augmented, labels in outputs:
        assert augmented.dtype == np.float32 and augmented.shape == image.shape and labels.shape == label.shape
        assert set(np.unique(labels)) <= {0, 2, 4}


@pytest.mark.parametrize("seed", range(6))
def test_rotation_scaling_and_elastic_move_the_label_with_the_image(monkeypatch, seed):
    monkeypatch.setattr(aug, "SPATIAL_PROBABILITY", 1.0)
    for name in ("BIAS_PROBABILITY", "GAMMA_PROBABILITY", "BLUR_PROBABILITY", "LOW_RES_PROBABILITY",
                 "NOISE_PROBABILITY"):
        monkeypatch.setattr(aug, name, 0.0)
    image, label = _blob_patch()
    augmented, labels = aug.augment(image, label, np.random.default_rng(seed))
    assert not np.array_equal(labels, label)  # it did move
    bright, inside = augmented[0] > 5.0 * augmented[0].max() / 10.0, labels > 0
    dice = 2 * np.count_nonzero(bright & inside) / (np.count_nonzero(bright) + np.count_nonzero(inside))
    assert dice > 0.9
    assert 0.6 < np.count_nonzero(labels == 4) / np.count_nonzero(label == 4) < 1.8  # the core is kept, scaled


def test_intensity_changes_are_drawn_per_channel(monkeypatch):
    monkeypatch.setattr(aug, "SPATIAL_PROBABILITY", 0.0)
    for name in ("BIAS_PROBABILITY", "GAMMA_PROBABILITY", "BLUR_PROBABILITY", "LOW_RES_PROBABILITY"):
        monkeypatch.setattr(aug, name, 1.0)
    same = np.random.default_rng(0).normal(size=(1, 16, 32, 32)).astype(np.float32)
    image = np.concatenate([same, same])
    label = np.zeros((16, 32, 32), dtype=np.uint8)
    augmented, labels = aug.augment(image, label, np.random.default_rng(3))
    assert not np.allclose(augmented[0], augmented[1])  # the two copies of one channel now differ
    assert augmented[0].std() < same.std()  # blurred (and resampled at a lower resolution)
    assert not labels.any()
