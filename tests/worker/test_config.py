"""The run contract: defaults, field-level errors, parameter counts for every architecture."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from worker.config import RunConfig
from worker.models import build_network


def _errors(payload: dict[str, Any]) -> dict[tuple[str | int, ...], str]:
    with pytest.raises(ValidationError) as info:
        RunConfig.model_validate(payload)
    return {tuple(e["loc"]): e["msg"] for e in info.value.errors()}


@pytest.mark.parametrize(
    ("payload", "location"),
    [
        ({"lr": -1}, ("lr",)),
        ({"lr": "fast"}, ("lr",)),
        ({"lr_fraction": 1.5}, ("lr_fraction",)),
        ({"arch": "conv_resnet", "kernel_size": 4}, ("kernel_size",)),
        ({"batch_size": 1000}, ("batch_size",)),
        ({"data": {"kind": "digits"}}, ("loss",)),  # mse on digits needs a pair of classes
        ({"data": {"kind": "digits", "d": 10}, "loss": "cross_entropy"}, ("data", "d")),
        ({"data": {"kind": "digits", "n": 500, "classes": [1, 2]}}, ("data", "n")),
        ({"data": {"kind": "digits", "classes": [1, 1]}}, ("data", "classes")),
        ({"data": {"kind": "dataset"}}, ("data", "dataset_id")),
        ({"data": {"label_dim": 2}}, ("data", "label_dim")),
        (
            {"data": {"kind": "dataset", "dataset_id": 1, "label_dim": 2}, "loss": "cross_entropy"},
            ("loss",),
        ),
        ({"data": {"d": 16, "image_shape": [4, 5]}}, ("data", "image_shape")),
        ({"data": {"d": 16, "channels": 3}}, ("data", "channels")),
        ({"data": {"label_noise": 1.5}}, ("data", "label_noise")),
        ({"loss": "cross_entropy"}, ("loss",)),  # gaussian labels are not classes
        ({"arch": "two_layer", "depth": 2}, ("depth",)),
        ({"c_res": 1.0}, ("c_res",)),
        ({"max_wall_time_s": 0}, ("max_wall_time_s",)),
        ({"widht": 3}, ("widht",)),
        ({"arch": "two_layer", "train_layers": "hidden"}, ("train_layers",)),
        ({"arch": "fc", "depth": 1, "train_layers": "hidden"}, ("train_layers",)),
        ({"arch": "fc", "train_layers": "some"}, ("train_layers",)),
        ({"arch": "resnet", "depth": 2, "parametrization": "standard"}, ("parametrization",)),
        ({"arch": "fc", "activation": "tanh", "parametrization": "standard"}, ("parametrization",)),
    ],
)
def test_bad_values_are_reported_at_their_field(
    payload: dict[str, Any], location: tuple[str, ...]
) -> None:
    assert location in _errors(payload)


def test_defaults_form_a_valid_run_and_survive_a_json_round_trip() -> None:
    cfg = RunConfig.model_validate({"lr": "auto", "spectrum_steps": [0, 10]})
    assert RunConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    digits = RunConfig.model_validate({"data": {"kind": "digits", "classes": [3, 8]}})
    assert digits.data.d == 64 and digits.data.image_shape == (8, 8)


@pytest.mark.parametrize(
    "payload",
    [
        {"arch": "two_layer", "width": 40},
        {"arch": "fc", "depth": 3, "width": 12},
        {"arch": "resnet", "depth": 4, "width": 9},
        {"arch": "conv_resnet", "depth": 3, "width": 5, "data": {"d": 12, "channels": 2}},
        {
            "arch": "conv_resnet",
            "depth": 2,
            "width": 4,
            "kernel_size": 5,
            "data": {"kind": "digits", "classes": [0, 1]},
        },
        {"arch": "fc", "depth": 2, "width": 7, "loss": "cross_entropy", "data": {"kind": "digits"}},
        {"arch": "two_layer", "width": 7, "loss": "cross_entropy", "data": {"labels": "sign"}},
        {
            "arch": "fc",
            "depth": 2,
            "width": 6,
            "data": {"kind": "dataset", "dataset_id": 4, "n": 3, "d": 2, "label_dim": 3},
        },
        {"arch": "fc", "depth": 4, "width": 9, "train_layers": "hidden"},
        {
            "arch": "fc",
            "depth": 3,
            "width": 9,
            "train_layers": "hidden",
            "parametrization": "standard",
        },
        {"arch": "resnet", "depth": 3, "width": 5, "train_layers": "last"},
        {"arch": "conv_resnet", "depth": 3, "width": 4, "train_layers": "hidden", "data": {"d": 6}},
    ],
)
def test_parameter_count_is_the_number_of_trained_weights(payload: dict[str, Any]) -> None:
    cfg = RunConfig.model_validate(payload)
    net = build_network(cfg)
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert cfg.parameter_count() == sum(w.numel() for w in net.trained_weights())
    assert cfg.parameter_count() == sum(p.numel() for p in trainable)
    assert len(net.layer_names) == len(cfg.trained_layers) == len(trainable)
    held = sum(p.numel() for p in net.parameters()) + (
        net.a.numel() if cfg.arch == "two_layer" else 0
    )
    assert cfg.weight_count() == held


def test_old_configs_keep_their_meaning() -> None:
    """The new fields default to today's networks: every layer trained, Du et al.'s scaling."""
    cfg = RunConfig.model_validate({"arch": "fc", "depth": 3})
    assert cfg.train_layers == "all" and cfg.parametrization == "ntk"
    assert cfg.trained_layers == ("layer1", "layer2", "layer3", "out")
    assert not cfg.gram_full_outputs
    hidden = cfg.model_copy(update={"train_layers": "hidden"})
    assert hidden.trained_layers == ("layer2", "layer3")  # Allen-Zhu et al.: W₁…W_L only


def test_the_eigenvalue_path_is_described_as_it_is_run() -> None:
    """worker/spectra.py runs Lanczos (ARPACK eigsh), not LOBPCG, above eig_dense_max_n."""
    description = RunConfig.model_fields["eig_dense_max_n"].description or ""
    assert "Lanczos" in description and "LOBPCG" not in description
