"""Reference-model figures on a tiny random pipeline (shapes and files, not quality)."""

from __future__ import annotations

import json

import numpy as np

from training.figures import loss_figure, sample


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


def test_loss_figure_with_learning_curve_rows(tmp_path):
    """v2's probe rows: a locality panel and an accuracy panel, one line per logged key."""
    log = tmp_path / "log.jsonl"
    rows = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(60)]
    for step in (19, 39, 59):
        rows.append({"step": step, "eval": {"world": "flat", "scenes": 8, "locality_decoded": 0.4,
                                            "locality_chance": 0.125, "acc_emerdiff": 0.8, "acc_nearest": 0.85,
                                            "acc_bilinear": 0.86}})
    log.write_text("\n".join(json.dumps(r) for r in rows))
    fig = loss_figure(log)
    assert len(fig.axes) == 3
    labels = [sorted(t.get_text() for t in ax.get_legend().get_texts()) for ax in fig.axes[1:]]
    assert labels == [["chance", "decoded"], ["bilinear", "emerdiff", "nearest"]]
    assert list(fig.axes[2].lines[0].get_xdata()) == [20, 40, 60]
