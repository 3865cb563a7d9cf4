"""Gradient descent on the papers' losses, emitting metric events (catalogue: docs/metrics.md).

``train`` is a generator of :mod:`worker.events`: it knows nothing of Ray or the database, so it
is tested alone, and :mod:`worker.task` only forwards what it yields. Full-batch GD is the
theory's case (Du et al. 2019); ``sgd`` steps on mini-batches of b examples drawn without
replacement with the loss scaled by n/b, an unbiased estimate of the full gradient (Allen-Zhu,
Li & Song 2019). Step k (before the k-th update) records the loss group; Grams, weight
distances and predicted curves come at their own cadences and reuse step k's forward pass.
The run stops after ``steps`` updates, below ``loss_threshold``, on divergence, when the
wall-time budget is spent, or when ``should_stop`` says so.

With a ``checkpoint_dir`` it saves a checkpoint every ``checkpoint_every`` steps (after sending
every point before that step; the one before is kept too) and, when one exists there, resumes
from it, re-sending nothing before its step: the metrics are bitwise those of an uninterrupted
run on CPU (timings aside).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.baseline import Baseline, last_hidden_gram, measure_baseline
from worker.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from worker.config import RunConfig
from worker.data import Dataset, make_dataset
from worker.events import Event, FinalStatus, MetricBatch, RunFinished, RunStarted
from worker.gram import grams as compute_grams
from worker.losses import accuracy, objective, residual_norm
from worker.metric_names import (
    ACCURACY,
    FULL_NTK_MAX,
    FULL_NTK_MIN,
    GRAD_NORM,
    GRAM_H_CHANGE,
    GRAM_H_MAX,
    GRAM_H_MIN,
    LAMBDA_MAX,
    LAMBDA_MIN,
    LOSS,
    NTK_CHANGE,
    RESIDUAL_NORM,
    STEP_TIME,
    gram_layer_names,
    layer_metric,
    spectrum_name,
)
from worker.metrics import (
    Point,
    gradient_norm,
    layer_distance,
    pattern_flip_fraction,
    relative_change,
)
from worker.models import Forward, Network, build_network
from worker.spectra import ExtremeEigenvalues, eigenvalues

__all__ = ["train"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def sampler_seed(seed: int) -> int:
    """The mini-batch sampler's seed: derived from the run seed, a stream apart from the init."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])


def train(
    cfg: RunConfig,
    *,
    device: str = "cpu",
    should_stop: Callable[[], bool] = lambda: False,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    resume_at_most: int | None = None,
    arrays: tuple[Any, Any] | None = None,
) -> Iterator[Event]:
    """Train ``cfg`` and yield RunStarted, MetricBatch…, RunFinished.

    With ``checkpoint_dir`` and ``resume``, continue from the newest checkpoint there whose step
    is ≤ ``resume_at_most`` (any when None): the caller passes the first step it has not stored.

    ``arrays`` = (X (n, d), y (n,) or (n, k)) is the data of a ``data.kind == "dataset"`` run.
    """
    started = time.perf_counter()
    dtype = DTYPES[cfg.dtype]
    data = make_dataset(cfg, arrays)
    net = build_network(cfg, dtype).to(device)
    X, y = data.X.to(device=device, dtype=dtype), data.y.to(device=device, dtype=dtype)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    saved = (
        load_checkpoint(directory, at_most=resume_at_most)
        if directory is not None and resume
        else None
    )
    if saved is not None:
        _check_checkpoint(saved, cfg, data)
        net.load_state_dict(saved.initial_state)
    baseline = measure_baseline(cfg, net, X, data)
    sampler = torch.Generator().manual_seed(sampler_seed(cfg.seed))
    eig = ExtremeEigenvalues(cfg.eig_dense_max_n)
    start, elapsed_before = 0, 0.0
    if saved is not None:
        net.load_state_dict(saved.state)
        sampler.set_state(saved.sampler_state)
        eig.load_state(saved.eigen_state)
        start, elapsed_before = saved.step, saved.elapsed_s
    weights = net.trained_weights()
    yield RunStarted(
        data_checksum=data.checksum,
        parameter_count=sum(w.numel() for w in weights),
        device=str(device),
        torch_version=torch.__version__,
        resumed_from_step=start,
    )

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - started

    spectra = frozenset(cfg.spectrum_steps)
    n, batch = cfg.data.n, cfg.effective_batch_size
    pending: list[Point] = list(baseline.constants) if start == 0 else []
    status: FinalStatus = "succeeded"
    reason, step = f"reached max steps ({cfg.steps})", start
    for step in range(start, cfg.steps + 1):
        if directory is not None and step > start and step % cfg.checkpoint_every == 0:
            if pending:  # every point before a checkpoint is sent before it exists
                yield MetricBatch.of(pending)
                pending = []
            state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            save_checkpoint(
                directory,
                Checkpoint(
                    config=cfg.model_dump(mode="json"),
                    data_checksum=data.checksum,
                    step=step,
                    state=state,
                    initial_state=baseline.state,
                    sampler_state=sampler.get_state(),
                    eigen_state=eig.state(),
                    elapsed_s=elapsed(),
                ),
            )
        tick = time.perf_counter()
        wants_gram = step % cfg.gram_every == 0 or step in spectra
        with torch.set_grad_enabled(cfg.optimizer == "gd" or wants_gram):
            fwd = net.forward_layers(X)
            loss = objective(cfg.loss, fwd.u, y)
        loss_value = float(loss.detach())
        pending += _loss_points(cfg, data, fwd, y, step, loss_value)
        if not math.isfinite(loss_value) or loss_value > cfg.divergence_bound:
            status, reason = "diverged", f"loss {loss_value!r} at step {step}"
            break
        if wants_gram:
            pending += _gram_points(cfg, net, fwd, baseline, eig, step, spectra)
        if step % cfg.weights_every == 0:
            pending += _weight_points(cfg, net, fwd, baseline, step)
        if step % cfg.theory_every == 0:
            pending += [(nm, step, c.loss(step, baseline.lr)) for nm, c in baseline.curves.items()]
        if loss_value < cfg.loss_threshold:
            reason = f"loss {loss_value:.3g} below threshold {cfg.loss_threshold:g}"
            break
        if step == cfg.steps:
            break
        if should_stop():
            status, reason = "cancelled", f"stopped at step {step}"
            break
        if cfg.max_wall_time_s is not None and elapsed() >= cfg.max_wall_time_s:
            reason = f"wall-time budget {cfg.max_wall_time_s:g} s spent at step {step}"
            break
        if cfg.optimizer == "gd":
            grads = torch.autograd.grad(loss, weights)
        else:
            idx = torch.randperm(n, generator=sampler)[:batch].to(device)
            batch_loss = objective(cfg.loss, net.forward_layers(X[idx]).u, y[idx])
            grads = torch.autograd.grad((n / batch) * batch_loss, weights)
        del fwd, loss  # frees the graph before the update
        with torch.no_grad():
            for w, g in zip(weights, grads, strict=True):
                w.add_(g, alpha=-baseline.lr)
        pending += [
            (GRAD_NORM, step, gradient_norm(list(grads))),
            (STEP_TIME, step, time.perf_counter() - tick),
        ]
        if (step + 1) % cfg.emit_every == 0:
            yield MetricBatch.of(pending)
            pending = []
    if pending:
        yield MetricBatch.of(pending)
    yield RunFinished(status=status, steps_done=step, reason=reason, wall_time_s=elapsed())


