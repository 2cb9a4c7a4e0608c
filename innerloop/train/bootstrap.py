"""The confidence band of ``innerloop compare``: a paired bootstrap over windows, widened for few windows.

Every compared model reads the same windows, so a model's difference to the baseline is resampled
window by window (:func:`bootstrap_difference`). A plain percentile band is too narrow when the windows
are few: simulated with a true difference of 0, a "95%" band over 4 windows left 0 out in about 20% of
trials, over 8 in about 11%. The band here is Hesterberg's *expanded percentile* bootstrap (Hesterberg,
"What teachers should know about the bootstrap", The American Statistician 69(4), 2015): its quantiles
are taken at the tail ``Phi(-sqrt(n / (n - 1)) * t_{n-1})`` instead of ``(1 - confidence) / 2``, which
turns the normal quantile into Student's t with the sample variance's ``n - 1``; the same simulation
leaves 0 out in about 5-6% of trials from 6 windows on. Fewer than :data:`MIN_BAND_WINDOWS` windows get
no band (NaN): no percentile band over so few values (it cannot reach past their range) covers what it
says, so none is claimed.
"""

from __future__ import annotations

import math

import torch

DEFAULT_RESAMPLES = 1000
"""Bootstrap resamples of the windows."""

MIN_BAND_WINDOWS = 6
"""Windows below which a difference has no band (see the module docstring)."""


def bootstrap_difference(
    differences: torch.Tensor,
    counts: torch.Tensor,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean per-token difference per bucket and its expanded percentile bootstrap band over windows.

    Args:
        differences: ``[W, K]`` per window and bucket, the model's summed token loss minus the
            baseline's on the same tokens.
        counts: ``[W, K]`` scored tokens per window and bucket.
        resamples: bootstrap resamples; each draws ``W`` windows with replacement (one
            ``torch.randint(W, (resamples, W))`` from a generator seeded with ``seed``).
        confidence: the band's coverage, in (0, 1).

    Returns ``(mean [K], low [K], high [K])``: ``mean`` is ``sum(differences) / sum(counts)`` over all
    windows, ``low``/``high`` the :func:`expanded_tail` and ``1 -`` it quantiles (``torch.quantile``,
    linear, over the resamples that hold a token of the bucket) of the same ratio over the resamples. NaN
    where a bucket has no tokens; ``low``/``high`` NaN everywhere below :data:`MIN_BAND_WINDOWS` windows,
    and in a bucket where a window's difference is not finite (an inf or NaN loss).
    """
    if differences.shape != counts.shape or differences.dim() != 2 or differences.shape[0] < 1:
        raise ValueError(
            f"differences and counts must both be [windows >= 1, buckets], got {tuple(differences.shape)} "
            f"and {tuple(counts.shape)}"
        )
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"resamples={resamples} must be >= 1 and confidence={confidence} in (0, 1)")
    differences, counts = differences.double(), counts.double()
    mean = differences.sum(0) / counts.sum(0)
    windows = differences.shape[0]
    if windows < MIN_BAND_WINDOWS:
        nan = torch.full_like(mean, math.nan)
        return mean, nan, nan.clone()
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(windows, (resamples, windows), generator=generator)
    # in chunks of resamples: [R, W, K] at once is R * W * K * 8 bytes (6.5 GB for 100,000 x 512 x 16)
    resampled = torch.cat(
        [differences[chunk].sum(1) / counts[chunk].sum(1) for chunk in picks.split(1000)]
    )  # [R, K]
    tail = expanded_tail(windows, confidence)
    # nanquantile: a resample may hold no scored token of a bucket (0 / 0) that other windows have
    low, high = torch.nanquantile(resampled, torch.tensor([tail, 1 - tail], dtype=torch.float64), dim=0)
    if not bool(torch.isfinite(differences).all()):  # an inf or NaN loss: no spread to speak of
        low, high = (torch.where(torch.isfinite(differences).all(0), q, math.nan) for q in (low, high))
    return mean, low, high


def expanded_tail(windows: int, confidence: float) -> float:
    """The lower quantile of the expanded percentile band over ``windows >= 2`` values:
    ``Phi(-sqrt(n / (n - 1)) * t_{n-1}((1 + confidence) / 2))``, below ``(1 - confidence) / 2``."""
    if windows < 2 or not 0 < confidence < 1:
        raise ValueError(f"windows={windows} must be >= 2 and confidence={confidence} in (0, 1)")
    z = math.sqrt(windows / (windows - 1)) * student_t_quantile((1 + confidence) / 2, windows - 1)
    return 0.5 * math.erfc(z / math.sqrt(2))  # Phi(-z)


def student_t_quantile(probability: float, dof: float) -> float:
    """The ``probability`` quantile of Student's t with ``dof > 0`` degrees of freedom (bisection on
    :func:`student_t_cdf`, to about 1e-12)."""
    if not 0 < probability < 1 or not dof > 0:
        raise ValueError(f"probability={probability} must be in (0, 1) and dof={dof} > 0")
    if probability < 0.5:
        return -student_t_quantile(1 - probability, dof)
    low, high = 0.0, 1.0
    while student_t_cdf(high, dof) < probability:
        low, high = high, 2 * high
    while high - low > 1e-12 * max(1.0, high):
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_cdf(middle, dof) < probability else (low, middle)
    return (low + high) / 2


def student_t_cdf(t: float, dof: float) -> float:
    """``P(T <= t)`` for Student's t with ``dof`` degrees of freedom:
    ``1 - I_{dof / (dof + t^2)}(dof / 2, 1 / 2) / 2`` for ``t >= 0``, by symmetry below."""
    upper = 0.5 * regularized_incomplete_beta(dof / (dof + t * t), dof / 2, 0.5)  # P(T > |t|)
    return 1 - upper if t >= 0 else upper


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """``I_x(a, b)`` for ``0 <= x <= 1``, ``a, b > 0``: the continued fraction of ``I_x(a, b)``
    evaluated by Lentz's method where it converges fast (``x < (a + 1) / (a + b + 2)``), else
    ``1 - I_{1-x}(b, a)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction ``1 / (1 + d_1 / (1 + d_2 / (1 + ...)))`` of the incomplete beta function,
    ``d_1 = -(a + b) x / (a + 1)``, ``d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m))`` and
    ``d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))``, by the modified Lentz method."""
    tiny = 1e-300

    def clamp(value: float) -> float:
        return value if abs(value) > tiny else tiny

    c, d = 1.0, 1.0 / clamp(1.0 - (a + b) * x / (a + 1))
    value = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 / clamp(1.0 + numerator * d)
            c = clamp(1.0 + numerator / c)
            value *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return value
