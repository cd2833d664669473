"""The issue-25 lease driver (benchmarks/gpu_issue25.py) in its smoke mode: the tiny model on this CPU runs
the lever rows, the agreement table and the inspector timings and writes its markdown tables, so the
script a GPU lease runs is known to work before the lease (scripts/gpu_issue25.sh SMOKE=1 runs all of it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_mode_writes_its_tables(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_issue25

    out = tmp_path / "out"
    code = gpu_issue25.main(["--part", "all", "--smoke", "--sections", "1,4,8", "--out", str(out), "--budget", "300",
                             "--work", str(tmp_path / "work")])
    assert code == 0, (out / "issue25_bench.md").read_text()
    bench = (out / "issue25_bench.md").read_text()
    assert "SMOKE" in bench and "### 1. Levers, sd15" in bench and "### 4. Agreement" in bench
    for row in ("eager baseline", "k-means on the device (torch)", "channels_last", "SDPA math"):
        assert f"| {row} |" in bench, row
    assert "| eager baseline | " in bench and "failed" not in bench
    assert "| reference | float32 |" in bench
    raw = json.loads((out / "issue25_bench.json").read_text())
    (levers,) = [v for k, v in raw.items() if k.startswith("1. Levers")]
    assert [r["name"] for r in levers][:2] == ["eager baseline", "k-means on the device (torch)"]
    assert all(r["wall"] > 0 for r in levers)
    jobs = (out / "issue25_jobs.md").read_text()
    assert "### 8. Inspector" in jobs and "| a new lambda |" in jobs and "| a new segment |" in jobs
    assert "### 5." not in jobs and "### 6-7." not in jobs  # not asked for
    assert sys.modules["gpu_issue25"].DENSE_BF16_PEAK["H200"] > 900
