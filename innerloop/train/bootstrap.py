"""The confidence band of ``innerloop compare``: a paired bootstrap over windows, widened for few windows.

Every compared model reads the same windows, so a model's difference to the baseline is resampled
window by window (:func:`bootstrap_difference`). A plain percentile band is too narrow when the windows
are few: simulated with a true difference of 0, a "95%" band over 4 windows left 0 out in about 20% of
trials, over 8 in about 11%. The band here is Hesterberg's *expanded percentile* bootstrap (Hesterberg,
"What teachers should know about the bootstrap", The American Statistician 69(4), 2015): its quantiles
are taken at the tail ``Phi(-sqrt(n / (n - 1)) * t_{n-1})`` instead of ``(1 - confidence) / 2``, which
turns the normal quantile into Student's t with the sample variance's ``n - 1``. Simulated with 2000
trials of normal per-window differences of mean 0 (1000 resamples), it left 0 out in 7.0% of trials over
6 windows, 6.6% over 8, 4.9% over 16 and 5.5% over 32 (each +-0.6%); skewed differences need more
windows: with log-normal ones (shifted to mean 0) it left 0 out in 18.0%, 17.9%, 13.5% and 10.3%.
Heavy tails (review s52r, 600 trials each, +-1%): Student's t with 3 degrees of freedom left it out in
4.7% over 8 windows, 7.2% over 16, 5.8% over 32 and 6.2% over 64; a few huge-loss windows (each window
with probability 5% of a 20 times wider spread) in 6.8%, 7.0%, 7.8% and 9.8%, worse with more windows
until the rare ones are in most samples: the band is approximate away from normal differences. Fewer
than :data:`MIN_BAND_WINDOWS` windows get no band (NaN): no percentile band over so few values (it
cannot reach past their range) covers what it says, so none is claimed. The windows counted are, per
position bucket, those that score a token of it (windows padded or partly unscored leave a bucket
empty in some): a bucket scored in one window alone had a band of no width, certainty from one window.
"""

from __future__ import annotations

import math
import numbers
from statistics import NormalDist
from typing import Any

import torch

from innerloop.config.load import given_argument
from innerloop.core.functional import TORCH_SEEDS, TORCH_SEEDS_TEXT, as_integer
from innerloop.train.metrics import described

DEFAULT_RESAMPLES = 1000
"""Bootstrap resamples of the windows."""

MIN_BAND_WINDOWS = 6
"""Windows below which a difference has no band (see the module docstring)."""


MIN_TAIL_RESAMPLES = 10
"""Resamples beyond each end of a band below which :func:`few_resamples_note` warns: a band's end is a
quantile of the resamples, and with a handful beyond it the end moves with the seed (1 resample gives a
band of no width that need not hold the mean)."""


