"""The metrics a run reports (catalogue with formulas: ``docs/metrics.md``).

Laziness measures of Du et al. (ICLR 2019, ICML 2019), Lee et al. (2019) and Chizat et al.
(2019): how far each layer moved from initialization, how many activation patterns flipped, how
much the Gram changed. The names live in
:mod:`worker.metric_names` (torch-free, shared with the service).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from worker.metric_names import layer_metric

Point = tuple[str, int, float]


@dataclass(frozen=True)
class LayerDistance:
    """Distances of one layer's weight W(k) (rows = neurons) from W(0)."""

    absolute: float  # ‖W(k) − W(0)‖_F
    relative: float  # ‖W(k) − W(0)‖_F / ‖W(0)‖_F
    per_sqrt_width: float  # ‖W(k) − W(0)‖_F / √m
    max_neuron: float  # max_r ‖w_r(k) − w_r(0)‖₂

    def points(self, layer: str, step: int) -> list[Point]:
        return [
            (layer_metric("weight_dist", layer), step, self.absolute),
            (layer_metric("weight_dist_rel", layer), step, self.relative),
            (layer_metric("weight_dist_per_sqrt_m", layer), step, self.per_sqrt_width),
            (layer_metric("neuron_dist_max", layer), step, self.max_neuron),
        ]


def layer_distance(current: torch.Tensor, initial: torch.Tensor, width: int) -> LayerDistance:
    """Distances of a weight of shape (m, …) from its initial value; O(size)."""
    with torch.no_grad():
        delta = (current - initial).double().reshape(current.shape[0], -1)
        absolute = float(delta.norm())
        return LayerDistance(
            absolute=absolute,
            relative=absolute / float(initial.double().norm()),
            per_sqrt_width=absolute / math.sqrt(width),
            max_neuron=float(delta.norm(dim=1).max()),
        )


def activation_pattern(preact: torch.Tensor) -> torch.Tensor:
    """1{z > 0} per (example, [position,] neuron): the ReLU pattern (sign pattern otherwise)."""
    return preact.detach() > 0


def pattern_flip_fraction(preact: torch.Tensor, initial_pattern: torch.Tensor) -> float:
    """Fraction of (example, [position,] neuron) whose pattern differs from step 0; O(n·m)."""
    return float((activation_pattern(preact) != initial_pattern).double().mean())


def relative_change(gram: torch.Tensor, initial: torch.Tensor) -> float:
    """‖G(k) − G(0)‖_F / ‖G(0)‖_F."""
    return float((gram - initial).norm() / initial.norm())


def gradient_norm(grads: list[torch.Tensor]) -> float:
    """‖∇_θ L‖₂ over all trained weights."""
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
    return float(torch.linalg.vector_norm(norms))
