"""Score fusion: per-task probabilities → one ranking score, configurable per scene.

- weighted sum:     p_click + Σ_i w_i · p_i   (over the other tasks)
- weighted product: Π_i (1 + w_i · p_i) ^ α_i (over the tasks with a weight)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from recsys.artifacts import FloatArray
from recsys.errors import InvalidArgument

FusionMethod = Literal["weighted_sum", "weighted_product"]
PRIMARY_TASK = "click"


@dataclass(frozen=True)
class Fusion:
    method: FusionMethod = "weighted_sum"
    weights: Mapping[str, float] = field(default_factory=lambda: {"like": 1.0})
    exponents: Mapping[str, float] = field(default_factory=dict)

    def validate(self, tasks: tuple[str, ...], field_name: str = "fusion") -> None:
        unknown = sorted(set(self.weights) - set(tasks))
        if unknown:
            raise InvalidArgument(
                f"{field_name}.weights", f"unknown tasks {unknown} (model has {list(tasks)})"
            )
        unknown = sorted(set(self.exponents) - set(tasks))
        if unknown:
            raise InvalidArgument(
                f"{field_name}.exponents", f"unknown tasks {unknown} (model has {list(tasks)})"
            )

    def fuse(self, task_scores: Mapping[str, FloatArray]) -> FloatArray:
        if self.method == "weighted_sum":
            total = np.array(task_scores[PRIMARY_TASK], dtype=np.float64, copy=True)
            for task, weight in self.weights.items():
                if task != PRIMARY_TASK:
                    total += weight * np.asarray(task_scores[task], dtype=np.float64)
            return total.astype(np.float32)
        product = np.ones_like(np.asarray(next(iter(task_scores.values())), dtype=np.float64))
        for task, weight in self.weights.items():
            exponent = self.exponents.get(task, 1.0)
            product *= np.power(1.0 + weight * np.asarray(task_scores[task], dtype=np.float64), exponent)
        return product.astype(np.float32)
