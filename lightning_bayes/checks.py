"""Type tests for argument checks: a ``bool`` is not a count or a number here (``True`` is an ``int`` to Python)."""

from __future__ import annotations

import math
from typing import Any, TypeGuard


def is_int(value: Any) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> TypeGuard[float]:
    """An ``int`` or ``float`` that is neither a ``bool`` nor NaN (infinities pass: bound them where needed)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