def few_resamples_note(
    resamples: int, confidence: float, windows: int | None = None, default: int = DEFAULT_RESAMPLES
) -> str | None:
    """A note when ``resamples`` leave fewer than :data:`MIN_TAIL_RESAMPLES` beyond each end of a
    ``confidence`` band (None when enough do): the band is then a rough one, whatever its width says.
    With ``windows``, the ends are those of the band over that many windows, the :func:`expanded_tail`
    quantiles (0.24% over 6 windows for a 95% band, not 2.5%); below :data:`MIN_BAND_WINDOWS` there is
    no band and no note. ``default``: the command's default number of resamples, which the note names. The
    note names ``resamples`` as its caller gave it (:func:`~innerloop.config.load.given_argument`:
    ``--resamples 2000`` on the command line, ``resamples=2000`` from Python)."""
    share = (1 - confidence) / 2
    if windows is not None:
        if windows < MIN_BAND_WINDOWS:
            return None
        share = expanded_tail(windows, confidence)
    tail = resamples * share
    if tail >= MIN_TAIL_RESAMPLES - 1e-9:  # 100 resamples of an 80% band leave 10, not 9.999...
        return None
    needed = math.ceil(MIN_TAIL_RESAMPLES / share - 1e-9)
    counted = "1 bootstrap resample leaves" if resamples == 1 else f"{resamples} bootstrap resamples leave"
    over = "" if windows is None else f" over {windows} windows (its ends are the {share:.2%} quantiles)"
    return (
        f"{counted} {tail:.3g} beyond each end of "
        f"a {100 * confidence:.0f}% band{over}, so its ends move with the seed and it may not cover as often "
        f"as it says: use {given_argument('resamples', needed, quoted=False)} or more for bands to report "
        f"(the default is {default})"
    )


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
    windows, ``low``/``high`` the :func:`expanded_tail` and ``1 -`` it quantiles (``torch.nanquantile``,
    linear, over the resamples that hold a token of the bucket) of the same ratio over the resamples. NaN
    where a bucket has no tokens; ``low``/``high`` NaN where fewer than :data:`MIN_BAND_WINDOWS` windows
    score a token of the bucket (the expanded tail is that of the windows that do), and in a bucket where
    a window's difference is not finite (an inf or NaN loss).
    """
    if not (_real_tensor(differences, "floating") and _real_tensor(counts, "number")):
        raise ValueError(
            "differences must be a floating-point tensor and counts a tensor of numbers (not bool or complex), "
            f"got {described(differences)} and {described(counts)}"
        )
    if differences.shape != counts.shape or differences.dim() != 2 or differences.shape[0] < 1:
        raise ValueError(
            f"differences and counts must both be [windows >= 1, buckets], got {tuple(differences.shape)} "
            f"and {tuple(counts.shape)}"
        )
    resamples, seed = checked_resamples(resamples), checked_seed(seed)
    _check_probability("confidence", confidence)
    differences, counts = differences.double(), counts.double()
    if not bool(((counts >= 0) & torch.isfinite(counts)).all()):
        raise ValueError("counts must be finite numbers of scored tokens >= 0")
    total = counts.sum(0)
    mean = torch.where(total > 0, differences.sum(0) / total, math.nan)  # NaN: a bucket without tokens
    windows = differences.shape[0]
    if windows < MIN_BAND_WINDOWS:
        nan = torch.full_like(mean, math.nan)
        return mean, nan, nan.clone()
    generator = torch.Generator().manual_seed(seed)
    # 1000 resamples at a time, their picks drawn then from the one generator (the same numbers as one
    # [R, W] draw): [R, W, K] at once is R * W * K * 8 bytes (6.5 GB for 100,000 x 512 x 16), and the
    # picks alone R * W * 8 (10 GB for 20,000,000 resamples of 64 windows)
    chunks = []
    for start in range(0, resamples, 1000):
        picks = torch.randint(windows, (min(1000, resamples - start), windows), generator=generator)
        chunks.append(differences[picks].sum(1) / counts[picks].sum(1))
    low, high = _bucket_bands(torch.cat(chunks), (counts > 0).sum(0), confidence)
    if not bool(torch.isfinite(differences).all()):  # an inf or NaN loss: no spread to speak of
        low, high = (torch.where(torch.isfinite(differences).all(0), q, math.nan) for q in (low, high))
    return mean, low, high


def _bucket_bands(
    resampled: torch.Tensor, holding: torch.Tensor, confidence: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The band ends ``(low [K], high [K])`` of each bucket from its resampled ratios ``resampled [R, K]``,
    at the :func:`expanded_tail` of the ``holding [K]`` windows that score a token of it (a bucket's
    sample is those windows, not every window read: padding leaves the others nothing there); NaN for
    a bucket scored in fewer than :data:`MIN_BAND_WINDOWS` windows (in one alone every resample that
    holds it gives the same ratio: a band of no width)."""
    low = torch.full((resampled.shape[1],), math.nan, dtype=torch.float64)
    high = low.clone()
    for number in sorted({int(n) for n in holding if n >= MIN_BAND_WINDOWS}):
        bucket = holding == number
        tail = expanded_tail(number, confidence)
        # nanquantile: a resample may hold no scored token of a bucket (0 / 0) that other windows have
        ends = torch.tensor([tail, 1 - tail], dtype=torch.float64)
        low[bucket], high[bucket] = torch.nanquantile(resampled[:, bucket], ends, dim=0)
    return low, high


def _real_tensor(value: Any, kind: str) -> bool:
    """Whether ``value`` is a tensor of real numbers: floating-point ones (``kind="floating"``), or also
    integers (``"number"``); a bool or complex tensor is neither (``.double()`` took them as numbers)."""
    if not isinstance(value, torch.Tensor) or value.dtype == torch.bool or value.is_complex():
        return False
    return kind == "number" or value.is_floating_point()


def expanded_tail(windows: int, confidence: float) -> float:
    """The lower quantile of the expanded percentile band over ``windows >= 2`` values:
    ``Phi(-sqrt(n / (n - 1)) * t_{n-1}((1 + confidence) / 2))``, below ``(1 - confidence) / 2``."""
    number = as_integer(windows)
    if number is None or number < 2:
        raise ValueError(f"windows={windows!r} must be an integer >= 2")
    windows = number
    _check_probability("confidence", confidence)
    z = math.sqrt(windows / (windows - 1)) * student_t_quantile((1 + confidence) / 2, windows - 1)
    return NormalDist().cdf(-z)


LARGE_DOF = 1e6
"""Degrees of freedom from which Student's t is computed from the normal distribution with its first
corrections in ``1 / dof`` (Cornish-Fisher for quantiles, Edgeworth for the tail; their error is of
order ``dof^-2`` or smaller, below 1e-11), not from the incomplete beta function, whose ``lgamma`` terms
lose digits there."""


