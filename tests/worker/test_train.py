"""The training loop alone (no Ray): events, loss decrease, stops, metrics, theory, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker.config import DataConfig, RunConfig
from worker.data import make_dataset
from worker.events import MetricBatch, RunFinished, RunStarted
from worker.metric_names import (
    ACCURACY,
    FULL_NTK_MIN,
    GRAD_NORM,
    GRAM_H_MIN,
    LAMBDA_MAX,
    LAMBDA_MIN,
    LOSS,
    NTK_CHANGE,
    RESIDUAL_NORM,
    STEP_TIME,
    gram_layer_names,
    spectrum_name,
)
from worker.train import train

SMALL = RunConfig(
    width=128, data=DataConfig(n=16, d=8), steps=300, lr=0.2, gram_every=25, emit_every=40
)

Points = list[tuple[str, int, float]]


def points(cfg: RunConfig) -> tuple[Points, list[object]]:
    events = list(train(cfg))
    pts = [p for e in events if isinstance(e, MetricBatch) for p in e.points]
    return pts, events


def series(pts: Points, name: str) -> dict[int, float]:
    return {step: value for n, step, value in pts if n == name}


def test_events_come_in_order_and_cover_every_step() -> None:
    pts, events = points(SMALL)
    assert isinstance(events[0], RunStarted) and events[0].resumed_from_step == 0
    assert isinstance(events[-1], RunFinished)
    assert events[-1].status == "succeeded" and events[-1].steps_done == SMALL.steps
    assert all(isinstance(e, MetricBatch) for e in events[1:-1])
    assert sorted(series(pts, LOSS)) == list(range(SMALL.steps + 1))
    assert sorted(series(pts, RESIDUAL_NORM)) == list(range(SMALL.steps + 1))
    assert sorted(series(pts, GRAD_NORM)) == list(range(SMALL.steps))
    assert sorted(series(pts, STEP_TIME)) == list(range(SMALL.steps))
    assert sorted(series(pts, LAMBDA_MIN)) == list(range(0, SMALL.steps + 1, SMALL.gram_every))
    assert sorted(series(pts, LAMBDA_MAX)) == sorted(series(pts, LAMBDA_MIN))
    assert sorted(series(pts, "weight_dist/layer1")) == list(range(0, SMALL.steps + 1, 10))
    assert len(pts) == len({(n, s) for n, s, _ in pts}), "no point is emitted twice"


def test_gd_loss_decreases_linearly_on_wide_two_layer_net() -> None:
    pts, _ = points(SMALL)
    loss = series(pts, LOSS)
    assert loss[SMALL.steps] < 1e-3 * loss[0]
    assert all(loss[k + 1] <= loss[k] * (1 + 1e-9) for k in range(SMALL.steps))
    residual = series(pts, RESIDUAL_NORM)
    assert residual[7] == pytest.approx(math.sqrt(2 * loss[7]), rel=1e-12)


@pytest.mark.parametrize("arch", ["fc", "resnet", "conv_resnet"])
def test_deep_architectures_train_with_an_automatic_step_size(arch: str) -> None:
    cfg = SMALL.model_copy(update={"arch": arch, "depth": 3, "width": 32, "lr": "auto"})
    pts, events = points(cfg)
    loss = series(pts, LOSS)
    assert events[-1].status == "succeeded"
    assert loss[cfg.steps] < 0.05 * loss[0]
    assert all(loss[k + 1] <= loss[k] * (1 + 1e-6) for k in range(cfg.steps))
    lr = series(pts, "run/lr")[0]
    assert lr == pytest.approx(cfg.lr_fraction * 2 / series(pts, LAMBDA_MAX)[0], rel=1e-9)


def test_step_zero_constants_and_per_layer_names() -> None:
    cfg = SMALL.model_copy(
        update={
            "arch": "fc",
            "depth": 2,
            "width": 64,
            "lr": 0.02,
            "gram_per_layer": True,
            "steps": 20,
        }
    )
    pts, _ = points(cfg)
    constants = {n: v for n, s, v in pts if n.startswith(("run/", "data/", "theory/")) and s == 0}
    assert constants["run/parameter_count"] == cfg.parameter_count()
    assert constants["run/lr"] == 0.02 and constants["run/c_sigma"] == 2.0
    assert constants["data/parallel_pairs"] == 0
    assert constants["theory/eta_lambda0"] == pytest.approx(0.02 * constants["theory/lambda0"])
    assert constants["theory/ntk_inf_lambda_min"] > 0 and constants["theory/y_Hinv_y"] > 0
    for layer in ("layer1", "layer2", "out"):
        lo, hi = gram_layer_names(layer)
        assert 0 < series(pts, lo)[0] <= series(pts, hi)[0]
        assert f"weight_dist_rel/{layer}" in {n for n, _, _ in pts}
    assert series(pts, GRAM_H_MIN)[0] == series(pts, gram_layer_names("layer2")[0])[0]
    assert series(pts, NTK_CHANGE)[0] == 0.0
    assert "pattern_flips/out" not in {n for n, _, _ in pts}


def test_lambda_min_positive_and_below_lambda_max() -> None:
    pts, _ = points(SMALL)
    lo, hi = series(pts, LAMBDA_MIN), series(pts, LAMBDA_MAX)
    assert all(0 < lo[k] <= hi[k] for k in lo)


def test_spectra_at_chosen_steps() -> None:
    cfg = SMALL.model_copy(update={"steps": 30, "spectrum_steps": (0, 13)})
    pts, _ = points(cfg)
    n = cfg.data.n
    for step in (0, 13):
        values = [series(pts, spectrum_name("ntk", i))[step] for i in range(n)]
        assert values == sorted(values)
    assert series(pts, spectrum_name("ntk", 0))[0] == pytest.approx(series(pts, LAMBDA_MIN)[0])
    assert len(series(pts, spectrum_name("ntk_inf", n - 1))) == 1


def test_linearized_theory_predicts_wide_two_layer_runs_better_as_width_grows() -> None:
    """Arora et al.: the kernel's eigen-decomposition predicts the loss curve as m → ∞.

    Error measure: |log(predicted/measured)| over the decades the loss fell, at step 100.
    """
    errors: dict[tuple[int, str], float] = {}
    for width in (1024, 16384):
        cfg = SMALL.model_copy(update={"width": width, "steps": 100, "theory_every": 20})
        pts, _ = points(cfg)
        loss = series(pts, LOSS)
        for name in ("theory/predicted_loss_h0", "theory/predicted_loss"):
            predicted = series(pts, name)
            assert sorted(predicted) == list(range(0, 101, 20))
            fallen = abs(math.log(loss[100] / loss[0]))
            errors[width, name] = abs(math.log(predicted[100] / loss[100])) / fallen
        assert series(pts, "theory/predicted_loss_h0")[0] == pytest.approx(loss[0], rel=1e-10)
    for name in ("theory/predicted_loss_h0", "theory/predicted_loss"):
        assert errors[16384, name] < errors[1024, name]
        assert errors[16384, name] < 0.05, errors


def test_wider_networks_move_less() -> None:
    """Du et al.: per-neuron movement and pattern flips shrink as m grows."""
    finals = {}
    for width in (64, 4096):
        pts, _ = points(SMALL.model_copy(update={"width": width, "steps": 100}))
        finals[width] = (
            series(pts, "neuron_dist_max/layer1")[100],
            series(pts, "pattern_flips/layer1")[100],
            series(pts, NTK_CHANGE)[100],
        )
    assert all(wide < narrow for narrow, wide in zip(finals[64], finals[4096], strict=True))


def test_cross_entropy_fits_digits_with_accuracy_reported() -> None:
    cfg = RunConfig(
        arch="fc",
        depth=1,
        width=256,
        loss="cross_entropy",
        lr="auto",
        lr_fraction=0.9,
        data=DataConfig(kind="digits", n=40, classes=(0, 1, 2, 3)),
        steps=150,
        gram_every=50,
    )
    pts, events = points(cfg)
    assert events[-1].status == "succeeded"
    acc = series(pts, ACCURACY)
    assert acc[cfg.steps] == 1.0
    assert series(pts, LOSS)[cfg.steps] < 0.3 * series(pts, LOSS)[0]


def test_sgd_fits_random_labels() -> None:
    """Allen-Zhu et al.: mini-batch SGD on a wide net reaches 100% training accuracy."""
    cfg = SMALL.model_copy(
        update={
            "optimizer": "sgd",
            "batch_size": 4,
            "lr": 0.1,
            "steps": 400,
            "data": DataConfig(n=16, d=8, labels="sign", label_noise=1.0),
        }
    )
    pts, _ = points(cfg)
    assert series(pts, ACCURACY)[cfg.steps] == 1.0
    assert series(pts, LOSS)[cfg.steps] < 0.1 * series(pts, LOSS)[0]


def test_an_uploaded_dataset_with_two_label_columns_trains() -> None:
    gen = np.random.default_rng(0)
    X, y = gen.normal(size=(20, 5)), gen.normal(size=(20, 2))
    cfg = RunConfig(
        arch="fc",
        depth=2,
        width=64,
        lr="auto",
        steps=100,
        data=DataConfig(kind="dataset", dataset_id=7, n=20, d=5, label_dim=2),
    )
    events = list(train(cfg, arrays=(X, y)))
    pts = [p for e in events if isinstance(e, MetricBatch) for p in e.points]
    loss = series(pts, LOSS)
    assert loss[100] < 0.1 * loss[0]
    names = {n for n, _, _ in pts}
    assert "theory/lambda0" in names and "theory/y_Hinv_y" not in names  # scalar targets only


def test_too_large_step_size_diverges_with_the_nonfinite_point_recorded() -> None:
    cfg = SMALL.model_copy(update={"lr": 50.0, "divergence_bound": 1e6})
    pts, events = points(cfg)
    final = events[-1]
    assert isinstance(final, RunFinished) and final.status == "diverged"
    last = series(pts, LOSS)[final.steps_done]
    assert not math.isfinite(last) or last > 1e6


def test_loss_threshold_stops_early() -> None:
    cfg = SMALL.model_copy(update={"loss_threshold": 1e-2})
    pts, events = points(cfg)
    assert events[-1].status == "succeeded"
    assert events[-1].steps_done < SMALL.steps
    assert series(pts, LOSS)[events[-1].steps_done] < 1e-2


def test_wall_time_budget_stops_the_run() -> None:
    cfg = SMALL.model_copy(update={"steps": 10**6, "max_wall_time_s": 0.3})
    _, events = points(cfg)
    final = events[-1]
    assert isinstance(final, RunFinished) and final.status == "succeeded"
    assert "wall-time" in final.reason and final.steps_done < cfg.steps


def _without_timings(pts: Points) -> Points:
    return [p for p in pts if p[0] != STEP_TIME]


@pytest.mark.parametrize(
    "update",
    [{}, {"optimizer": "sgd", "arch": "fc", "depth": 2, "width": 32, "eig_dense_max_n": 8}],
    ids=["gd", "sgd-lanczos"],
)
def test_same_config_same_metrics(update: dict[str, object]) -> None:
    cfg = SMALL.model_copy(update=update | {"steps": 60})
    assert _without_timings(points(cfg)[0]) == _without_timings(points(cfg)[0])


def test_seed_changes_data_and_init() -> None:
    other = SMALL.model_copy(update={"seed": 1})
    assert series(points(SMALL)[0], LOSS)[0] != series(points(other)[0], LOSS)[0]


def test_cancel_callback_stops_the_run() -> None:
    events = list(train(SMALL, should_stop=lambda: True))
    assert events[-1].status == "cancelled"


@pytest.mark.parametrize("activation", ["softplus", "tanh", "gelu"])
def test_smooth_activations_train(activation: str) -> None:
    cfg = SMALL.model_copy(update={"activation": activation, "arch": "fc", "lr": 0.02})
    pts, events = points(cfg)
    assert events[-1].status == "succeeded"
    assert series(pts, LOSS)[cfg.steps] < series(pts, LOSS)[0]


@pytest.mark.parametrize("arch", ["two_layer", "fc"])
def test_duplicate_inputs_give_an_infinite_y_hinv_y(arch: str) -> None:
    """A repeated input makes H^∞ singular; rounding leaves its least eigenvalue at ~±1e-17,
    which once gave yᵀ(H^∞)⁻¹y ≈ 1e15 instead of the documented inf (different labels on the
    two copies: no finite-norm interpolant exists)."""
    gen = np.random.default_rng(9)  # rounding leaves λ_min(H^∞) at +1.5e-16 (fc: +5.6e-16)
    X, y = gen.normal(size=(12, 4)), gen.normal(size=12)
    X[7] = X[3]
    cfg = RunConfig(
        arch=arch,
        depth=1 if arch == "two_layer" else 2,
        width=32,
        steps=2,
        data=DataConfig(kind="dataset", dataset_id=1, n=12, d=4),
    )
    events = list(train(cfg, arrays=(X, y)))
    constants = {
        n: v for e in events if isinstance(e, MetricBatch) for n, s, v in e.points if s == 0
    }
    assert constants["data/duplicate_pairs"] == 1 and constants["data/min_separation"] == 0.0
    assert abs(constants["theory/lambda0"]) < 1e-12
    assert constants["theory/y_Hinv_y"] == math.inf
    assert constants["theory/generalization_bound"] == math.inf


def test_step_zero_reports_the_separation_and_the_kernel_error() -> None:
    cfg = SMALL.model_copy(update={"activation": "tanh", "steps": 2})
    pts, _ = points(cfg)
    constants = {n: v for n, s, v in pts if s == 0}
    X = np.asarray(make_dataset(cfg).X)
    i, j = np.triu_indices(len(X), k=1)
    delta = float(np.linalg.norm(X[i] - X[j], axis=1).min())
    assert constants["data/min_separation"] == pytest.approx(delta, rel=1e-12)
    n, m = cfg.data.n, cfg.width  # Allen-Zhu et al.: δ* = (n²⁴ L¹² / m)^{1/8}, L = 1 here
    assert constants["data/min_separation_ratio"] == pytest.approx(delta / (n**3 / m ** (1 / 8)))
    assert 0 < constants["theory/kernel_error_estimate"] < 1e-9


def test_allen_zhu_run_trains_and_reports_only_its_hidden_layers() -> None:
    """train_layers: hidden: W⁽¹⁾ (their A) and a (their B) never move and have no metrics."""
    cfg = SMALL.model_copy(
        update={
            "arch": "fc",
            "depth": 3,
            "width": 64,
            "lr": "auto",
            "train_layers": "hidden",
            "parametrization": "standard",
            "gram_per_layer": True,
            "steps": 100,
        }
    )
    pts, events = points(cfg)
    assert events[-1].status == "succeeded"
    names = {n for n, _, _ in pts}
    assert {"weight_dist/layer2", "weight_dist/layer3", "pattern_flips/layer2"} <= names
    assert not {"weight_dist/layer1", "weight_dist/out", "gram/layer1/lambda_min"} & names
    constants = {n: v for n, s, v in pts if s == 0}
    assert constants["run/parameter_count"] == 2 * 64 * 64
    assert constants["theory/lambda0"] > 0
    loss = series(pts, LOSS)
    assert loss[100] < 0.1 * loss[0]


def test_training_only_the_last_layer_is_linear_regression_on_fixed_features() -> None:
    """train_layers: last: u = x⁽ᴴ⁾a is linear in a, so the NTK never changes and GD follows the
    linearized prediction exactly; there is no trained W⁽ᴴ⁾, hence no G⁽ᴴ⁾ metrics nor λ₀."""
    cfg = SMALL.model_copy(
        update={"arch": "fc", "depth": 2, "width": 64, "lr": "auto", "train_layers": "last"}
    )
    pts, _ = points(cfg)
    assert set(series(pts, NTK_CHANGE).values()) == {0.0}
    loss, predicted = series(pts, LOSS), series(pts, "theory/predicted_loss_h0")
    assert all(predicted[k] == pytest.approx(loss[k], rel=1e-9) for k in predicted)
    names = {n for n, _, _ in pts}
    assert GRAM_H_MIN not in names and "theory/lambda0" not in names
    assert "theory/ntk_inf_lambda_min" in names


def test_multi_output_runs_report_the_full_ntk_when_asked() -> None:
    cfg = RunConfig(
        arch="fc",
        depth=1,
        width=64,
        loss="cross_entropy",
        lr="auto",
        gram_full_outputs=True,
        data=DataConfig(kind="digits", n=20, classes=(0, 1, 2, 3)),
        steps=20,
        gram_every=10,
    )
    pts, _ = points(cfg)
    full, average = series(pts, FULL_NTK_MIN), series(pts, LAMBDA_MIN)
    assert sorted(full) == [0, 10, 20]
    assert all(0 < full[k] < average[k] for k in full)  # the cross blocks lower it
    plain = {n for n, _, _ in points(cfg.model_copy(update={"gram_full_outputs": False}))[0]}
    assert FULL_NTK_MIN not in plain
