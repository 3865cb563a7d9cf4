"""``analyze_run`` on hand-made histories whose answers are known in closed form."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from services.analysis import LOSS_FLOOR, analyze_run, late_phase
from worker.metric_names import (
    DUPLICATE_PAIRS,
    GRAM_H_MIN,
    LAMBDA0,
    LAMBDA_MAX,
    LAMBDA_MIN,
    LAYER_METRICS,
    LOSS,
    NTK_CHANGE,
    PARALLEL_PAIRS,
    RUN_LR,
    Y_HINV_Y,
)

CONFIG: dict[str, Any] = {
    "arch": "two_layer",
    "activation": "relu",
    "width": 512,
    "data": {"n": 16},
    "lr": 0.5,
    "loss": "mse",
    "optimizer": "gd",
    "loss_threshold": 0.0,
}


def geometric(initial: float, factor: float, steps: int) -> list[tuple[int, float]]:
    return [(k, initial * factor**k) for k in range(steps + 1)]


def history(lam0: float = 0.1, steps: int = 200) -> dict[str, list[tuple[int, Any]]]:
    eta = CONFIG["lr"]
    return {
        LOSS: geometric(10.0, (1 - eta * lam0) ** 2, steps),
        LAMBDA_MIN: [(k, lam0 * (1 - 0.2 * k / steps)) for k in range(0, steps + 1, 10)],
        LAMBDA_MAX: [(k, 1.5) for k in range(0, steps + 1, 10)],
        LAMBDA0: [(0, 0.09)],
    }


def test_geometric_loss_gives_the_theory_rate_and_respects_du_bound() -> None:
    result = analyze_run(history(), CONFIG)
    conv = result["convergence"]
    expected = 2 * math.log(1 - 0.5 * 0.1)
    assert conv["fitted_rate"] == pytest.approx(expected, rel=1e-9)
    assert conv["theory_rate"] == pytest.approx(expected, rel=1e-12)
    assert conv["rate_ratio"] == pytest.approx(1.0)
    assert conv["fit"]["r2"] == pytest.approx(1.0) and conv["fit"]["n_points"] == 101
    assert conv["fit_steps"] == [100, 200]
    assert conv["du_factor"] == pytest.approx(1 - 0.5 * 0.09 / 2)
    assert conv["du_rate_bound"] == pytest.approx(math.log(1 - 0.5 * 0.09 / 2))
    assert conv["within_du_bound"] is True
    late = [0.1 * (1 - 0.2 * k / 200) for k in range(100, 201, 10)]
    assert conv["late_lambda_min"] == pytest.approx(sum(late) / len(late))
    assert result["initial_loss"] == 10.0 and result["steps_done"] == 200


def test_the_rate_fit_stops_where_the_loss_meets_the_float_floor() -> None:
    points = history(steps=300)  # 10·0.9025^k meets 10⁻¹² · L(0) near k = 269
    floor_step = next(k for k, v in points[LOSS] if v <= 10.0 * LOSS_FLOOR)
    points[LOSS] = [(k, v if k < floor_step else 1e-30 * (1 + k % 3)) for k, v in points[LOSS]]
    points[LOSS] += [(k, 2e-30) for k in range(301, 2000)]
    steps, _ = late_phase(points[LOSS])
    assert steps[-1] == floor_step - 1 and steps[0] == pytest.approx((floor_step - 1) / 2, abs=1)
    result = analyze_run(points, CONFIG)
    assert result["convergence"]["rate_ratio"] == pytest.approx(1.0)


def test_steps_to_threshold_from_the_config_the_request_or_relative() -> None:
    points = history()
    factor = (1 - 0.05) ** 2
    first_below = lambda t: math.ceil(math.log(t / 10.0) / math.log(factor))  # noqa: E731
    relative = analyze_run(points, CONFIG)["threshold"]
    assert relative["source"] == "relative" and relative["loss_threshold"] == pytest.approx(1e-2)
    assert relative["steps_to_threshold"] == first_below(1e-2) and relative["reached"]
    configured = analyze_run(points, CONFIG | {"loss_threshold": 0.5})["threshold"]
    assert configured["source"] == "config" and configured["steps_to_threshold"] == first_below(0.5)
    never = analyze_run(points, CONFIG, loss_threshold=1e-40)["threshold"]
    assert never == {
        "loss_threshold": 1e-40,
        "source": "request",
        "steps_to_threshold": None,
        "reached": False,
    }


def test_lambda_min_stability() -> None:
    spectrum = analyze_run(history(), CONFIG)["spectrum"]
    assert spectrum["lambda_min_initial"] == pytest.approx(0.1)
    assert spectrum["lambda_min_min_ratio"] == pytest.approx(0.8)
    assert spectrum["eta_lambda0"] == pytest.approx(0.045)
    assert spectrum["stays_above_half_lambda0"] is True
    points = history()
    points[LAMBDA_MIN].append((210, 0.04))  # below λ₀/2 = 0.045
    assert analyze_run(points, CONFIG)["spectrum"]["stays_above_half_lambda0"] is False


def test_deep_nets_hold_du_last_layer_gram_against_lambda0() -> None:
    points = history() | {GRAM_H_MIN: [(0, 0.06), (100, 0.04)]}  # the NTK stays ≥ 0.08
    deep = CONFIG | {"arch": "fc", "depth": 2, "activation": "softplus"}
    result = analyze_run(points, deep)
    assert result["spectrum"]["gram_H_lambda_min_min"] == 0.04
    assert result["spectrum"]["stays_above_half_lambda0"] is False
    checks = {c["name"]: c for c in result["regime"]["checks"]}
    assert checks["lambda_min_stays"]["ok"] is False and checks["lambda_min_stays"]["value"] == 0.04


def test_final_movement_per_layer_in_the_workers_order() -> None:
    points = history()
    for layer in ("layer10", "out", "layer2", "layer1"):
        for key, prefix in LAYER_METRICS.items():
            points[prefix + layer] = [(0, 0.0), (100, 1.0), (200, float(len(key)))]
    movement = analyze_run(points, CONFIG)["movement"]
    assert list(movement["layers"]) == ["layer1", "layer2", "layer10", "out"]
    assert movement["layers"]["out"]["pattern_flips"] == len("pattern_flips")


def test_regime_checks() -> None:
    ok = analyze_run(history(), CONFIG)["regime"]
    assert ok["in_regime"] is True
    names = {c["name"]: c for c in ok["checks"]}
    assert names["width_vs_n"]["value"] == 32 and names["step_size_stable"]["value"] == 0.75
    deep = CONFIG | {"arch": "fc", "depth": 3, "width": 8, "lr": 2.0}
    points = history() | {DUPLICATE_PAIRS: [(0, 1.0)]}
    checks = {c["name"]: c["ok"] for c in analyze_run(points, deep)["regime"]["checks"]}
    assert checks["activation"] is False and checks["width_vs_n"] is False
    assert checks["step_size_stable"] is False and checks["distinct_inputs"] is False
    smooth = analyze_run(history(), CONFIG | {"arch": "resnet", "activation": "softplus"})
    assert {c["name"]: c["ok"] for c in smooth["regime"]["checks"]}["activation"] is True


@pytest.mark.parametrize(
    ("activation", "ok"), [("relu", True), ("softplus", True), ("tanh", False)]
)
def test_antiparallel_inputs_break_only_odd_activations(activation: str, ok: bool) -> None:
    """One antiparallel pair (parallel_pairs counts it, duplicate_pairs does not): λ₀ > 0 for
    ReLU and softplus kernels (tests/worker/test_kernels.py), 0 for tanh."""
    points = history() | {DUPLICATE_PAIRS: [(0, 0.0)], PARALLEL_PAIRS: [(0, 1.0)]}
    checks = analyze_run(points, CONFIG | {"activation": activation})["regime"]["checks"]
    distinct = {c["name"]: c for c in checks}["distinct_inputs"]
    assert distinct["ok"] is ok and distinct["value"] == (0 if ok else 1)


def test_lr_auto_reads_the_reported_step_size() -> None:
    points = history() | {RUN_LR: [(0, 0.5)]}
    result = analyze_run(points, CONFIG | {"lr": "auto"})
    assert result["spectrum"]["eta"] == 0.5
    assert result["convergence"]["rate_ratio"] == pytest.approx(1.0)


def test_any_history_and_config_give_strict_json() -> None:
    for points, config in [
        ({}, {}),
        ({LOSS: [(0, None), (1, math.inf)]}, {"lr": "auto", "data": "not a mapping"}),
        ({LOSS: [(0, 1.0), (1, 0.0)], LAMBDA_MIN: [(0, 0.0)]}, {"arch": "fc"}),
        ({LOSS: [(0, -1.0), (1, math.nan)]}, CONFIG),
    ]:
        json.dumps(analyze_run(points, config), allow_nan=False)


def test_distance_ratio_measures_every_trained_layer() -> None:
    """√(yᵀΘ⁻¹y) predicts the distance of all parameters: layers 3 and 4 moved 5 in all."""
    points = history() | {
        Y_HINV_Y: [(0, 25.0)],
        LAYER_METRICS["weight_dist"] + "layer1": [(0, 0.0), (200, 3.0)],
        LAYER_METRICS["weight_dist"] + "out": [(0, 0.0), (200, 4.0)],
    }
    theory = analyze_run(points, CONFIG | {"arch": "fc", "depth": 1})["theory"]
    assert theory["distance_ratio"] == pytest.approx(1.0)
    assert theory["predicted_distance"] == 5.0 and theory["measured_distance"] == 5.0


def test_the_theory_rate_takes_the_top_mode_near_the_stability_limit() -> None:
    """η·λ_max(H(0)) = 1.975: |1 − ηλ_max| = 0.975 contracts more slowly than 1 − ηλ_min."""
    points = history()
    points[LAMBDA_MAX] = [(k, 3.95) for k in range(0, 201, 10)]
    conv = analyze_run(points, CONFIG)["convergence"]
    assert conv["theory_rate"] == pytest.approx(2 * math.log(0.975))
    assert conv["late_theory_rate"] == pytest.approx(2 * math.log(0.975))
    past = history()
    past[LAMBDA_MAX] = [(k, 4.4) for k in range(0, 201, 10)]  # η·λ_max = 2.2: it grows
    assert analyze_run(past, CONFIG)["convergence"]["theory_rate"] == pytest.approx(
        2 * math.log(1.2)
    )


def test_distinct_inputs_counts_a_duplicate_pair_once() -> None:
    """A duplicate pair is also a parallel pair; the worker counts it in both."""
    points = history() | {DUPLICATE_PAIRS: [(0, 1.0)], PARALLEL_PAIRS: [(0, 1.0)]}
    checks = {c["name"]: c for c in analyze_run(points, CONFIG)["regime"]["checks"]}
    assert checks["distinct_inputs"]["value"] == 1 and checks["distinct_inputs"]["ok"] is False
    antiparallel = history() | {DUPLICATE_PAIRS: [(0, 0.0)], PARALLEL_PAIRS: [(0, 2.0)]}
    checks = {c["name"]: c for c in analyze_run(antiparallel, CONFIG)["regime"]["checks"]}
    assert checks["distinct_inputs"]["value"] == 0  # antiparallel inputs keep ReLU's λ₀ > 0
    tanh = CONFIG | {"activation": "tanh"}
    checks = {c["name"]: c for c in analyze_run(antiparallel, tanh)["regime"]["checks"]}
    assert checks["distinct_inputs"]["value"] == 2


def test_step_size_stability_is_checked_over_the_whole_run() -> None:
    """A catapult: η·λ_max(H(k)) starts at 0.75, crosses 2 at step 80, peaks at 2.62."""
    points = history()
    spike = {80: 4.2, 90: 5.24, 100: 4.6}
    points[LAMBDA_MAX] = [(k, spike.get(k, 1.5)) for k in range(0, 201, 10)]
    result = analyze_run(points, CONFIG)
    checks = {c["name"]: c for c in result["regime"]["checks"]}
    assert checks["step_size_stable"]["ok"] is False
    assert checks["step_size_stable"]["value"] == pytest.approx(2.62)
    assert result["regime"]["in_regime"] is False
    spec = result["spectrum"]
    assert spec["eta_lambda_max_initial"] == pytest.approx(0.75)
    assert (spec["edge_of_stability_step"], spec["eta_lambda_max_max_step"]) == (80, 90)
    (flag,) = [f for f in result["flags"] if f["name"] == "edge_of_stability"]
    assert flag["step"] == 80 and flag["value"] == pytest.approx(2.62)
    assert "2.62" in flag["message"] and "step 80" in flag["message"]


def test_flags_a_moved_kernel_and_a_rate_the_theory_misses() -> None:
    assert analyze_run(history(), CONFIG)["flags"] == []
    points = history() | {NTK_CHANGE: [(k, k / 1000) for k in range(0, 201, 10)]}
    points[LOSS] = geometric(10.0, 0.5, 200)  # ln 0.5 per step against 2 ln 0.95: 6.8×
    result = analyze_run(points, CONFIG)
    flags = {f["name"]: f for f in result["flags"]}
    assert flags["kernel_moved"]["step"] == 110 and flags["kernel_moved"]["value"] == 0.2
    assert flags["rate_vs_theory"]["value"] == pytest.approx(math.log(0.5) / (2 * math.log(0.95)))
    assert result["movement"]["kernel_moved_step"] == 110
