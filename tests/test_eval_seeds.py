"""``benchmarks/eval_enhancer.py --seeds``: a bad seed list is a usage error; the per-seed doubling summary."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from eval_enhancer import main, seed_summary  # noqa: E402


def test_bad_seeds_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--seeds", "3-1"])
    assert exc.value.code == 2
    assert "runs backwards" in capsys.readouterr().err


def test_models_folder_without_the_package_is_a_usage_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--models", str(tmp_path), "--only", "mitochondria_em2d"])
    assert exc.value.code == 2
    assert "no package mitochondria_em2d in it" in capsys.readouterr().err


def _row(dataset: str, seed: int, forest: tuple[int, int, int], enhanced: tuple[int, int, int]) -> dict[str, object]:
    """A result row from (intersection, predicted, truth) pixel counts."""
    row: dict[str, object] = {"enhancer": "e", "dataset": dataset, "domain": "other", "seed": seed}
    for key, (inter, pred, truth) in (("forest", forest), ("enhanced", enhanced)):
        row[f"{key}_iou"] = inter / (pred + truth - inter)
        row[f"{key}_counts"] = [inter, pred, truth]
    return row


def test_seed_summary_counts_doubling_per_dataset_and_pools_counts() -> None:
    rows = [
        _row("a", 1, (20, 60, 60), (39, 60, 79)),  # IoU 0.2 -> 0.39: x1.95, not doubled
        _row("a", 0, (20, 60, 60), (41, 60, 81)),  # 0.2 -> 0.41
        _row("b", 0, (30, 70, 60), (90, 90, 90)),  # 0.3 -> 1.0
        _row("b", 1, (25, 75, 50), (50, 50, 100)),  # 0.25 -> 0.5: exactly doubled counts
    ]
    lines = seed_summary(rows).splitlines()
    assert len(lines) == 4
    a, b = lines[2], lines[3]
    assert "| a |" in a and "1 of 2" in a and "x1.95" in a
    assert a.index("0: 0.200") < a.index("1: 0.200")  # sorted by seed
    # pooled counts: forest 40 / (120 + 120 - 40), enhanced 80 / (120 + 160 - 80)
    assert "| 0.200 -> 0.400 (x2.00) |" in a
    assert "| b |" in b and "2 of 2" in b and "| x2.00 |" in b
    assert "| 0.275 -> 0.737 (x2.68) |" in b  # 55 / (145 + 110 - 55) -> 140 / (140 + 190 - 140)
