"""Student-t figures over seeds, against published table values."""

import math

import pytest

from csr.engine.evaluate.over_seeds import mean_interval, paired_t_test, t_quantile, t_two_sided_p


@pytest.mark.parametrize(("df", "quantile"), [(1, 12.706205), (2, 4.302653), (4, 2.776445), (9, 2.262157),
                                              (30, 2.042272)])
def test_t_quantiles_match_the_tables(df, quantile):
    assert t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-5)


@pytest.mark.parametrize(("t", "df", "p"), [(2.0, 10, 0.0733880), (1.0, 1, 0.5), (3.0, 4, 0.0399420),
                                            (0.0, 5, 1.0)])
def test_two_sided_p_values(t, df, p):
    assert t_two_sided_p(t, df) == pytest.approx(p, abs=1e-6)


def test_mean_interval_over_seeds():
    got = mean_interval([0.30, 0.20, 0.25])
    half = 4.302653 * 0.05 / math.sqrt(3)
    assert (got.mean, got.low, got.high, got.n) == pytest.approx((0.25, 0.25 - half, 0.25 + half, 3), abs=1e-6)
    assert mean_interval([0.4]).low == mean_interval([0.4]).high == 0.4


def test_paired_test_uses_the_per_seed_differences():
    a, b = [0.30, 0.20, 0.25, 0.28, 0.22], [0.35, 0.26, 0.29, 0.30, 0.27]
    got = paired_t_test(a, b)
    # differences -0.05 -0.06 -0.04 -0.02 -0.05: mean -0.044, sd 0.0151658, t = -6.48743, df 4
    assert got.difference == pytest.approx(-0.044)
    assert got.p_value == pytest.approx(t_two_sided_p(6.48743, 4), rel=1e-4)
    assert got.p_value < 0.01 and got.high < 0
    assert paired_t_test([0.1, 0.2], [0.1, 0.2]).p_value == 1.0
    with pytest.raises(ValueError):
        paired_t_test([0.1], [0.1, 0.2])
