"""Argument checks shared by the numeric builders (CF tables, EASE): a bad array raises a
ValueError naming the argument and what it got, before any work starts."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.ndim}-D {value.dtype} array"
    return type(value).__name__


def check_index(
    name: str, index: np.ndarray, size: int, size_name: str, dtype: npt.DTypeLike = np.int64
) -> np.ndarray:
    """`index` as a 1-D array of `dtype` whose values all lie in [0, size)."""
    if not isinstance(size, int | np.integer) or isinstance(size, bool) or size < 1:
        raise ValueError(f"{size_name}: expected a positive integer, got {size!r}")
    if not isinstance(index, np.ndarray) or index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"{name}: expected a 1-D integer array, got {describe(index)}")
    if index.size and (int(index.min()) < 0 or int(index.max()) >= size):
        bad = index[(index < 0) | (index >= size)][0]
        raise ValueError(f"{name}: {bad} is outside [0, {size_name}={size})")
    return index.astype(dtype, copy=False)
