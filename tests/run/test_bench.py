"""`spinjax bench`: its rows add up, and --results appends a dated section naming the machine.

No timings are asserted (they belong to benchmarks/); only that the reported quantities are
the ones the floor is defined by, at the smallest Pythia shape.
"""

from __future__ import annotations

import json
import os

import jax
import pytest
from click.testing import CliRunner

from spinjax.cli import main


def _bench(*args: str):
    return CliRunner().invoke(main, ["bench", *args], catch_exceptions=False)


@pytest.mark.slow
def test_bench_rows_follow_the_floor_definition_and_results_are_appended(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nearlier text\n")
    out = _bench("--shapes", "160m", "--repeat", "1", "--json", "--results", str(results))
    assert out.exit_code == 0, out.output
    (row,) = json.loads(out.stdout)
    assert (row["d_model"], row["n_heads"], row["d_head"], row["n_layers"]) == (768, 12, 64, 12)
    assert 1 <= row["block_rows"] <= 768 and row["layer_s"] > 0 and row["matmul_gflops"] > 0
    assert row["pairs_layer_s"] > 0  # the run's default, with the heads' inner products
    assert row["floor_s"] == pytest.approx(row["matmul_s"] + row["pass_s"] + row["read_s"])
    assert row["ratio_to_floor"] == pytest.approx(row["layer_s"] / row["floor_s"])
    assert row["heads_per_s"] == pytest.approx(12 / row["layer_s"])
    # the matmul part of the floor is the FLOPs of forming every W_QK at the measured rate
    flops = 2 * 12 * 64 * 768**2
    assert row["matmul_s"] == pytest.approx(flops / (row["matmul_gflops"] * 1e9))
    assert row["achieved_gflops"] == pytest.approx(flops / row["layer_s"] / 1e9)
    assert row["checkpoint_s"] == pytest.approx(12 * row["layer_s"])
    # what ks_normal and the eigenvalues add: the layer against itself without them
    assert row["plain_layer_s"] > 0 and row["ks_layer_s"] > 0
    assert row["ks_s"] == pytest.approx(row["ks_layer_s"] - row["plain_layer_s"])
    assert row["eigenvalues_s"] == pytest.approx(row["layer_s"] - row["ks_layer_s"])

    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nearlier text\n")  # appended, nothing lost
    section = text.split("## `spinjax bench`, ", 1)[1]
    assert f"{os.cpu_count()} cores" in section and f"jax {jax.__version__}" in section
    assert "device: 1 x cpu" in section or jax.default_backend() != "cpu"
    table_rows = [ln for ln in section.splitlines() if ln.startswith("| 160m (d 768, 12x64) |")]
    assert len(table_rows) == 1 and f"{row['ratio_to_floor']:.2f}x" in table_rows[0]
    ks, eig = (f"{row[k]:.3f} ({100 * row[k] / row['layer_s']:.0f}%)" for k in ("ks_s", "eigenvalues_s"))
    assert table_rows[0].endswith(f"| {row['pairs_layer_s']:.3f} | {ks} | {eig} |")


def test_bench_refuses_unknown_shapes_and_a_directory_for_results(tmp_path):
    out = CliRunner().invoke(main, ["bench", "--shapes", "160m,7b"])
    assert out.exit_code == 2 and "7b" in out.output
    out = CliRunner().invoke(main, ["bench", "--shapes", "160m", "--results", str(tmp_path)])
    assert out.exit_code == 2 and "--results" in out.output
