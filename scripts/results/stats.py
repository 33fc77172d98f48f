"""Statistics over seeds: the mean, the sample standard deviation, the half-width of the mean's 95% confidence
interval (Student's t, with the exact 0.975 quantile) and paired differences. One value is the case n = 1: its
mean is the value, its standard deviation and half-width are None.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

Z_975 = 1.959963984540054  # the standard normal's 0.975 quantile, the limit of t_{0.975, df}


def mean(values: list[float]) -> float:
    """x̄ = Σ x_i / n (n ≥ 1)."""
    return sum(values) / len(values)


def sample_std(values: list[float]) -> float | None:
    """s = sqrt(Σ (x_i - x̄)² / (n - 1)), the sample standard deviation; None for n < 2."""
    if len(values) < 2:
        return None
    centre = mean(values)
    return math.sqrt(sum((x - centre) ** 2 for x in values) / (len(values) - 1))


def t_central_probability(t: float, df: int) -> float:
    """A(t | ν) = P(|T| < t) for Student's T with ν = df degrees of freedom (t ≥ 0), in closed form
    (Abramowitz & Stegun 26.7.3-4), with θ = atan(t / √ν) and c = cos θ:
    ν = 1: A = 2θ/π;
    ν odd > 1: A = (2/π)·(θ + sin θ·(c + (2/3)c³ + (2·4)/(3·5)c⁵ + ... + (2·4···(ν−3))/(3·5···(ν−2))·c^(ν−2)));
    ν even: A = sin θ·(1 + (1/2)c² + (1·3)/(2·4)c⁴ + ... + (1·3···(ν−3))/(2·4···(ν−2))·c^(ν−2))."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:
        term, total = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):  # the k-th term, k = 1 .. (ν−1)/2, is c^(2k−1) times its ratio
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + math.sin(theta) * total)  # ν = 1: no terms, 2θ/π
    term, total = 1.0, 0.0
    for k in range(1, df // 2 + 1):  # the k-th term, k = 1 .. ν/2, is c^(2k−2) times its ratio
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * total


@functools.lru_cache(maxsize=None)  # a bisection per df, asked for once per table cell
def t_975(df: int) -> float:
    """t_{0.975, df}, the 0.975 quantile of Student's t with df degrees of freedom: the t ≥ 0 at which
    `t_central_probability(t, df)` = 0.95, found by bisection for df ≤ 1000 (within about 1e-13, the accuracy of
    the sum); beyond, the Cornish-Fisher expansion in 1/df around z = Z_975 (Abramowitz & Stegun 26.7.5),
    t = z + g1/df + g2/df² + g3/df³ + g4/df⁴ with g1 = (z³ + z)/4, g2 = (5z⁵ + 16z³ + 3z)/96,
    g3 = (3z⁷ + 19z⁵ + 17z³ - 15z)/384, g4 = (79z⁹ + 776z⁷ + 1482z⁵ - 1920z³ - 945z)/92160
    (within 1e-13 of the exact quantile there; Z_975 as df → ∞). t_975(1) = tan(0.475π) = 12.7062..., t_975(2) =
    0.95·√(2/(1 − 0.95²)) = 4.3026...."""
    if df < 1:
        raise ValueError(f't_975: df must be at least 1, got {df}')
    if df <= 1000:
        low, high = Z_975, 13.0  # t_975 falls from 12.71 (df 1) towards Z_975
        while True:
            middle = (low + high) / 2
            if middle in (low, high):
                return middle
            low, high = (middle, high) if t_central_probability(middle, df) < 0.95 else (low, middle)
    z = Z_975
    g = ((z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
         (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
         (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160)
    return z + sum(term / df ** power for power, term in enumerate(g, start=1))


def ci95_half_width(values: list[float]) -> float | None:
    """h = t_{0.975, n-1} · s / √n, the half-width of the 95% confidence interval x̄ ± h of the mean (Student's t,
    s the sample standard deviation); None for n < 2."""
    std = sample_std(values)
    return None if std is None else t_975(len(values) - 1) * std / math.sqrt(len(values))


def paired_differences(values: dict, reference: dict) -> dict:
    """{seed: d_s} with d_s = values[s] - reference[s], over the seeds both hold a number for (in the order of
    `values`): the pairs of a paired comparison, whose mean ± ci95_half_width is the interval of the difference."""
    return {seed: value - reference[seed] for seed, value in values.items()
            if value is not None and reference.get(seed) is not None}


@dataclass(frozen=True)
class Estimate:
    """A cell over seeds: n values, their mean, sample standard deviation and 95% half-width (None for n = 1)."""
    n: int
    mean: float
    std: float | None
    ci95: float | None

    @property
    def excludes_zero(self) -> bool:
        """Whether the 95% interval mean ± ci95 lies wholly on one side of zero (never for n = 1)."""
        return self.ci95 is not None and abs(self.mean) > self.ci95


def estimate(values: list) -> Estimate | None:
    """The Estimate of the numbers among `values` (None ones are left out); None when there are none."""
    numbers = [float(value) for value in values if value is not None]
    if not numbers:
        return None
    return Estimate(len(numbers), mean(numbers), sample_std(numbers), ci95_half_width(numbers))
