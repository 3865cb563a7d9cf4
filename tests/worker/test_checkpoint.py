"""Checkpoint and resume: an interrupted run continues bitwise like an uninterrupted one (CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.checkpoint import CHECKPOINT_FILE, PREVIOUS_FILE, load_checkpoint
from worker.config import DataConfig, RunConfig
from worker.events import Event, MetricBatch, RunFinished, RunStarted
from worker.metric_names import STEP_TIME
from worker.train import train

Points = list[tuple[str, int, float]]

RUN = RunConfig(
    arch="fc",
    depth=2,
    width=32,
    data=DataConfig(n=12, d=6),
    steps=120,
    lr="auto",
    gram_every=7,
    weights_every=5,
    theory_every=3,
    spectrum_steps=(0, 50, 100),
    emit_every=11,
    checkpoint_every=25,
)


def _points(events: list[Event]) -> Points:
    return [p for e in events if isinstance(e, MetricBatch) for p in e.points]


def _science(pts: Points) -> dict[tuple[str, int], float]:
    """Every point but wall-clock timings, by (name, step)."""
    return {(n, s): v for n, s, v in pts if n != STEP_TIME}


def _interrupted(cfg: RunConfig, directory: Path, after_step: int) -> list[Event]:
    """Consume the run until a checkpoint past ``after_step`` exists, then abandon it."""
    events: list[Event] = []
    for event in train(cfg, checkpoint_dir=directory):
        events.append(event)
        saved = load_checkpoint(directory)
        if saved is not None and saved.step > after_step:
            break
    return events


@pytest.mark.parametrize(
    "update",
    [
        {},
        {"optimizer": "sgd", "batch_size": 5, "eig_dense_max_n": 6, "arch": "resnet"},
        {"arch": "two_layer", "depth": 1, "width": 64, "dtype": "float32", "lr": 0.3},
        {
            "arch": "conv_resnet",
            "width": 6,
            "loss": "cross_entropy",
            "gram_full_outputs": True,
            "eig_dense_max_n": 16,  # the 20×20 full NTK takes the Lanczos path
            "data": DataConfig(n=10, d=6, labels="sign"),
        },
        {"train_layers": "hidden", "parametrization": "standard", "depth": 3},
    ],
    ids=["gd-fc", "sgd-resnet-lanczos", "two_layer-float32", "conv-cross_entropy", "allen_zhu"],
)
def test_resumed_run_reports_exactly_the_uninterrupted_metrics(
    update: dict[str, object], tmp_path: Path
) -> None:
    cfg = RUN.model_copy(update=update)
    uninterrupted = _science(_points(list(train(cfg))))
    first = _interrupted(cfg, tmp_path, after_step=40)
    second = list(train(cfg, checkpoint_dir=tmp_path))
    started = second[0]
    assert isinstance(started, RunStarted) and started.resumed_from_step == 50
    assert isinstance(second[-1], RunFinished) and second[-1].steps_done == cfg.steps
    assert min(s for _, s, _ in _points(second)) == 50, "nothing before the checkpoint again"
    before = _science(_points(first))
    after = _science(_points(second))
    assert all(before[k] == v for k, v in after.items() if k in before), "re-sent points agree"
    assert before | after == uninterrupted  # bitwise: == on floats


def test_checkpoints_are_written_atomically_every_k_steps(tmp_path: Path) -> None:
    list(train(RUN, checkpoint_dir=tmp_path))
    saved = load_checkpoint(tmp_path)
    assert saved is not None and saved.step == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT_FILE, PREVIOUS_FILE])
    assert RunConfig.model_validate(saved.config) == RUN
    assert set(saved.initial_state) == set(saved.state)


def test_resume_at_most_picks_a_checkpoint_not_past_the_stored_points(tmp_path: Path) -> None:
    """The newest checkpoint may be ahead of what the service stored: the previous one (or
    none) is used then, and the resumed run re-sends every point from there."""
    list(train(RUN, checkpoint_dir=tmp_path))
    newest, previous = load_checkpoint(tmp_path), load_checkpoint(tmp_path, at_most=99)
    assert newest is not None and previous is not None and previous.step < newest.step
    assert load_checkpoint(tmp_path, at_most=previous.step - 1) is None
    events = list(train(RUN, checkpoint_dir=tmp_path, resume_at_most=previous.step))
    started = events[0]
    assert isinstance(started, RunStarted) and started.resumed_from_step == previous.step
    steps = sorted(
        s for e in events if isinstance(e, MetricBatch) for n, s, _ in e.points if n == "loss"
    )
    assert steps == list(range(previous.step, RUN.steps + 1))
    events = list(train(RUN, checkpoint_dir=tmp_path, resume_at_most=0))
    assert isinstance(events[0], RunStarted) and events[0].resumed_from_step == 0


def test_resume_false_starts_over(tmp_path: Path) -> None:
    _interrupted(RUN, tmp_path, after_step=30)
    events = list(train(RUN, checkpoint_dir=tmp_path, resume=False))
    started = events[0]
    assert isinstance(started, RunStarted) and started.resumed_from_step == 0


def test_a_checkpoint_of_another_config_is_refused(tmp_path: Path) -> None:
    _interrupted(RUN, tmp_path, after_step=30)
    with pytest.raises(ValueError, match="another run config"):
        list(train(RUN.model_copy(update={"seed": 5}), checkpoint_dir=tmp_path))
