"""Numbers with 3 significant digits, tables that drop columns before they cut a number, and
the CLI's column headers: the service's one label per quantity."""

from __future__ import annotations

import io

from rich.console import Console

from overparam.reports import LABELS, stats_text
from overparam.tables import Column, fitted_table, number
from services.quantities import label
from services.sweep_analysis import describe


def test_numbers_keep_three_significant_digits_and_their_exponent() -> None:
    assert number(7.98703e-16) == "7.99e-16" and number(1.41315e15) == "1.41e+15"
    assert number(0.0123456) == "0.0123" and number(-0.025734) == "-0.0257"
    assert number(1024) == "1024" and number(16384.0) == "16384" and number(None) == ""
    assert number("NaN") == "nan" and number(float("inf")) == "inf"


def test_a_narrow_table_drops_low_priority_columns_and_wraps_text() -> None:
    console = Console(file=io.StringIO(), width=40, record=True)
    columns = [
        Column("parameters"),
        Column("loss", numeric=True),
        Column("extra", numeric=True, priority=1),
    ]
    rows = [["width=16384 activation=softplus seed=2", number(7.98703e-16), "123456789"]]
    console.print(fitted_table(console, columns, rows))
    text = console.export_text()
    assert "7.99e-16" in text and "width=16384" in text and "activation=softplus" in text
    assert "123456789" not in text and "left out to fit 40 columns: extra" in text
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 40


def test_the_cli_headers_are_the_services_labels() -> None:
    assert {key: label(key) for key in LABELS} == LABELS


def test_a_quantity_spanning_decades_shows_its_geometric_mean() -> None:
    """Final losses 1e-2, 1e-16, 1e-30 over seeds: not 3.33e-03 ± 5.77e-03."""
    assert stats_text(describe([1e-2, 1e-16, 1e-30])) == "1e-16 ×/÷ 1e+14"
    assert stats_text(describe([1.0, 2.0, 3.0])) == "2 ± 1"
