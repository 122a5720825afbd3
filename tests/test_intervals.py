"""The Wilson interval against its closed form's known values, and in reports and tables."""
from __future__ import annotations

import math

import numpy as np
import pytest

from uap.intervals import wilson_interval
from uap.report import Report


@pytest.mark.parametrize("k, n, low, high", [
    (135, 195, 0.6243341034991756, 0.752850817818624),   # scipy.stats.binomtest(...).proportion_ci("wilson")
    (0, 10, 0.0, 0.27753279986288926),
    (10, 10, 0.7224672001371109, 1.0),
    (1, 2, 0.09453120573423074, 0.9054687942657693),
])
def test_wilson_matches_reference_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-12) and hi == pytest.approx(high, abs=1e-12)


def test_wilson_properties():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 2000))
        k = int(rng.integers(0, n + 1))
        lo, hi = wilson_interval(k, n)
        assert 0 <= lo <= k / n <= hi <= 1
        assert wilson_interval(n - k, n) == pytest.approx((1 - hi, 1 - lo), abs=1e-12)  # symmetric
    assert wilson_interval(50, 100)[1] - wilson_interval(50, 100)[0] > wilson_interval(500, 1000)[1] - wilson_interval(500, 1000)[0]
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    for bad in [(-1, 5), (6, 5), (1.5, 5), (True, 5)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def test_report_carries_the_intervals(tmp_path):
    r = Report(perturbations=["v"], models=["m"], fooling_rate=[[135 / 195]], accuracy=[[0.3]], dominant_label=[[1]],
               dominant_share=[[0.2]], embedding_cosine=[[math.nan]], clean_accuracy=[0.9], norm_linf=[0.04],
               norm_l2=[5.0], n_images=195)
    assert r.interval("v", "m") == pytest.approx((0.6243341034991756, 0.752850817818624))
    assert r.to_dict()["fooling_rate_interval"][0][0] == pytest.approx([0.6243341034991756, 0.752850817818624])
    row = r.to_csv().splitlines()
    header, values = row[0].split(","), row[1].split(",")
    assert float(values[header.index("fooling_rate_low")]) == pytest.approx(0.6243341034991756)
    assert Report.from_csv(r.to_csv()) == r and Report.from_dict(r.to_dict()) == r
