"""The learning-rate range test: its reading of a curve, and a sweep in this process (a process-mode
run is in test_launch)."""

from __future__ import annotations

import numpy as np
import pytest

from brainseg.config import Hyperparameters
from brainseg.run.lr_find import schedule, smooth, suggest


def test_the_schedule_is_exponential_from_min_to_max():
    lrs = schedule(1e-6, 1.0, 61)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert np.allclose(lrs[1:] / lrs[:-1], 10 ** 0.1)


def test_smoothing_is_bias_corrected():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0 at the start
    assert smooth([1.0, 3.0], beta=0.5) == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])


def test_the_suggestion_is_the_steepest_descent_before_the_minimum():
    """A loss that falls fastest at lr 1e-3 (a logistic in log lr), bottoms out near 3e-2 and then
    explodes: the suggestion is 1e-3, the other rule a tenth of the minimum's rate."""
    lrs = schedule(1e-6, 1.0, 121)
    x = np.log10(lrs)
    loss = 1.0 - 0.8 / (1 + np.exp(-4 * (x + 3))) + np.where(x > -1.5, (x + 1.5) ** 2 * 3, 0)
    reading = suggest(list(lrs), list(loss))
    assert reading["suggested_lr"] == pytest.approx(1e-3, rel=0.13)
    lowest = lrs[int(np.argmin(loss))]
    assert reading["min_loss_lr"] == pytest.approx(lowest / 10)
    assert 1e-2 < lowest < 1e-1


def test_a_curve_too_short_is_refused_with_the_remedy():
    with pytest.raises(ValueError, match="lower lr_find_min"):
        suggest([1e-3, 1e-2], [1.0, 5.0])


@pytest.mark.parametrize("overrides, message", [
    ({"lr_find_steps": 5}, "lr_find_steps 5: expected at least 10"),
    ({"lr_find_min": 1.0, "lr_find_max": 0.1}, "expected 0 < min < max"),
])
def test_bad_sweep_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        Hyperparameters(data_uri="s3://d/x/", output_uri="s3://o/", task="lr_find", **overrides)


def test_a_range_test_in_this_process_leaves_no_cache_behind(tmp_path):
    """The sweep reads through the local cache like training and turns it off when it ends."""
    import json

    from brainseg.commands import train
    from brainseg.io import cache, s3
    from tests.conftest import synthetic_dataset

    data = synthetic_dataset("lr-find-data", 6)
    output = data.replace("/ds/", "/runs")
    assert train.main(["--data-uri", data, "--output-uri", output, "--run-name", "sweep", "--task", "lr_find",
                       "--lr-find-steps", "12", "--channels", "8,16", "--patch-size", "16,32,32", "--res-units", "1",
                       "--num-workers", "0", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert json.loads(s3.read_uri(f"{output}/sweep/lr_find.json"))["steps"] > 0
    assert cache.active() is None and any((tmp_path / "cache").iterdir())
