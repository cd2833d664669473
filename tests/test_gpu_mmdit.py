"""Issue 28's lease driver (benchmarks/gpu_mmdit.py) in its smoke mode: tiny SD3/FLUX configs of the same classes
run through the same timing path on this CPU and write the table a GPU lease would bring home."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_mode_writes_its_rows(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_mmdit

    out = tmp_path / "out"
    assert gpu_mmdit.main(["--smoke", "--reps", "1", "--batch", "3", "--out", str(out)]) == 0
    text = (out / "issue28_mmdit.md").read_text()
    assert "SMOKE" in text and "failed" not in text
    rows = json.loads((out / "issue28_mmdit.json").read_text())
    assert [(r["family"], r["batch"]) for r in rows] == [("sd3", 1), ("sd3", 1), ("sd3", 3),
                                                         ("flux", 1), ("flux", 1), ("flux", 3)]
    assert all(r["seconds"] > 0 and r["tflop"] > 0 for r in rows)
    # the batched row counts batch x the batch-1 FLOPs at the same size
    for fam in ("sd3", "flux"):
        one, many = [r for r in rows if r["family"] == fam][1:]
        assert abs(many["tflop"] - 3 * one["tflop"]) < 1e-9 * max(1.0, many["tflop"])
        assert many["estimate_s"] > 0
