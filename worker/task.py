"""The Ray side of a run: a streaming-generator task that forwards :func:`worker.train.train`.

A plain ``@ray.remote`` generator is a streaming generator: the dispatcher iterates its refs as
the worker yields. Batches, not points, are yielded (one item per point is slow in Ray).

Seams for the dispatcher: ``checkpoint_dir`` (a per-run directory on storage every worker
sees) makes a retried task resume from the run's latest checkpoint at or before
``resume_at_most`` (the first step the service has not stored); ``arrays`` = (X, y)
carries the data of a ``data.kind == "dataset"`` run (numpy arrays travel through Ray's object
store without copies).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import ray

from worker.config import RunConfig
from worker.events import Event
from worker.train import train


def _run_training(
    config: dict[str, Any],
    *,
    checkpoint_dir: str | None = None,
    resume_at_most: int | None = None,
    arrays: tuple[Any, Any] | None = None,
) -> Iterator[Event]:
    """Validate ``config`` again on the worker (the contract may have changed) and train."""
    import torch

    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    if device == "cuda":
        # Fractional GPUs are only Ray's bookkeeping: hold this run to its share of the memory
        # so runs packed onto one GPU cannot starve each other.
        share = ray.get_runtime_context().get_assigned_resources().get("GPU", 1.0)
        if share < 1.0:
            torch.cuda.set_per_process_memory_fraction(share)
    yield from train(
        RunConfig.model_validate(config),
        device=device,
        checkpoint_dir=checkpoint_dir,
        resume_at_most=resume_at_most,
        arrays=arrays,
    )


# Typed Any: Ray's typed overloads of ``.remote()`` are positional-only and would reject the
# keyword arguments ``run_training.remote(config, checkpoint_dir=...)``.
run_training: Any = ray.remote(max_retries=0)(_run_training)
