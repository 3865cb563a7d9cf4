"""Training data: the unit sphere (Du et al. ICLR 2019, Assumption 3.1), digits, or a dataset.

- ``sphere``: x uniform on S^{d-1}; labels N(0, 1), uniform ±1, or a two-layer ReLU teacher's
  output f*(x) = √(2/k) Σ_j a_j relu(w_jᵀx) (its sign for classification).
- ``digits``: scikit-learn's 8×8 handwritten digits (ships with the wheel, no download); a pair
  of classes gives ±1 regression targets, several classes give class indices.
- ``dataset``: an upload's X (n, d) and y (n,) or (n, k), handed over by the dispatcher
  (``train(..., arrays=(X, y))``).

Inputs are scaled to unit norm unless ``normalize`` is off; a fraction ``label_noise`` of the
labels is replaced by random ones (Zhang et al. 2017). Every data set carries the
:class:`~worker.separation.Separation` of its inputs: parallel pairs (duplicates make λ₀ = 0;
antiparallel ones only for odd activations) and Allen-Zhu et al.'s minimum separation δ. Draws
depend only on the data seed. The
checksum identifies the source data, before normalization and label noise (which the config
determines): for an upload it is the upload's own checksum.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from worker.config import DataConfig, RunConfig
from worker.separation import Separation, separation

LabelKind = Literal["real", "binary", "classes"]


@dataclass(frozen=True)
class Dataset:
    """X: (n, d) float64 inputs; y: float64 targets, (n,) (±1, reals, or class indices
    0..C-1) or (n, k) (an upload's k label columns); ``checksum`` of the source data."""

    X: torch.Tensor
    y: torch.Tensor
    label_kind: LabelKind
    separation: Separation
    checksum: str


def checksum(X: torch.Tensor, y: torch.Tensor) -> str:
    """sha256 over the little-endian float64 bytes of X followed by y."""
    digest = hashlib.sha256()
    for array in (X, y):
        digest.update(np.ascontiguousarray(array.detach().cpu().numpy(), dtype="<f8").tobytes())
    return digest.hexdigest()


def make_dataset(cfg: RunConfig, arrays: tuple[Any, Any] | None = None) -> Dataset:
    """The data set of ``cfg`` drawn with its data seed (a generator of its own: init-independent).

    ``arrays`` = (X, y) is required for ``data.kind == "dataset"`` and refused otherwise.
    """
    data = cfg.data
    gen = torch.Generator().manual_seed(cfg.data_seed)
    classify = cfg.loss == "cross_entropy"
    if (data.kind == "dataset") != (arrays is not None):
        raise ValueError("arrays are given exactly when data.kind is 'dataset'")
    if data.kind == "sphere":
        X, y, kind = _sphere(data, gen, classify)
    elif data.kind == "digits":
        X, y, kind = _digits(data, gen, classify)
    else:
        assert arrays is not None
        X, y, kind = _arrays(data, arrays, cfg.num_outputs if classify else None)
    source = checksum(X, y)
    if data.normalize:
        norms = X.norm(dim=1, keepdim=True)
        if bool((norms == 0).any()):
            raise ValueError("an input is the zero vector: it cannot be normalized")
        X = X / norms
    y = _add_label_noise(y, kind, data.label_noise, cfg.num_outputs, gen)
    geometry = separation(X.numpy())
    return Dataset(X=X, y=y, label_kind=kind, separation=geometry, checksum=source)


def _sphere(
    data: DataConfig, gen: torch.Generator, classify: bool
) -> tuple[torch.Tensor, torch.Tensor, LabelKind]:
    X = torch.randn(data.n, data.d, generator=gen, dtype=torch.float64)
    X = X / X.norm(dim=1, keepdim=True)
    if data.labels == "gaussian":
        return X, torch.randn(data.n, generator=gen, dtype=torch.float64), "real"
    if data.labels == "sign":
        y = torch.randint(0, 2, (data.n,), generator=gen).to(torch.float64) * 2 - 1
    else:
        k = data.teacher_width
        W = torch.randn(k, data.d, generator=gen, dtype=torch.float64)
        a = torch.randn(k, generator=gen, dtype=torch.float64)
        y = (2.0 / k) ** 0.5 * torch.relu(X @ W.T) @ a
        if not classify:
            return X, y, "real"
        y = torch.where(y > 0, 1.0, -1.0).to(torch.float64)
    return (X, (y > 0).to(torch.float64), "classes") if classify else (X, y, "binary")


def _digits(
    data: DataConfig, gen: torch.Generator, classify: bool
) -> tuple[torch.Tensor, torch.Tensor, LabelKind]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    classes = data.digit_classes
    pool = np.flatnonzero(np.isin(digits.target, classes))
    chosen = pool[torch.randperm(len(pool), generator=gen)[: data.n].numpy()]
    X = torch.from_numpy(digits.data[chosen].astype(np.float64))
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[int(t)] for t in digits.target[chosen]], dtype=torch.float64)
    if classify:
        return X, labels, "classes"
    return X, labels * 2 - 1, "binary"


def _arrays(
    data: DataConfig, arrays: tuple[Any, Any], num_classes: int | None
) -> tuple[torch.Tensor, torch.Tensor, LabelKind]:
    X = torch.as_tensor(np.array(arrays[0], dtype=np.float64))
    y = torch.as_tensor(np.array(arrays[1], dtype=np.float64))
    y_shape = (data.n,) if data.label_dim == 1 else (data.n, data.label_dim)
    if y.shape == (data.n, 1) and data.label_dim == 1:
        y = y[:, 0]
    if X.shape != (data.n, data.d) or y.shape != y_shape:
        raise ValueError(
            f"arrays of shapes {tuple(X.shape)}, {tuple(y.shape)} do not match the config's "
            f"({data.n}, {data.d}) and {y_shape}"
        )
    if not (bool(torch.isfinite(X).all()) and bool(torch.isfinite(y).all())):
        raise ValueError("arrays contain NaN or inf")
    if num_classes is not None:
        if not bool(((y == y.round()) & (y >= 0) & (y < num_classes)).all()):
            raise ValueError(f"y must hold class indices 0..{num_classes - 1}")
        return X, y, "classes"
    return X, y, "binary" if y.dim() == 1 and bool((y.abs() == 1).all()) else "real"


def _add_label_noise(
    y: torch.Tensor, kind: LabelKind, fraction: float, num_classes: int, gen: torch.Generator
) -> torch.Tensor:
    """Replace round(fraction·n) labels, chosen at random, by random labels.

    Classes: uniform over the C classes; ±1: uniform signs; reals: draws (with replacement) from
    the data set's own labels (rows of y), which keeps the marginal and breaks the link to x.
    """
    count = round(fraction * len(y))
    if count == 0:
        return y
    idx = torch.randperm(len(y), generator=gen)[:count]
    if kind == "classes":
        fresh = torch.randint(0, num_classes, (count,), generator=gen).to(torch.float64)
    elif kind == "binary":
        fresh = torch.randint(0, 2, (count,), generator=gen).to(torch.float64) * 2 - 1
    else:
        fresh = y[torch.randint(0, len(y), (count,), generator=gen)]
    noisy = y.clone()
    noisy[idx] = fresh
    return noisy
