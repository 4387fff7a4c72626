"""Augmentation: deterministic per generator, labels moved with the image and kept to their values,
intensity changes per channel; a batch augmented on its device equals each patch augmented alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainseg.data import augment as aug


def _augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One patch, drawn from ``rng`` as a worker does and applied as the trainer does (a batch of one)."""
    draws = aug.draw(rng, image.shape[0], image.shape[2] == image.shape[3])
    out, labels = aug.augment_batch(torch.from_numpy(image)[None], torch.from_numpy(label)[None, None],
                                    torch.from_numpy(draws)[None])
    return out[0].numpy(), labels[0, 0].numpy()


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
    outputs = [_augment(image, label, np.random.default_rng([7, seed])) for seed in (1, 2, 1)]
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
    augmented, labels = _augment(image, label, np.random.default_rng(seed))
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
    augmented, labels = _augment(image, label, np.random.default_rng(3))
    assert not np.allclose(augmented[0], augmented[1])  # the two copies of one channel now differ
    assert augmented[0].std() < same.std()  # blurred (and resampled at a lower resolution)
    assert not labels.any()


def _batch(size: int, seeds, monkeypatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    monkeypatch.setattr(aug, "SPATIAL_PROBABILITY", 0.5)  # a batch that mixes moved and unmoved patches
    monkeypatch.setattr(aug, "NOISE_PROBABILITY", 0.5)
    images, labels = [], []
    for index in range(size):
        image, label = _blob_patch()
        images.append(np.roll(image, index, axis=-1))
        labels.append(np.roll(label, index, axis=-1))
    draws = np.stack([aug.draw(np.random.default_rng([5, seed]), 2, True) for seed in seeds])
    assert draws[:, :3].any(axis=1).any() and not draws[:, :3].any(axis=1).all()
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))[:, None], torch.from_numpy(draws)


def test_a_batch_augmented_together_equals_each_patch_augmented_alone(monkeypatch):
    images, labels, draws = _batch(6, range(6), monkeypatch)
    together, together_labels = aug.augment_batch(images, labels, draws)
    for b in range(6):
        alone, alone_label = aug.augment_batch(images[b:b + 1], labels[b:b + 1], draws[b:b + 1])
        assert torch.allclose(together[b], alone[0], atol=1e-5)
        assert torch.equal(together_labels[b], alone_label[0])
    again, again_labels = aug.augment_batch(images, labels, draws)
    assert torch.equal(again, together) and torch.equal(again_labels, together_labels)  # deterministic
    assert together.dtype == torch.float32 and together_labels.dtype == labels.dtype
    assert draws.shape[1] == aug.draws_length(2)


def test_sequence_dropout_zeroes_one_drawn_sequence_and_changes_nothing_else():
    image, label = _blob_patch()
    square = image.shape[2] == image.shape[3]
    kept = [aug.draw(np.random.default_rng([3, n]), 2, square) for n in range(40)]
    dropped = [aug.draw(np.random.default_rng([3, n]), 2, square, sequence_dropout=1.0) for n in range(40)]
    assert all(np.array_equal(a[:-1], b[:-1]) for a, b in zip(kept, dropped))  # the other draws are the same
    assert {a[-1] for a in kept} == {-1.0} and {b[-1] for b in dropped} == {0.0, 1.0}  # both sequences drawn
    some = [aug.draw(np.random.default_rng([3, n]), 2, square, sequence_dropout=0.3)[-1] for n in range(400)]
    assert 0.2 < np.mean(np.asarray(some) >= 0) < 0.4
    for n in (0, 1, 2, 3):
        images = torch.from_numpy(image)[None]
        labels = torch.from_numpy(label)[None, None]
        plain, plain_labels = aug.augment_batch(images, labels, torch.from_numpy(kept[n])[None])
        out, out_labels = aug.augment_batch(images, labels, torch.from_numpy(dropped[n])[None])
        gone = int(dropped[n][-1])
        assert torch.count_nonzero(out[0, gone]) == 0
        assert torch.equal(out[0, 1 - gone], plain[0, 1 - gone]) and torch.equal(out_labels, plain_labels)


def test_sequence_dropout_draws_only_among_the_droppable_channels():
    kept = [aug.draw(np.random.default_rng([5, n]), 4, True, sequence_dropout=1.0) for n in range(200)]
    among = [aug.draw(np.random.default_rng([5, n]), 4, True, sequence_dropout=1.0, droppable=(1, 2, 3))
             for n in range(200)]
    assert {a[-1] for a in kept} == {0.0, 1.0, 2.0, 3.0}
    assert {b[-1] for b in among} == {1.0, 2.0, 3.0}  # channel 0 is never dropped
    assert all(np.array_equal(a[:-1], b[:-1]) for a, b in zip(kept, among))
    every = [aug.draw(np.random.default_rng([5, n]), 4, True, sequence_dropout=1.0, droppable=(0, 1, 2, 3))
             for n in range(200)]
    assert all(np.array_equal(a, b) for a, b in zip(kept, every))  # naming them all is the default


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here; the CPU path is checked above")
def test_a_batch_augmented_on_the_gpu_matches_the_cpu(monkeypatch):
    images, labels, draws = _batch(4, (0, 1, 2, 3), monkeypatch)
    draws[:, -4] = 0  # noise (its flag, then std, seed and the dropped sequence) comes from the device's generator
    cpu, cpu_labels = aug.augment_batch(images, labels, draws)
    gpu, gpu_labels = aug.augment_batch(images.cuda(), labels.cuda(), draws)
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-3)
    assert (gpu_labels.cpu() != cpu_labels).float().mean() < 1e-3  # nearest-neighbour ties may round apart

