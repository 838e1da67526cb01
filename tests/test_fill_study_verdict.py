"""studies/recipe_on_independent_fill.py's verdict: computed from the runs, and a seed where diffusers' script was
not run compares nothing (the kit is not "faster" than a run that never happened)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "studies"))
import recipe_on_independent_fill as study  # noqa: E402

M = "disc_iou_truth_prompt"


def _run(wall):
    """A trainer's entry that stays >= 0.8 from ``wall`` seconds (None: never), and >= the lower bars too."""
    lower = {str(t): {"stays_above_from_step": None if wall is None else 1, "wall_s": wall}
             for t in study.LOWER_THRESHOLDS}
    return {M: {"stays_above_from_step": None if wall is None else 1, "wall_s": wall, "lower_thresholds": lower}}


def test_kit_faster_counts_only_seeds_where_the_stock_script_ran():
    runs = {"kit": {"0": _run(100.0), "1": _run(300.0), "2": _run(50.0)},
            "diffusers": {"0": _run(200.0), "1": _run(None)}}  # seed 1: stock never reached; seed 2: not run
    v = study.verdict(runs, [0, 1, 2])
    assert v["0.8"] == {"measure": M, "kit_reached_in_seeds": 3, "kit_faster_in_seeds": 2,
                        "seeds_with_stock_script": 2, "seeds": 3}
    assert v["held"] is True
    slower = study.verdict({"kit": {"0": _run(300.0)}, "diffusers": {"0": _run(200.0)}}, [0])
    assert slower["0.8"]["kit_faster_in_seeds"] == 0 and slower["held"] is False
    alone = study.verdict({"kit": {"0": _run(100.0)}}, [0])  # --skip-diffusers
    assert alone["0.8"]["kit_faster_in_seeds"] == 0 and alone["0.8"]["seeds_with_stock_script"] == 0


def test_table_rows_come_from_the_measured_curves():
    rows = [{"trainer": "kit", "seed": 0, "step": s, "disc_iou_truth_prompt": v, "disc_iou_truth_empty": 0.9}
            for s, v in ((0, 0.2), (100, 0.65), (200, 0.85), (300, 0.75), (400, 0.82))]
    entry = {"s_per_step": 0.9, "disc_iou_truth_empty": {"final": 0.9},
             M: {"stays_above_from_step": 400, "wall_s": 380.0, "final": 0.82, "max": 0.85}}
    table = study.markdown_table(rows, {"kit": {"0": entry}})
    assert table.splitlines()[2] == "| 0 | kit | 0.90 | 0.82 (0.85) | 0.90 | 400 (380) | 0.10 |"
    assert study.largest_fall([0.1, 0.5]) is None and study.largest_fall([0.7, 0.8]) == 0.0


def test_steadiness_keeps_each_seed_with_its_own_run():
    """A seed a trainer has no run for is absent, not a shift of the next seed's numbers into its place."""
    from types import SimpleNamespace

    rows = [{"trainer": "diffusers", "seed": 2, "step": s, M: v} for s, v in ((0, 0.1), (100, 0.7), (200, 0.5))]
    rows += [{"trainer": "kit", "seed": seed, "step": 0, M: 0.9} for seed in (0, 1, 2)]
    out = study.steadiness(rows, SimpleNamespace(seeds=[0, 1, 2], kit_variants=["kit"]))
    assert list(out["diffusers"]["largest_fall_by_seed"]) == [2]
    assert abs(out["diffusers"]["largest_fall_by_seed"][2] - 0.2) < 1e-9
    assert out["diffusers"]["final_by_seed"] == {2: 0.5}
    assert sorted(out["kit"]["final_by_seed"]) == [0, 1, 2]
