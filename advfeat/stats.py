"""The statistics a robustness claim needs: a binomial confidence interval for an accuracy (Wilson's score
interval) and an exact paired test for two models scored on the same samples (McNemar's).

Examples:
    >>> from advfeat.stats import wilson, mcnemar
    >>> lo, hi = wilson(80, 100)
    >>> round(lo, 3), round(hi, 3)
    (0.711, 0.867)
    >>> mcnemar(only_a=12, only_b=2)  # A is right where B is wrong 12 times, the reverse 2 times
    0.0129
"""

from __future__ import annotations

import math

import torch

__all__ = ["wilson", "mcnemar"]


def wilson(successes: int, total: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion ``successes / total`` at confidence ``level``; (nan, nan)
    for ``total`` 0. Its coverage stays near ``level`` at small counts and near 0 or 1, where the normal
    approximation's does not."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if total < 0 or not 0 <= successes <= total:
        raise ValueError(f"successes must be in [0, total] and total >= 0, got {successes} of {total}")
    if total == 0:
        return math.nan, math.nan
    z = float(torch.special.ndtri(torch.tensor(0.5 + level / 2, dtype=torch.float64)))
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z / (1 + z * z / total) * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends, where rounding would leave 1 - ulp
    hi = 1.0 if successes == total else min(1.0, centre + half)
    return lo, hi


def mcnemar(only_a: int, only_b: int) -> float:
    """The two-sided exact McNemar p-value (a binomial test of the discordant pairs at 1/2): ``only_a`` samples
    one model gets right and the other wrong, ``only_b`` the reverse; 1.0 when there are none. Rounded to 4
    digits."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"only_a and only_b must be counts >= 0, got {only_a} and {only_b}")
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    log_half = n * math.log(0.5)
    tail = sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half)
               for i in range(k + 1))
    return round(min(1.0, 2 * tail), 4)