def _check_checkpoint(saved: Checkpoint, cfg: RunConfig, data: Dataset) -> None:
    if RunConfig.model_validate(saved.config) != cfg:
        raise ValueError("the checkpoint directory holds a checkpoint of another run config")
    if saved.data_checksum != data.checksum:
        raise ValueError("the checkpoint was trained on other data (data checksum differs)")


def _loss_points(
    cfg: RunConfig, data: Dataset, fwd: Forward, y: torch.Tensor, step: int, loss_value: float
) -> list[Point]:
    points = [(LOSS, step, loss_value), (RESIDUAL_NORM, step, residual_norm(cfg.loss, fwd.u, y))]
    acc = accuracy(data.label_kind, fwd.u, y)
    if acc is not None:
        points.append((ACCURACY, step, acc))
    return points


def _gram_points(
    cfg: RunConfig,
    net: Network,
    fwd: Forward,
    baseline: Baseline,
    eig: ExtremeEigenvalues,
    step: int,
    spectra: frozenset[int],
) -> list[Point]:
    computed = compute_grams(fwd, full_outputs=cfg.gram_full_outputs)
    grams = computed.layers
    ntk, last = torch.stack(grams).sum(dim=0), last_hidden_gram(cfg, net, grams)
    named = [("ntk", ntk)] + ([("gram_H", last)] if last is not None else [])
    points: list[Point] = []
    if step % cfg.gram_every == 0:
        full = eig("ntk", ntk)
        points += [
            (LAMBDA_MIN, step, full.lambda_min),
            (LAMBDA_MAX, step, full.lambda_max),
            (NTK_CHANGE, step, relative_change(ntk, baseline.ntk)),
        ]
        if last is not None and baseline.last_hidden is not None:
            last_layer = eig("gram_H", last)
            points += [
                (GRAM_H_MIN, step, last_layer.lambda_min),
                (GRAM_H_MAX, step, last_layer.lambda_max),
                (GRAM_H_CHANGE, step, relative_change(last, baseline.last_hidden)),
            ]
        if computed.full is not None:
            outputs = eig("ntk_full", computed.full)
            points += [
                (FULL_NTK_MIN, step, outputs.lambda_min),
                (FULL_NTK_MAX, step, outputs.lambda_max),
            ]
        if cfg.gram_per_layer:
            for name, gram in zip(net.layer_names, grams, strict=True):
                layer = eig(f"gram/{name}", gram)
                lo, hi = gram_layer_names(name)
                points += [(lo, step, layer.lambda_min), (hi, step, layer.lambda_max)]
    if step in spectra:
        for name, gram in named:
            values = eigenvalues(gram).tolist()
            points += [(spectrum_name(name, i), step, v) for i, v in enumerate(values)]
    return points


def _weight_points(
    cfg: RunConfig, net: Network, fwd: Forward, baseline: Baseline, step: int
) -> list[Point]:
    points: list[Point] = []
    layers = zip(net.layer_names, net.trained_weights(), baseline.weights, strict=True)
    for name, current, initial in layers:
        points += layer_distance(current, initial, cfg.width).points(name, step)
    for name, preact, pattern in zip(net.layer_names, fwd.preacts, baseline.patterns, strict=False):
        points.append(
            (layer_metric("pattern_flips", name), step, pattern_flip_fraction(preact, pattern))
        )
    return points
