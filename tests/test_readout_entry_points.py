"""Every setting that shapes the labels reaches every entry point alike (issue 24, "One readout").

For each Step D field (``READOUT_FIELDS``) and each Step C field that shapes the difference maps
(``MODULATION_FIELDS`` less the execution-only batch sizes), the config is changed from the test
default to another valid value. The change must move ``EmerDiff.segment``'s labels (else the test
could not see a dropped field), and the inspector's live labels, the probes', the diagnosis' and the
sweep's labels must all equal ``segment``'s with that config. An entry point that drops a field
gives the default's labels, which differ, so the test fails.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # the inspector draws off screen

import numpy as np
import pytest

from emerdiff import EmerDiff, EmerDiffConfig
from emerdiff.evaluation.datasets import ProbeImage
from emerdiff.method.pipeline import MODULATION_FIELDS
from emerdiff.method.readout import READOUT_FIELDS
from emerdiff.sd.images import resize_labels
from emerdiff.studies import diagnosis, probes
from emerdiff.studies import sweep as sweep_module

EXECUTION_ONLY = ("max_batch", "decode_batch")  # how the work is batched, never what it computes
# The tiny model's config (a 4x4 token grid, 10 steps): every entry point runs in about a second.
BASE = EmerDiffConfig(resolution=128, num_clusters=4, num_inference_steps=10, modulation_timestep=201,
                      feature_timestep=1, kmeans_n_init=2, max_batch=9, blur_sigma=1.0)
# Another valid value per field, each far enough from BASE's to move the labels of the tiny model.
CHANGES = {
    "blur_sigma": 3.0,
    "assign_radius": 0,
    "readout_filter": "guided_filter",  # with the default guided_radius 24 / eps 1e-5 (the baseline's)
    "modulation_timestep": 401,
    "modulation_strength": 100.0,  # not -10: the pair map ||I- - I+|| is the same for -lambda
    "attention_injection": False,
    "readout_steps": 1,
    "modulation_layer": "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
}
FIELDS = (*READOUT_FIELDS, *(f for f in MODULATION_FIELDS if f not in EXECUTION_ONLY))


def test_every_label_shaping_field_has_a_change():
    """A new Step C / D field must be added here, or this test would silently skip it."""
    assert sorted(CHANGES) == sorted(FIELDS)
    for name, value in CHANGES.items():
        assert getattr(BASE, name) != value, name
        BASE.replace(**{name: value}).check_values()


@pytest.fixture(scope="module")
def image():
    """A 128 px photo with a two-class ground truth (the diagnosis scores labels only with one)."""
    from skimage import data

    photo = data.astronaut()[::4, ::4].copy()
    gt = np.zeros(photo.shape[:2], dtype=np.int64)
    gt[:, photo.shape[1] // 2:] = 1
    return ProbeImage("astronaut", photo, gt, 2)


@pytest.fixture(scope="module")
def default_labels(tiny_model, image):
    return EmerDiff(tiny_model, BASE).segment(image.image, progress=False).labels


def _spy(monkeypatch, module, name, pick=lambda out: out):
    """Replace ``module.name`` by a wrapper that records (a part of) each result."""
    seen = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(np.array(pick(out)))
        return out

    monkeypatch.setattr(module, name, wrapper)
    return seen


def entry_point_labels(model, config: EmerDiffConfig, item: ProbeImage, monkeypatch) -> dict[str, np.ndarray]:
    """The (H, W) labels each entry point gives for ``item`` with ``config``, at the image's size."""
    from emerdiff.notebook.inspector import Inspector

    size = item.image.shape[:2]
    ed = EmerDiff(model, config)
    out = {}
    ins = Inspector(ed, {"image": item.image}, timesteps=[config.modulation_timestep])
    out["inspector"] = resize_labels(ins.result()[1], size)

    # the probes (notebooks 01-03): a modulation-timestep probe at the config's own t_m
    probe_seen = _spy(monkeypatch, probes, "readout", pick=lambda r: r["labels"])
    probes.modulation_timestep_sweep(ed, [item], timesteps=[config.modulation_timestep], seeds=(config.seed,))
    out["probes"] = probe_seen[-1]

    # the diagnosis (notebook 06): label_moves reads out the decoded maps (its first readout; the second
    # is the peak-normalised diagnostic)
    diag_seen = _spy(monkeypatch, diagnosis, "readout_labels")
    diagnosis.diagnose(ed, [item])
    out["diagnosis"] = diag_seen[0]

    # the sweep over every mask, at the config's own setting: its labels are mask ids at the model resolution
    sweep_seen = _spy(monkeypatch, sweep_module, "readout_labels")
    sweep_module.sweep(item.image, ed=ed, progress=False)
    out["sweep"] = resize_labels(sweep_seen[-1], size)
    return out


@pytest.mark.parametrize("field", FIELDS)
def test_a_change_reaches_every_entry_point_alike(field, tiny_model, image, default_labels, monkeypatch):
    config = BASE.replace(**{field: CHANGES[field]})
    expected = EmerDiff(tiny_model, config).segment(image.image, progress=False).labels
    # else a dropped field would go unseen: the change must move segment's labels
    assert (expected != default_labels).mean() > 0.01, f"{field}={CHANGES[field]!r} does not move the labels"
    got = entry_point_labels(tiny_model, config, image, monkeypatch)
    for name, labels in got.items():
        assert labels.shape == expected.shape, name
        assert np.array_equal(labels, expected), (
            f"{name}'s labels differ from segment's with {field}={CHANGES[field]!r} on "
            f"{(labels != expected).mean():.1%} of the pixels (same as the default's on "
            f"{(labels == default_labels).mean():.1%}): it does not read out as segment does")


def test_the_default_config_agrees_everywhere(tiny_model, image, default_labels, monkeypatch):
    got = entry_point_labels(tiny_model, BASE, image, monkeypatch)
    for name, labels in got.items():
        assert np.array_equal(labels, default_labels), name
