"""Resource requests per run: CPUs, GPUs (fractional: many small runs share one GPU), memory.

A sweep spec may set ``resources``; what it leaves out is estimated from the run's size:
parameters (weights, initial weights for distances, gradients, a checkpoint copy), activations
(inputs, pre-activations and backprop signals of every layer, for the n points), the n×n
float64 Gram matrices (one per layer plus H(k) and H(0)) and a teacher network's weights and
activations. Sweeps refuse runs whose estimate exceeds ``max_run_memory_mb``. Fractional GPUs
are only Ray's bookkeeping, so the worker also caps torch's share of GPU memory to the same
fraction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.settings import Settings
from worker.config import RunConfig

MIB = 1024 * 1024
RUNTIME_OVERHEAD_BYTES = 512 * MIB  # a Python worker with torch imported


class ResourceSpec(BaseModel):
    """What a sweep asks for each of its runs; unset fields are estimated or defaulted."""

    model_config = ConfigDict(extra="forbid")

    cpus: float | None = Field(None, gt=0, le=1024, description="CPUs per run")
    gpus: float | None = Field(
        None, ge=0, le=64, description="GPUs per run; a fraction < 1 shares a GPU"
    )
    memory_mb: int | None = Field(
        None, gt=0, le=2**24, description="host memory per run (MiB, at most 16 TiB)"
    )

    @field_validator("gpus")
    @classmethod
    def _whole_above_one(cls, gpus: float | None) -> float | None:
        if gpus is not None and gpus > 1 and gpus != int(gpus):
            raise ValueError("more than one GPU must be a whole number")
        return gpus


@dataclass(frozen=True)
class ResourceRequest:
    cpus: float
    gpus: float
    memory_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResourceRequest:
        return cls(float(data["cpus"]), float(data["gpus"]), int(data["memory_bytes"]))


def output_field(cfg: RunConfig) -> str:
    """The config field that sets the number of outputs C."""
    if cfg.loss == "mse":
        return "data.label_dim"
    return {"digits": "data.classes", "dataset": "data.num_classes"}.get(cfg.data.kind, "loss")


def largest_factor(cfg: RunConfig) -> str:
    """The field of the largest factor of the parameter count: the one to lower."""
    factors = {"width": cfg.width, "data.d": cfg.data.d, output_field(cfg): cfg.num_outputs}
    if cfg.arch == "conv_resnet":
        factors["kernel_size"] = cfg.patch_size
    return max(factors, key=lambda name: factors[name])


def memory_terms(cfg: RunConfig) -> dict[str, int]:
    """Bytes a run needs beyond the runtime itself (see the module docstring), by the config
    field that drives each term (the largest names the field to lower)."""
    width_bytes = 8 if cfg.dtype == "float64" else 4
    n, layers = cfg.data.n, cfg.depth + 1
    widest = max(cfg.width, cfg.data.d)
    terms = {
        largest_factor(cfg): cfg.weight_count() * width_bytes * 4,  # trained or fixed
        "data.n": n**2 * 8 * (layers + 2),  # the Grams
    }
    activations = n * widest * layers * width_bytes * 3
    field = "data.n" if n >= widest else ("width" if cfg.width >= cfg.data.d else "data.d")
    terms[field] = terms.get(field, 0) + activations
    if cfg.data.kind == "sphere" and cfg.data.labels == "teacher":
        k = cfg.data.teacher_width
        terms["data.teacher_width"] = (n * k + k * cfg.data.d + k) * 8
    return terms


def estimate_memory_bytes(cfg: RunConfig) -> int:
    """Bytes a run needs beyond the runtime itself (see the module docstring)."""
    return sum(memory_terms(cfg).values())


def resolve(spec: ResourceSpec, cfg: RunConfig, settings: Settings) -> ResourceRequest:
    memory = (
        spec.memory_mb * MIB
        if spec.memory_mb is not None
        else RUNTIME_OVERHEAD_BYTES + estimate_memory_bytes(cfg)
    )
    return ResourceRequest(
        cpus=spec.cpus if spec.cpus is not None else settings.run_cpus,
        gpus=spec.gpus if spec.gpus is not None else settings.run_gpus,
        memory_bytes=memory,
    )


def why_it_cannot_fit(request: ResourceRequest, nodes: list[dict[str, float]]) -> str | None:
    """None if some node's total resources hold ``request``; otherwise the reason.

    ``nodes`` are Ray's per-node totals (``CPU``, ``GPU``, ``memory`` in bytes), as the
    dispatcher last saw them. With no snapshot yet nothing is refused.
    """
    if not nodes:
        return None
    for node in nodes:
        if (
            node.get("CPU", 0.0) >= request.cpus
            and node.get("GPU", 0.0) >= request.gpus
            and node.get("memory", float("inf")) >= request.memory_bytes
        ):
            return None
    largest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0), n.get("memory", 0)))
    return (
        f"needs {request.cpus:g} CPU, {request.gpus:g} GPU and "
        f"{request.memory_bytes / MIB:.0f} MiB on one node, but the largest worker has "
        f"{largest.get('CPU', 0):g} CPU, {largest.get('GPU', 0):g} GPU and "
        f"{largest.get('memory', 0) / MIB:.0f} MiB"
    )
