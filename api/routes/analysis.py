"""Analysis and plots: a run held against the theory, a sweep's scaling laws, PNG figures.

Analyses are JSON (shapes in ``docs/guide.md``; every number finite or null). A finished run's
stored analysis is returned as it is unless ``recompute`` or a ``loss_threshold`` asks for a
fresh one; running runs are always analysed from their metrics so far.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response

from api.deps import RunId, SessionDep, SweepId
from services import plots
from services import runs as run_service
from services.analysis import run_analysis
from services.sweep_analysis import sweep_analysis

router = APIRouter(tags=["analysis"])

Threshold = Annotated[
    float | None,
    Query(
        gt=0,
        allow_inf_nan=False,
        description="loss threshold for 'steps to threshold' (default: the run config's "
        "loss_threshold, else 1e-3 × the initial loss)",
    ),
]
Recompute = Annotated[
    bool, Query(description="recompute from the metrics even when a stored analysis exists")
]
SweepPlotKind = Literal["loss", "lambda_min", "lambda0_ratio", "scaling", "movement"]
RunPlotKind = Literal["loss", "lambda_min", "lambda0_ratio", "movement"]
PNG: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "a PNG image"}
}
NAME = r"^[A-Za-z0-9_.\-]{1,100}$"  # a (dotted) parameter or quantity name
NO_STORE = {"Cache-Control": "no-store"}  # a running sweep's figure changes between requests


@router.get("/runs/{run_id}/analysis", response_model=dict[str, Any])
def run_(
    run_id: RunId, db: SessionDep, loss_threshold: Threshold = None, recompute: Recompute = False
) -> dict[str, Any]:
    """Fitted convergence rate vs theory, steps to threshold, λ_min stability, movement, regime."""
    run = run_service.get_run(db_session=db, run_id=run_id)
    return run_analysis(
        db_session=db, run=run, loss_threshold=loss_threshold, recompute=recompute
    ) | {"run_id": run.id, "status": run.status}


@router.get("/sweeps/{sweep_id}/analysis", response_model=dict[str, Any])
def sweep(
    sweep_id: SweepId,
    db: SessionDep,
    loss_threshold: Threshold = None,
    recompute: Recompute = False,
) -> dict[str, Any]:
    """Runs grouped by the swept parameters over seeds, scaling-law fits, smallest widths."""
    return sweep_analysis(
        db_session=db, sweep_id=sweep_id, loss_threshold=loss_threshold, recompute=recompute
    )


@router.get("/sweeps/{sweep_id}/plots/{kind}", response_class=Response, responses=PNG)
def sweep_plot(
    sweep_id: SweepId,
    kind: SweepPlotKind,
    db: SessionDep,
    color_by: Annotated[
        str | None,
        Query(pattern=NAME, description="swept parameter to colour by (default: width if swept)"),
    ] = None,
    x: Annotated[
        str, Query(pattern=NAME, description="scaling: the swept parameter on the x axis")
    ] = "width",
    y: Annotated[
        list[Annotated[str, Query(pattern=NAME)]] | None,
        Query(
            max_length=64,
            description="scaling: the fitted quantities to draw (repeatable; default: six)",
        ),
    ] = None,
    loss_threshold: Threshold = None,
) -> Response:
    """A PNG: loss curves, λ_min(H(k)), λ_min(G⁽ᴴ⁾(k))/λ₀, scaling-law fits or per-layer
    movement."""
    png = plots.sweep_plot(
        db_session=db,
        sweep_id=sweep_id,
        kind=kind,
        color_by=color_by,
        x=x,
        y=y,
        loss_threshold=loss_threshold,
    )
    return Response(png, media_type="image/png", headers=NO_STORE)


@router.get("/runs/{run_id}/plots/{kind}", response_class=Response, responses=PNG)
def run_plot(run_id: RunId, kind: RunPlotKind, db: SessionDep) -> Response:
    """A PNG of one run: its loss curve with the theory's, λ_min(H(k)), λ_min(G⁽ᴴ⁾(k))/λ₀, or
    per-layer movement."""
    png = plots.run_plot(db_session=db, run_id=run_id, kind=kind)
    return Response(png, media_type="image/png", headers=NO_STORE)
