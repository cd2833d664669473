"""Reference-model figures on a tiny random pipeline (shapes and files, not quality)."""

from __future__ import annotations

import json

import numpy as np

from emerdiff.reference.figures import loss_figure, sample


def test_sample_shapes(tiny_model):
    imgs = sample(tiny_model, ["a ball on grass", ""], steps=3, size=64)
    assert imgs.shape == (2, 64, 64, 3) and imgs.dtype == np.uint8


def test_loss_figure_with_eval_rows(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(120)]
    rows.append({"step": 99, "eval": {"locality": 0.3, "chance_locality": 0.17, "miou_emerdiff": 20.0,
                                      "miou_nearest": 25.0}})
    log.write_text("\n".join(json.dumps(r) for r in rows))
    fig = loss_figure(log)
    assert len(fig.axes) == 2
    fig.savefig(tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000
