"""``tda bench``: runs on generated data, reports ratios against references, writes JSON."""

from __future__ import annotations

import json

import pytest

from tda_graph.frontends.cli import main


def test_bench_quick_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--trees", "10", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for word in ("features", "forest fit", "forest predict", "live"):
        assert word in text
    res = json.loads(out.read_text())
    assert set(res) == {"features", "forest", "live"}
    assert res["features"]["max_abs_diff"] < 1e-2  # same features as the scipy reference
    assert res["forest"]["max_abs_diff"] < 1e-6  # same probabilities as sklearn
    assert res["live"]["strokes"] == 5 and res["live"]["median_ms"] > 0


def test_bench_subset(capsys) -> None:
    assert main(["bench", "--quick", "--only", "forest", "--trees", "5"]) == 0
    text = capsys.readouterr().out
    assert "forest predict" in text and "live" not in text


@pytest.mark.parametrize(("argv", "match"), [(["--only", "gpu"], "choose from"), (["--trees", "0"], "trees must")])
def test_bench_bad_arguments(argv, match, capsys) -> None:
    assert main(["bench", *argv]) == 2
    assert match in capsys.readouterr().err
