"""bench/run_all.py copies the fleet simulation's results into RESULTS.md: the table,
the plot, the verdict and its summary rows, from whatever FLEET.md says."""

from __future__ import annotations

from pathlib import Path

from bench.run_all import _SUMMARY, fleet_section

_FLEET = """# Which signal
intro
## Results

`python -m bench.fleet_sim --seed 1`

#### diurnal (10 requests)

| autoscaler | policy | GPU-hours |
|---|---|---|
| MIG | demand | **9.9** |

![nodes](fleet_sim.png)
<!-- summary: fleet sim (MIG): demand gauge | 1 of 1 traces | every trace -->

## Conclusion

**The goal is met.** Because.

Second paragraph, not copied.

## Sensitivity
not copied either
"""


def test_fleet_results_table_plot_and_verdict_are_copied(tmp_path: Path) -> None:
    fleet = tmp_path / "FLEET.md"
    fleet.write_text(_FLEET)
    text = "\n".join(fleet_section(fleet))
    assert "| MIG | demand | **9.9** |" in text
    assert "![nodes](fleet_sim.png)" in text
    assert "##### diurnal (10 requests)" in text  # demoted under the section's own heading
    assert "**The goal is met.** Because." in text
    assert "Second paragraph" not in text and "Sensitivity" not in text and "intro" not in text
    assert _SUMMARY.findall(text) == [("fleet sim (MIG): demand gauge", "1 of 1 traces", "every trace")]


def test_no_fleet_write_up_adds_nothing(tmp_path: Path) -> None:
    assert fleet_section(tmp_path / "FLEET.md") == []


def test_the_shipped_fleet_write_up_has_its_summary_rows() -> None:
    text = "\n".join(fleet_section(Path(__file__).parents[2] / "bench" / "FLEET.md"))
    whats = [what for what, _result, _target in _SUMMARY.findall(text)]
    assert any("(MIG)" in w for w in whats) and any("(HPA)" in w for w in whats)
    assert "fleet_sim.png" in text
