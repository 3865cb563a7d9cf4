"""``analyze_sweep`` on run records built by hand: grouping over seeds, fits per group,
smallest widths and the true-vs-random-labels table."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from services.sweep_analysis import RunRecord, analyze_sweep, describe, swept_parameters


def record(
    run_id: int, overrides: dict[str, Any], analysis: dict[str, Any], status: str = "succeeded"
) -> RunRecord:
    arch = overrides.get("arch", "two_layer")
    return RunRecord(run_id, status, {"arch": arch}, overrides, analysis)


def run_analysis(
    steps: int | None = None, flips: float | None = None, rate: float = -0.01, **theory: Any
) -> dict[str, Any]:
    return {
        "final_loss": 1e-3,
        "convergence": {"fitted_rate": rate},
        "threshold": {"steps_to_threshold": steps, "reached": steps is not None},
        "movement": {"layers": {"layer1": {"pattern_flips": flips}}},
        "theory": theory,
    }


def test_seeds_are_aggregated_and_two_layer_width_slopes_carry_the_theory() -> None:
    runs = [
        record(i, {"width": m, "seed": s}, run_analysis(100, 0.4 * m**-0.5 * (1 + 0.05 * s)))
        for i, (m, s) in enumerate([(m, s) for m in (64, 256, 1024) for s in (0, 1, 2)])
    ]
    result = analyze_sweep(runs)
    assert result["swept"] == ["width", "seed"] and result["group_by"] == ["width"]
    first = result["groups"][0]
    assert first["params"] == {"width": 64} and first["run_ids"] == [0, 1, 2]
    flips = [0.4 * 64**-0.5 * (1 + 0.05 * s) for s in range(3)]
    assert first["stats"]["pattern_flips/layer1"]["mean"] == pytest.approx(np.mean(flips))
    assert first["stats"]["pattern_flips/layer1"]["std"] == pytest.approx(np.std(flips, ddof=1))
    (fit,) = [f for f in result["fits"] if f["y"] == "pattern_flips/layer1"]
    assert fit["slope"] == pytest.approx(-0.5) and fit["n_points"] == 9
    assert fit["reference_slope"] == -0.5 and fit["consistent_with_reference"] is True
    (steps,) = [f for f in result["fits"] if f["y"] == "steps_to_threshold"]
    assert steps["slope"] == pytest.approx(0, abs=1e-12) and steps["reference_slope"] is None
    json.dumps(result, allow_nan=False)


def test_depth_fits_per_architecture_as_power_law_and_exponential() -> None:
    runs, i = [], 0
    for arch, law in (("fc", lambda h: 50 * 2.0**h), ("resnet", lambda h: 40 * h**1.5)):
        for depth in (2, 4, 8):
            for seed in (0, 1):
                runs.append(
                    record(
                        i,
                        {"arch": arch, "depth": depth, "seed": seed},
                        run_analysis(round(law(depth))),
                    )
                )
                i += 1
    fits = {
        (f["group"]["arch"], f["kind"]): f for f in analyze_sweep(runs)["fits"] if f["x"] == "depth"
    }
    assert fits[("fc", "exponential")]["slope"] == pytest.approx(math.log(2), rel=1e-3)
    assert fits[("fc", "exponential")]["r2"] == pytest.approx(1)
    assert fits[("resnet", "power")]["slope"] == pytest.approx(1.5, rel=1e-3)
    assert fits[("resnet", "power")]["n_points"] == 6
    assert all(f["reference_slope"] is None for f in fits.values())


def test_smallest_width_reaching_the_threshold() -> None:
    reached = {
        (32, 0): None,
        (32, 1): 500,
        (128, 0): 300,
        (128, 1): None,
        (512, 0): 90,
        (512, 1): 80,
    }
    runs = [
        record(i, {"width": m, "seed": s}, run_analysis(steps))
        for i, ((m, s), steps) in enumerate(reached.items())
    ]
    runs.append(record(99, {"width": 32, "seed": 2}, {}, status="failed"))
    (entry,) = analyze_sweep(runs)["smallest_width"]
    assert entry["widths"] == [
        {"width": 32, "reached": 1, "runs": 2},
        {"width": 128, "reached": 1, "runs": 2},
        {"width": 512, "reached": 2, "runs": 2},
    ]
    assert (entry["smallest_width_any"], entry["smallest_width_all"]) == (32, 512)


def test_true_and_random_labels_side_by_side() -> None:
    runs = [
        record(
            i,
            {"data.label_noise": noise, "seed": s},
            run_analysis(
                100 + 400 * noise, rate=-0.02 + 0.015 * noise, y_Hinv_y=30 + 200 * noise + s
            ),
        )
        for i, (noise, s) in enumerate([(n, s) for n in (0.0, 1.0) for s in (0, 1)])
    ]
    labels = analyze_sweep(runs)["labels"]
    assert labels["param"] == "data.label_noise"
    (comparison,) = labels["comparisons"]
    true, random = comparison["rows"]
    assert (true["value"], random["value"]) == (0.0, 1.0)
    assert true["y_Hinv_y"]["mean"] == pytest.approx(30.5)
    assert random["y_Hinv_y"]["mean"] == pytest.approx(230.5)
    assert random["fitted_rate"]["mean"] > true["fitted_rate"]["mean"]
    assert random["steps_to_threshold"]["mean"] == 500


def test_swept_parameters_ignore_constant_and_unhashable_values() -> None:
    runs = [
        record(1, {"width": 8, "spectrum_steps": [0, 10], "lr": 0.1}, {}),
        record(2, {"width": 8, "spectrum_steps": [0, 20], "lr": 0.1}, {}),
    ]
    assert swept_parameters(runs) == ["spectrum_steps"]
    result = analyze_sweep(runs)
    assert [g["params"] for g in result["groups"]] == [
        {"spectrum_steps": [0, 10]},
        {"spectrum_steps": [0, 20]},
    ]
    assert result["fits"] == [] and result["labels"] is None


def test_describe() -> None:
    assert describe([None])["n"] == 0
    one = describe([2.0, None])
    assert (one["mean"], one["std"], one["n"]) == (2.0, None, 1)


def test_a_bound_agrees_with_any_steeper_slope_a_prediction_does_not() -> None:
    runs = [
        record(
            i,
            {"width": m, "seed": s},
            {
                "movement": {
                    "ntk_rel_change": m**-0.75 * (1 + 0.01 * s),
                    "layers": {"layer1": {"weight_dist_rel": m**-0.75 * (1 + 0.01 * s)}},
                }
            },
        )
        for i, (m, s) in enumerate([(m, s) for m in (64, 256, 1024) for s in (0, 1)])
    ]
    fits = {f["y"]: f for f in analyze_sweep(runs)["fits"]}
    gram, moved = fits["ntk_rel_change"], fits["weight_dist_rel/layer1"]
    assert gram["slope"] == pytest.approx(-0.75) and moved["slope"] == pytest.approx(-0.75)
    assert (gram["reference_kind"], gram["consistent_with_reference"]) == ("bound", True)
    assert (moved["reference_kind"], moved["consistent_with_reference"]) == ("prediction", False)


def test_quantities_spanning_decades_get_a_geometric_mean_and_a_median() -> None:
    """Final losses 1e-2, 1e-16, 1e-30 over seeds: the arithmetic mean is 3.3e-3, the
    geometric mean (what the CLI and dashboard show) 1e-16."""
    stats = describe([1e-2, 1e-16, 1e-30])
    assert stats["mean"] == pytest.approx(1e-2 / 3)
    assert stats["geomean"] == pytest.approx(1e-16) and stats["median"] == 1e-16
    assert stats["spans_decades"] is True and stats["geostd"] == pytest.approx(1e14)
    close = describe([1.0, 2.0, 4.0])
    assert close["geomean"] == pytest.approx(2.0) and close["spans_decades"] is False
    assert describe([-1.0, 1.0])["geomean"] is None


def test_groups_average_only_final_runs_and_count_the_pending_ones() -> None:
    """A live sweep: a queued run has no analysis, a running one a partial one; neither may
    enter a group's statistics as if it were final."""
    finished = run_analysis(100) | {"final_loss": 1e-3, "flags": [{"name": "kernel_moved"}]}
    partial = run_analysis(None) | {"final_loss": 5.0}
    runs = [
        record(1, {"width": 64, "seed": 0}, finished),
        record(2, {"width": 64, "seed": 1}, partial, status="running"),
        record(3, {"width": 64, "seed": 2}, {}, status="queued"),
        record(4, {"width": 256, "seed": 0}, finished),
    ]
    groups = {g["params"]["width"]: g for g in analyze_sweep(runs)["groups"]}
    assert groups[64]["pending"] == 2 and groups[64]["stats"]["final_loss"]["n"] == 1
    assert groups[64]["stats"]["final_loss"]["mean"] == 1e-3
    assert groups[64]["flags"] == {"kernel_moved": 1} and groups[256]["pending"] == 0
