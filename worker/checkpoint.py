"""Checkpoints: everything a run needs to continue bitwise as if never interrupted (on CPU).

A checkpoint at step k holds θ(k) (before update k), θ(0) (what distances are measured from),
the optimizer state (plain GD/SGD keeps none beyond the mini-batch sampler's RNG state), the
eigen-solver's warm starts, the config and data checksum it belongs to, and the training time
spent so far. It is written atomically (temporary file, fsync, ``os.replace``) as one file
per run directory, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_FILE = "previous.pt"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    config: dict[str, Any]  # RunConfig.model_dump(mode="json")
    data_checksum: str
    step: int
    state: dict[str, torch.Tensor]  # the network's state_dict at step (CPU)
    initial_state: dict[str, torch.Tensor]  # the state_dict at step 0 (CPU)
    sampler_state: torch.Tensor  # torch.Generator.get_state() of the mini-batch sampler
    eigen_state: dict[str, torch.Tensor]  # Lanczos start vectors by Gram name
    elapsed_s: float


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write ``directory/checkpoint.pt`` atomically, keeping the one before as ``previous.pt``.

    Two are kept because the newest may be ahead of what the service has stored (the worker
    can die after checkpointing and before its last points were written); the caller of
    :func:`load_checkpoint` says how far it may resume from.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / CHECKPOINT_FILE
    tmp = directory / f".{CHECKPOINT_FILE}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        torch.save({"format": FORMAT_VERSION, **asdict(checkpoint)}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    if final.exists():
        os.replace(final, directory / PREVIOUS_FILE)
    os.replace(tmp, final)
    return final


def _read(path: Path) -> Checkpoint | None:
    if not path.exists():
        return None
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if raw.pop("format") != FORMAT_VERSION:
        raise ValueError(f"{path} has an unknown checkpoint format")
    return Checkpoint(**raw)


def load_checkpoint(directory: Path, at_most: int | None = None) -> Checkpoint | None:
    """The newest checkpoint in ``directory`` whose step is ≤ ``at_most`` (any when None), or
    None when there is none."""
    for name in (CHECKPOINT_FILE, PREVIOUS_FILE):
        saved = _read(directory / name)
        if saved is not None and (at_most is None or saved.step <= at_most):
            return saved
    return None
