"""Data sets: the sphere, teacher labels, digits, uploads, label noise, parallel inputs."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from worker.config import DIGITS_CLASS_COUNTS, DataConfig, RunConfig
from worker.data import make_dataset
from worker.separation import separation


def test_sphere_inputs_have_unit_norm_and_the_seed_fixes_the_draw() -> None:
    cfg = RunConfig(data=DataConfig(n=30, d=7))
    data = make_dataset(cfg)
    torch.testing.assert_close(data.X.norm(dim=1), torch.ones(30, dtype=torch.float64))
    assert data.checksum == make_dataset(cfg).checksum
    assert data.checksum != make_dataset(cfg.model_copy(update={"seed": 1})).checksum
    assert data.label_kind == "real"


def test_sign_and_teacher_labels() -> None:
    sign = make_dataset(RunConfig(data=DataConfig(labels="sign")))
    assert set(sign.y.tolist()) == {-1.0, 1.0} and sign.label_kind == "binary"
    teacher = make_dataset(RunConfig(data=DataConfig(n=400, labels="teacher")))
    assert teacher.label_kind == "real"
    assert 0.3 < float(teacher.y.pow(2).mean()) < 3  # f* keeps unit scale on the sphere
    classes = make_dataset(
        RunConfig(loss="cross_entropy", data=DataConfig(n=400, labels="teacher"))
    )
    assert classes.label_kind == "classes"
    assert (classes.y == (teacher.y > 0).double()).all()


def test_digits_class_counts_match_scikit_learn() -> None:
    from sklearn.datasets import load_digits

    assert tuple(np.bincount(load_digits().target)) == DIGITS_CLASS_COUNTS


def test_digits_pairs_regress_on_signs_and_all_classes_classify() -> None:
    pair = make_dataset(RunConfig(data=DataConfig(kind="digits", n=100, classes=(3, 8))))
    assert pair.X.shape == (100, 64) and pair.label_kind == "binary"
    assert set(pair.y.tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(pair.X.norm(dim=1), torch.ones(100, dtype=torch.float64))
    every = make_dataset(RunConfig(loss="cross_entropy", data=DataConfig(kind="digits", n=1797)))
    assert every.label_kind == "classes"
    assert sorted(set(every.y.long().tolist())) == list(range(10))
    assert every.separation.parallel_pairs >= 0


def test_label_noise_replaces_the_requested_fraction() -> None:
    clean = make_dataset(RunConfig(data=DataConfig(n=1000, labels="sign")))
    noisy = make_dataset(RunConfig(data=DataConfig(n=1000, labels="sign", label_noise=0.4)))
    torch.testing.assert_close(clean.X, noisy.X)
    changed = float((clean.y != noisy.y).double().mean())
    assert 0.12 < changed < 0.28  # 40% redrawn, half of them keep their sign


def test_uploaded_arrays_are_checked_normalized_and_typed() -> None:
    cfg = RunConfig(data=DataConfig(kind="dataset", dataset_id=1, n=3, d=2))
    X = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    y = np.array([1.0, -1.0, 1.0])
    data = make_dataset(cfg, (X, y))
    torch.testing.assert_close(data.X[0], torch.tensor([0.6, 0.8], dtype=torch.float64))
    assert data.label_kind == "binary"
    expected = hashlib.sha256(X.astype("<f8").tobytes() + y.astype("<f8").tobytes()).hexdigest()
    assert data.checksum == expected  # the upload's checksum: before normalization
    assert make_dataset(cfg, (X, np.array([0.5, 2.0, 1.0]))).label_kind == "real"
    with pytest.raises(ValueError, match="do not match"):
        make_dataset(cfg, (X[:2], np.zeros(2)))
    with pytest.raises(ValueError, match="exactly when"):
        make_dataset(cfg)
    with pytest.raises(ValueError, match="exactly when"):
        make_dataset(RunConfig(), (X, np.zeros(3)))
    classes = cfg.model_copy(
        update={"loss": "cross_entropy", "data": cfg.data.model_copy(update={"num_classes": 3})}
    )
    assert make_dataset(classes, (X, np.array([0, 2, 1]))).label_kind == "classes"
    with pytest.raises(ValueError, match="class indices"):
        make_dataset(classes, (X, np.array([0, 3, 1])))
    columns = cfg.model_copy(update={"data": cfg.data.model_copy(update={"label_dim": 2})})
    assert make_dataset(columns, (X, np.ones((3, 2)))).y.shape == (3, 2)


def test_parallel_and_duplicate_inputs_are_reported() -> None:
    X = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    report = separation(X.numpy())
    assert report.duplicate_pairs == 1  # rows 0 and 1
    assert report.parallel_pairs == 3  # and row 2 against both
    assert report.max_abs_cosine == pytest.approx(1.0)
    clean = make_dataset(RunConfig(data=DataConfig(n=50, d=10))).separation
    assert clean.parallel_pairs == 0 and clean.max_abs_cosine < 1


def test_min_separation_is_the_brute_force_pairwise_minimum() -> None:
    """δ = min_{i≠j} ‖x̂_i − x̂_j‖ over unit rows, against every pair's difference; an
    antiparallel pair drives max|cos| to 1 but leaves δ alone (√(2 − 2 max|cos|) is only a
    lower bound). Row blocks of 64 exercise the blockwise path."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 5))
    X[250] = X[17] + 1e-2 * rng.normal(size=5)  # the closest pair: 1 − cos ~ 1e-5, not parallel
    X[120] = -2.0 * X[40]  # antiparallel: |cos| = 1, distance 2 after normalization
    report = separation(X, block=64)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    i, j = np.triu_indices(len(X), k=1)
    distances = np.sqrt(((unit[i] - unit[j]) ** 2).sum(axis=1))
    assert report.min_separation == pytest.approx(float(distances.min()), rel=1e-12)
    assert set(report.closest or ()) == {17, 250}
    assert report.max_abs_cosine == pytest.approx(1.0, abs=1e-15)
    assert report.parallel_pairs == 1 and report.duplicate_pairs == 0
    assert report.min_separation > math.sqrt(2 - 2 * report.max_abs_cosine)


def test_max_abs_cosine_is_clamped_to_one() -> None:
    """x and 5.46·x: their normalized product rounds to 1.0000000000000002; reported as 1."""
    x = np.array([-2.3250307746388343, -0.21879166393254573, -1.2459109472530652,
                  -0.7322673547034516, -0.5442589828573099])  # fmt: skip
    X = np.stack([x, 5.4604660804660075 * x])
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    assert float(unit[0] @ unit[1]) > 1.0  # the rounding the clamp is for
    report = separation(X)
    assert report.max_abs_cosine == 1.0 and report.duplicate_pairs == 1
    assert report.min_separation < 1e-15