def student_t_quantile(probability: float, dof: float) -> float:
    """The ``probability`` quantile of Student's t with ``dof > 0`` degrees of freedom (``inf``: the
    normal distribution): bisection on the tail :func:`student_t_tail` to about 1e-12 relative, or
    from :data:`LARGE_DOF` on the Cornish-Fisher expansion. A quantile past 1e150 (a tiny ``dof``) is a
    ValueError."""
    _check_probability("probability", probability)
    _check_dof(dof)
    if dof >= LARGE_DOF:
        z = NormalDist().inv_cdf(probability)
        return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)
    tail = probability if probability < 0.5 else 1 - probability  # P(T > |quantile|)
    low, high = 0.0, 1.0
    while student_t_tail(high, dof) > tail:
        low, high = high, 2 * high
        if high > 1e150:
            raise ValueError(
                f"the {probability} quantile of Student's t with dof={dof} is past 1e150, beyond this function"
            )
    while high - low > 1e-12 * max(1.0, high):
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_tail(middle, dof) > tail else (low, middle)
    quantile = (low + high) / 2
    return quantile if probability >= 0.5 else -quantile


def student_t_cdf(t: float, dof: float) -> float:
    """``P(T <= t)`` for Student's t with ``dof > 0`` degrees of freedom (``inf``: the normal)."""
    if _not_a_number(t) or math.isnan(t):
        raise ValueError(f"t={t!r} must be a number (not NaN)")
    upper = student_t_tail(abs(t), dof)
    return 1 - upper if t >= 0 else upper


def student_t_tail(t: float, dof: float) -> float:
    """``P(T > t)`` for ``t >= 0``: ``I_{dof / (dof + t^2)}(dof / 2, 1 / 2) / 2``, with ``1 - x`` given
    as ``t^2 / (dof + t^2)`` (no cancellation for large ``dof``)."""
    _check_dof(dof)
    if _not_a_number(t) or not t >= 0:
        raise ValueError(f"t={t!r} must be a number >= 0")
    if math.isinf(t):
        return 0.0
    if dof >= LARGE_DOF:  # Edgeworth: P(T > t) = Phi(-t) + phi(t) (t^3 + t) / (4 dof) + O(dof^-2)
        return NormalDist().cdf(-t) + NormalDist().pdf(t) * (t**3 + t) / (4 * dof)
    denominator = dof + t * t
    return 0.5 * _incomplete_beta(dof / denominator, t * t / denominator, dof / 2, 0.5)


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """``I_x(a, b)`` for ``0 <= x <= 1`` and finite ``a, b > 0``: the continued fraction of
    ``I_x(a, b)`` evaluated by Lentz's method where it converges fast (``x < (a + 1) / (a + b + 2)``),
    else ``1 - I_{1-x}(b, a)``; a ValueError where it does not converge (``a`` or ``b`` past about
    1e6)."""
    for name, value in (("a", a), ("b", b)):
        if _not_a_number(value) or not 0 < value < math.inf:
            raise ValueError(f"{name}={value!r} must be a finite number > 0")
    if _not_a_number(x) or not 0 <= x <= 1:
        raise ValueError(f"x={x!r} must be a number in [0, 1]")
    return _incomplete_beta(x, 1.0 - x, a, b)


def _incomplete_beta(x: float, y: float, a: float, b: float) -> float:
    """``I_x(a, b)`` with ``y = 1 - x`` given (computed without cancellation by the caller)."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _incomplete_beta(y, x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
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
    for m in range(1, 10_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 / clamp(1.0 + numerator * d)
            c = clamp(1.0 + numerator / c)
            value *= c * d
        if abs(c * d - 1.0) < 1e-15:
            return value
    raise ValueError(f"the incomplete beta function I_x(a, b) at x={x}, a={a}, b={b} did not converge")


def _not_a_number(value: Any) -> bool:
    """Whether ``value`` is not a real number (a bool, a str, a tensor are not; numpy's numbers are)."""
    return isinstance(value, bool) or not isinstance(value, numbers.Real)


MAX_RESAMPLES = 10**7
"""The most bootstrap resamples: far more than a band's quantiles need (their Monte Carlo error at 10**5
is already a few thousandths of the band), and few enough that the resampled means, ``[R, buckets]`` in
float64, fit in memory (1.3 GB for 16 buckets); at 2**31 - 1 a band ran out of memory with a bare error."""


def checked_resamples(resamples: Any) -> int:
    """``resamples`` as an int (a numpy or 0-d torch integer is one), or a ValueError naming it."""
    number = as_integer(resamples)
    if number is None or not 1 <= number <= MAX_RESAMPLES:
        raise ValueError(f"resamples={resamples!r} must be an integer in [1, {MAX_RESAMPLES}]")
    return number


def checked_seed(seed: Any) -> int:
    """``seed`` as an int that ``torch.Generator.manual_seed`` takes, or a ValueError naming it."""
    number = as_integer(seed)
    if number is None or number not in TORCH_SEEDS:
        raise ValueError(f"seed={seed!r} must be an integer in {TORCH_SEEDS_TEXT}")
    return number


def _check_probability(name: str, value: Any) -> None:
    if _not_a_number(value) or not 0 < value < 1:
        raise ValueError(f"{name}={value!r} must be a number in (0, 1)")


def _check_dof(dof: Any) -> None:
    if _not_a_number(dof) or not dof > 0:
        raise ValueError(f"dof={dof!r} must be a number > 0 (inf: the normal distribution)")
