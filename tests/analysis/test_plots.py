"""The figures behind the PNG plots, inspected as matplotlib objects: the scaling plot's
quantity selector, semilog axes where the exponential fit wins, ticks at the swept values, a
second swept parameter as marker or line style, theory curves clipped to the data, labelled
axes; and the ``lambda_min`` plot showing the same λ_min(H(k)) as the dashboard."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services import figures
from services.db import session_scope
from services.figures import Curve, Palette, Styles, curves_figure, scaling_figure
from services.models import Run
from services.plots import run_curves
from services.quantities import label
from services.sweep_analysis import RunRecord, analyze_sweep
from tests.analysis.synthetic import Store, create_sweep
from worker.metric_names import GRAM_H_MIN, LAMBDA0, LAMBDA_MIN, LAYER_METRICS

FLIPS = LAYER_METRICS["pattern_flips"] + "layer1"


def depth_sweep() -> dict[str, Any]:
    """fc: steps grow as 2^H (exponential); resnet: as H^1.5 (power law); two activations."""
    laws = {"fc": lambda h: 50 * 2.0**h, "resnet": lambda h: 40 * h**1.5}
    runs = []
    for arch, law in laws.items():
        for activation in ("relu", "softplus"):
            for depth in (1, 2, 3, 4, 6, 8, 12, 16):
                overrides = {"arch": arch, "activation": activation, "depth": depth}
                analysis = {"threshold": {"steps_to_threshold": law(depth), "reached": True}}
                runs.append(RunRecord(len(runs), "succeeded", {"arch": arch}, overrides, analysis))
    return analyze_sweep(runs)


def width_sweep(quantities: int) -> dict[str, Any]:
    """A width sweep whose runs report ``quantities`` per-layer measures."""
    runs = []
    for i, width in enumerate((64, 256, 1024)):
        layers = {f"layer{j}": {"pattern_flips": width**-0.5 * (1 + j)} for j in range(quantities)}
        analysis = {"movement": {"layers": layers}}
        runs.append(RunRecord(i, "succeeded", {"arch": "fc"}, {"width": width}, analysis))
    return analyze_sweep(runs)


def test_the_scaling_plot_draws_the_chosen_quantities() -> None:
    analysis = width_sweep(9)
    default = scaling_figure(analysis, "width", "t")
    assert len(default.axes) == figures.MAX_SCALING_PANELS
    assert "6 of 9 quantities" in default.get_suptitle()
    wanted = ["pattern_flips/layer8", "pattern_flips/layer7"]
    chosen = scaling_figure(analysis, "width", "t", wanted)
    assert [ax.get_title() for ax in chosen.axes] == [f"y = {y}" for y in wanted]
    with pytest.raises(figures.NothingToPlot, match="pattern_flips/layer0"):
        scaling_figure(analysis, "width", "t", ["no_such_quantity"])


def test_panels_are_labelled_and_ticked_at_the_swept_values() -> None:
    (ax,) = scaling_figure(width_sweep(1), "width", "t").axes
    assert ax.get_ylabel() == label("pattern_flips/layer0") != "pattern_flips/layer0"
    assert ax.get_xlabel() == "width m"
    assert list(ax.get_xticks()) == [64, 256, 1024]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["64", "256", "1024"]
    assert not ax.xaxis.get_minor_locator()(), "no minor ticks to collide with"


def test_depth_panels_use_semilog_axes_when_the_exponential_fits_better() -> None:
    figure = scaling_figure(depth_sweep(), "depth", "t")
    (ax,) = figure.axes
    assert (ax.get_xscale(), ax.get_yscale()) == ("linear", "log")
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    fc = [t for t in texts if t.startswith("arch=fc")]
    assert fc and all("e^(b·depth)" in t and f"b = {math.log(2):.3f}" in t for t in fc)
    resnet = [t for t in texts if t.startswith("arch=resnet")]
    assert resnet and all("depth^b" in t and "b = 1.500" in t for t in resnet)
    ticks = list(ax.get_xticks())
    assert all(t.is_integer() for t in ticks) and len(ticks) <= figures.MAX_TICKS + 2
    markers = {c.get_paths()[0].vertices.tobytes() for c in ax.collections}
    assert len(markers) == 2, "the second swept parameter (activation) is the marker"
    colors = {tuple(c.get_facecolor()[0]) for c in ax.collections}
    assert len(colors) == 2, "the first (arch) is the colour"
    assert {line.get_linestyle() for line in ax.get_lines()} == {"-", "-."}


def test_theory_curves_are_clipped_to_the_data_and_styles_mark_a_second_parameter() -> None:
    steps = list(range(100))
    curves = [
        Curve(
            run_id=i,
            value=width,
            steps=steps,
            values=[10.0 * 0.9**k for k in steps],
            predicted=(steps, [10.0 * 0.4**k for k in steps]),  # down to 1e-39
            style=activation,
        )
        for i, (width, activation) in enumerate([(64, "relu"), (64, "softplus")])
    ]
    palette = Palette("width", [64])
    styles = Styles("activation", ["relu", "softplus"])
    (ax,) = curves_figure(curves, palette, styles, "t", label("loss")).axes
    low, high = ax.get_ylim()
    data_low = 10.0 * 0.9**99
    assert low == pytest.approx(data_low / figures.CLIP_MARGIN) and high == pytest.approx(30.0)
    measured = [line for line in ax.get_lines() if line.get_linestyle() != "--"]
    assert {line.get_linestyle() for line in measured} == {"-", "-."}
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "activation = softplus" in legend and label("theory/predicted_loss") in legend


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    yield s
    s.close()


def test_the_lambda_min_plot_is_the_ntk_lambda_min_the_dashboard_charts(
    client: TestClient, store: Store
) -> None:
    """Both say λ_min: both must be λ_min(H(k)), not λ_min(G⁽ᴴ⁾(k))/λ₀ in one of them."""
    _, runs = create_sweep(client)
    run_id = runs[0]["id"]
    store.write(
        run_id,
        [(LAMBDA0, 0, 0.5)]
        + [(LAMBDA_MIN, k, 0.1 - k / 1000) for k in (0, 10, 20)]
        + [(GRAM_H_MIN, k, 0.2) for k in (0, 10, 20)],
    )
    with session_scope(store.sessions) as db:
        run = db.get(Run, run_id)
        assert run is not None
        (curve,) = run_curves(db, run, "lambda_min", None, None)
        (ratio,) = run_curves(db, run, "lambda0_ratio", None, None)
    assert list(curve.values) == pytest.approx([0.1, 0.09, 0.08])
    assert list(ratio.values) == pytest.approx([0.4, 0.4, 0.4])
    page = client.get("/dashboard").text
    assert f'data-lambda-metric="{LAMBDA_MIN}"' in page
