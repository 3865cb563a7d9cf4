"""Sweep spec expansion and its field-level errors (no database)."""

from __future__ import annotations

import pytest

from services.errors import SpecError
from services.settings import Settings
from services.sweeps import SweepSpec, count_runs, expand

SETTINGS = Settings(database_url="sqlite://", embedded_dispatcher=False)


def spec(**kwargs: object) -> SweepSpec:
    return SweepSpec.model_validate(kwargs)


def errors(s: SweepSpec, settings: Settings = SETTINGS) -> dict[str, tuple[object, str]]:
    with pytest.raises(SpecError) as info:
        expand(s, settings)
    return {e.field: (e.value, e.reason) for e in info.value.errors}


def test_grid_is_a_cartesian_product_with_dotted_paths() -> None:
    runs = expand(
        spec(base={"data": {"d": 4}}, grid={"width": [8, 16], "data.n": [3, 5, 7]}), SETTINGS
    )
    assert len(runs) == 6
    assert {(r.config.width, r.config.data.n) for r in runs} == {
        (w, n) for w in (8, 16) for n in (3, 5, 7)
    }
    assert all(r.config.data.d == 4 for r in runs)
    assert runs[0].overrides == {"width": 8, "data.n": 3}


def test_explicit_runs_are_crossed_with_the_grid() -> None:
    s = spec(grid={"seed": [0, 1]}, runs=[{"arch": "fc", "depth": 2}, {"lr": 0.05}])
    runs = expand(s, SETTINGS)
    assert count_runs(s) == len(runs) == 4
    assert [(r.config.arch, r.config.seed, r.config.lr) for r in runs] == [
        ("fc", 0, 0.1),
        ("two_layer", 0, 0.05),
        ("fc", 1, 0.1),
        ("two_layer", 1, 0.05),
    ]


def test_nested_overrides_in_runs_are_flattened() -> None:
    runs = expand(spec(runs=[{"data": {"n": 9}}]), SETTINGS)
    assert runs[0].config.data.n == 9 and runs[0].overrides == {"data.n": 9}


def test_empty_spec_is_one_default_run() -> None:
    assert len(expand(spec(), SETTINGS)) == 1


def test_non_positive_width_in_grid_names_the_grid_entry() -> None:
    errs = errors(spec(grid={"width": [64, -3, 0]}))
    assert set(errs) == {"grid.width[1]", "grid.width[2]"}
    assert errs["grid.width[1]"][0] == -3
    assert "greater than 0" in errs["grid.width[1]"][1]


def test_unknown_architecture_in_base() -> None:
    errs = errors(spec(base={"arch": "transformer"}))
    assert errs["base.arch"][0] == "transformer"


def test_unknown_fields_everywhere() -> None:
    errs = errors(spec(base={"widht": 3}, grid={"dept": [1]}, runs=[{"data.x": 1}]))
    assert set(errs) >= {"grid.dept", "runs[0].data.x"}
    errs = errors(spec(base={"widht": 3}))
    assert errs["base.widht"] == (3, "unknown run config field; did you mean 'width'?")


def test_unknown_fields_get_the_closest_known_name() -> None:
    errs = errors(
        spec(gird={"width": [8]}, grid={"data.nn": [3]}, runs=[{"lerning_rate": 1}, {"lr": 1}])
    )
    assert errs["gird"][1] == "unknown sweep spec field; did you mean 'grid'?"
    assert errs["grid.data.nn"][1] == "unknown run config field; did you mean 'data.n'?"
    assert errs["runs[0].lerning_rate"][1] == "unknown run config field"
    assert (
        "did you mean 'data.labels'"
        in errors(spec(base={"data": {"label": "sign"}}))["base.data.label"][1]
    )


def test_every_error_of_a_spec_is_reported_at_once() -> None:
    """An unknown grid key, an empty grid and the run cap no longer hide base's errors."""
    settings = SETTINGS.model_copy(update={"max_runs_per_sweep": 4})
    errs = errors(
        spec(
            base={"width": -1, "data": {"n": 0}},
            grid={"dept": [1], "seed": list(range(5))},
            runs=[{"activation": "sigmoid"}],
        ),
        settings,
    )
    assert set(errs) == {"grid.dept", "grid", "base.width", "base.data.n", "runs[0].activation"}
    errs = errors(spec(base={"width": -1}, grid={"lr": []}))
    assert set(errs) == {"grid.lr", "base.width"}


def test_a_grid_value_is_judged_in_the_runs_it_is_part_of() -> None:
    """depth 2 is invalid for the default two_layer, but every run here is an fc net."""
    runs = expand(spec(grid={"depth": [1, 2]}, runs=[{"arch": "fc"}]), SETTINGS)
    assert [r.config.depth for r in runs] == [1, 2]


def test_depth_must_be_one_for_two_layer() -> None:
    errs = errors(spec(grid={"depth": [1, 3]}))
    assert "grid.depth[1]" in errs and "two_layer" in errs["grid.depth[1]"][1]


def test_grid_past_the_run_cap() -> None:
    settings = SETTINGS.model_copy(update={"max_runs_per_sweep": 10})
    errs = errors(spec(grid={"width": [1, 2, 3, 4], "seed": [0, 1, 2]}), settings)
    assert errs["grid"][0] == 12 and "cap 10" in errs["grid"][1]


def test_sizes_past_the_caps_name_field_value_and_cap() -> None:
    settings = SETTINGS.model_copy(update={"max_width": 1000, "max_n": 100})
    errs = errors(spec(base={"data": {"n": 500}}, grid={"width": [10, 2000]}), settings)
    assert errs["grid.width[1]"][0] == 2000
    assert "cap 1000" in errs["grid.width[1]"][1]
    assert "OVERPARAM_MAX_WIDTH" in errs["grid.width[1]"][1]
    assert errs["base.data.n"][0] == 500


def test_parameter_cap() -> None:
    settings = SETTINGS.model_copy(update={"max_parameters": 10_000})
    errs = errors(spec(base={"arch": "fc", "depth": 3, "width": 100}), settings)
    assert "parameters" in errs["base.width"][1]
    # fixed layers are held in memory too: training only the output layer does not dodge it
    last = spec(base={"arch": "fc", "depth": 3, "width": 100, "train_layers": "last"})
    assert "parameters" in errors(last, settings)["base.width"][1]


def test_empty_grid_values_are_rejected() -> None:
    assert "grid.width" in errors(spec(grid={"width": []}))


def test_every_example_spec_expands_into_valid_runs() -> None:
    """examples/*.yaml are what users copy: each must pass the run contract and the caps
    (allen_zhu.yaml pairs Allen-Zhu et al.'s setting with Du et al.'s fc at each width)."""
    import pathlib

    import yaml

    directory = pathlib.Path(__file__).parents[2] / "examples"
    expanded = {
        path.name: expand(SweepSpec.model_validate(yaml.safe_load(path.read_text())), SETTINGS)
        for path in sorted(directory.glob("*.yaml"))
    }
    assert all(expanded.values()) and "allen_zhu.yaml" in expanded
    pairs = {(r.config.train_layers, r.config.parametrization) for r in expanded["allen_zhu.yaml"]}
    assert pairs == {("hidden", "standard"), ("all", "ntk")}
