"""BLoB's geometric KL weights: over a cycle of ``K`` steps, step ``i = 1..K`` weighs the KL by
``w_i = 2^i / (2^(K+1) - 1)``, so most of the KL lands at the end of each cycle (half of it on the last step).
Computed as ``2^(i-K-1) / (1 - 2^-(K+1))``, finite for any ``K``.
Reference: Wang et al., "BLoB", NeurIPS 2024. Blundell et al. (ICML 2015, section 3.4) weigh the other way,
``2^(K-i) / (2^K - 1)``, most of the KL at a cycle's start.
"""

from __future__ import annotations

from ..checks import is_int


def cycle_weight(step: int, cycle_length: int) -> float:
    """``2^i / (2^(K+1) - 1)`` with ``i = (step mod K) + 1``; the weights of one cycle sum to
    ``(2^(K+1) - 2) / (2^(K+1) - 1)``."""
    if not is_int(cycle_length) or cycle_length < 1:
        raise ValueError(f"cycle_length must be a positive int; got {cycle_length!r}")
    i = step % cycle_length + 1
    return 2.0 ** (i - cycle_length - 1) / (1.0 - 2.0 ** -(cycle_length + 1))
