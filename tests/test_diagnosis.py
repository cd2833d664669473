"""emerdiff.studies.diagnosis: locality by stage and where labels move."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from emerdiff.evaluation.datasets import ProbeImage
from emerdiff.studies import diagnosis


def _fake(lowres: np.ndarray, size: tuple[int, int], sigma: float = 0.0):
    from emerdiff import EmerDiffConfig

    # a real config: the readout reads every Step D field from it (READOUT_FIELDS)
    ed = SimpleNamespace(config=EmerDiffConfig(blur_sigma=sigma))
    # the image: Step D's guide when readout_filter is set (unused by the default readout)
    prepared = SimpleNamespace(image_size=size, image=torch.zeros(3, *size), segments=SimpleNamespace(labels=lowres))
    return ed, prepared


def _one_hot_maps(labels: np.ndarray, k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(labels), k).permute(2, 0, 1).float()


def test_boundary_band_is_a_strip_of_the_requested_width():
    lowres = np.zeros((4, 4), dtype=np.int64)
    lowres[:, 2:] = 1  # boundary between columns 15 and 16 at 32 px
    band = diagnosis.boundary_band(lowres, (32, 32), width=3)
    cols = np.where(band.any(0))[0]
    assert cols.tolist() == list(range(13, 19))
    assert band[:, 13:19].all()
    # default width: half a token cell (8 px cells -> 4 px)
    assert np.where(diagnosis.boundary_band(lowres, (32, 32)).any(0))[0].tolist() == list(range(12, 20))
    assert not diagnosis.boundary_band(np.zeros((4, 4), dtype=np.int64), (32, 32)).any()


def test_label_moves_nothing_moves_when_maps_agree_with_nearest():
    lowres = np.array([[0, 0, 1, 1]] * 4)
    gt = np.zeros((32, 32), dtype=np.int64)
    gt[:, 14:] = 1  # the true boundary is 2 px left of the token boundary
    ed, prepared = _fake(lowres, (32, 32))
    from emerdiff.method.readout import nearest_upsample

    maps = _one_hot_maps(nearest_upsample(lowres, (32, 32)), 2)
    r = diagnosis.label_moves(ed, prepared, maps, ProbeImage("x", np.zeros((32, 32, 3), np.uint8), gt, 2))
    assert r["moved_all"] == 0 and r["fixed_all"] == 0 and r["broken_all"] == 0
    assert r["acc_emerdiff_all"] == r["acc_nearest_all"] == pytest.approx(1 - 2 * 32 / (32 * 32))
    assert r["acc_nearest_interior"] == 1.0  # the errors lie in the band around the boundary
    assert r["miou_emerdiff"] == r["miou_nearest"]


def test_label_moves_counts_pixels_fixed_and_broken():
    lowres = np.array([[0, 0, 1, 1]] * 4)
    gt = np.zeros((32, 32), dtype=np.int64)
    gt[:, 14:] = 1
    ed, prepared = _fake(lowres, (32, 32))
    perfect = diagnosis.label_moves(ed, prepared, _one_hot_maps(gt, 2),
                                    ProbeImage("x", np.zeros((32, 32, 3), np.uint8), gt, 2))
    assert perfect["acc_emerdiff_all"] == 1.0 and perfect["broken_all"] == 0
    assert perfect["fixed_band"] > 0 and perfect["moved_interior"] == 0
    # maps that put a blob of segment 1 deep inside segment 0 break interior pixels
    wrong = gt.copy()
    wrong[2:8, 2:8] = 1
    r = diagnosis.label_moves(ed, prepared, _one_hot_maps(wrong, 2),
                              ProbeImage("x", np.zeros((32, 32, 3), np.uint8), gt, 2))
    assert r["broken_interior"] > 0 and r["acc_emerdiff_interior"] < r["acc_nearest_interior"]


def test_label_moves_scale_normalised_undoes_a_dominant_map():
    lowres = np.array([[0, 0, 1, 1]] * 4)
    gt = np.zeros((32, 32), dtype=np.int64)
    gt[:, 16:] = 1
    ed, prepared = _fake(lowres, (32, 32))
    maps = _one_hot_maps(gt, 2) + 0.01
    maps[1] *= 1000  # one map louder everywhere: the raw argmax gives it every pixel
    r = diagnosis.label_moves(ed, prepared, maps, ProbeImage("x", np.zeros((32, 32, 3), np.uint8), gt, 2))
    assert r["acc_emerdiff_scale_normalised_all"] == 1.0
    assert r["broken_all"] == pytest.approx(0.5)


def test_label_moves_needs_ground_truth():
    ed, prepared = _fake(np.zeros((4, 4), dtype=np.int64), (32, 32))
    with pytest.raises(ValueError, match="ground truth"):
        diagnosis.label_moves(ed, prepared, torch.ones(1, 32, 32), ProbeImage("x", np.zeros((32, 32, 3), np.uint8)))


def test_locality_by_stage_matches_the_pipeline(tiny_model, fast_config, photo):
    from emerdiff import EmerDiff

    ed = EmerDiff(tiny_model, fast_config)
    prepared = ed.prepare(photo)
    r = diagnosis.locality_by_stage(ed, prepared)
    maps, _ = ed.perturb(prepared)
    # the decoded stage is exactly EmerDiff's difference maps
    torch.testing.assert_close(r["maps"]["decoded"], maps)
    masks = prepared.masks()
    assert r["chance"] == pytest.approx(float(masks.float().mean()))
    for s in diagnosis.STAGES:
        assert 0.0 <= r[s] <= 1.0 + 1e-6 and len(r["per_mask"][s]) == masks.shape[0]
    # latent stages live on the latent grid; decoded ones at the model resolution
    assert r["maps"]["denoised_latent"].shape[-1] == prepared.inversion.x0.shape[-1]
    assert r["maps"]["decoder_alone"].shape[-1] == fast_config.resolution


def test_lambda_zero_changes_no_stage(tiny_model, fast_config, photo):
    from emerdiff import EmerDiff

    ed = EmerDiff(tiny_model, fast_config.replace(modulation_strength=0.0))
    prepared = ed.prepare(photo)
    r = diagnosis.locality_by_stage(ed, prepared)
    # lambda = 0: every stage is (numerically) unchanged
    for s in diagnosis.STAGES:
        assert float(r["maps"][s].abs().max()) < 1e-3


def test_diagnose_rows(tiny_model, fast_config):
    from emerdiff import EmerDiff
    from emerdiff.evaluation.datasets import load_probe_images

    ed = EmerDiff(tiny_model, fast_config)
    rows = diagnosis.diagnose(ed, load_probe_images(["scene:0"]))
    assert len(rows) == 1 and rows[0]["image"] == "scene_0"
    assert {"decoded", "decoder_alone", "acc_emerdiff_band", "fixed_interior"} <= rows[0].keys()
    assert "maps" not in rows[0]


def test_settings_sweep_paper_row_is_the_pipeline(tiny_model, fast_config):
    from emerdiff import EmerDiff
    from emerdiff.evaluation.datasets import load_probe_images

    ed = EmerDiff(tiny_model, fast_config)
    items = load_probe_images(["scene:0"])
    rows = diagnosis.settings_sweep(ed, items, [{}, {"readout_steps": 1}, {"modulation_timestep": 401}])
    assert [r["setting"] for r in rows] == ["configured", "readout_steps=1", "t_m=401"]
    seg = ed.segment(items[0].image, progress=False)
    assert rows[0]["locality"] == pytest.approx(float(seg.locality.mean()), abs=1e-5)
    assert all(0 <= r["acc_emerdiff_all"] <= 1 for r in rows)


def test_default_settings_lie_on_the_schedule(tiny_model, fast_config):
    from emerdiff import EmerDiff

    ed = EmerDiff(tiny_model, fast_config)  # 10 steps, t_m = 201
    settings = diagnosis.default_settings(ed)
    assert settings[0] == {} and {"readout_steps": 1} in settings
    assert [s["modulation_timestep"] for s in settings if "modulation_timestep" in s] == [101, 301]
    for s in settings:  # every setting validates against the model
        fast_config.replace(**s).validate(tiny_model)
    paper = EmerDiff(tiny_model, fast_config.replace(num_inference_steps=50, modulation_timestep=281))
    assert [s["modulation_timestep"] for s in diagnosis.default_settings(paper) if "modulation_timestep" in s] == [81, 481]


def test_majority_correct_maps_each_segment_to_its_majority_class():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    pred = np.array([[5, 5, 5, 2], [5, 5, 2, 2]])  # segment 5 is mostly class 0, segment 2 class 1
    ok = diagnosis.majority_correct(pred, gt)
    assert ok.tolist() == [[True, True, False, True], [True, True, True, True]]
    assert diagnosis.majority_mapping(pred, gt) == {2: 1, 5: 0}
    gt_void = gt.copy()
    gt_void[0, 2] = 255  # void pixels neither vote nor count as correct
    assert diagnosis.majority_correct(pred, gt_void)[0, 2] == False  # noqa: E712


def test_training_probe_reports_locality_and_accuracy_on_validation_scenes(tiny_dir):
    from training.heldout import VALIDATION_START, locality_probe

    assert VALIDATION_START >= 100  # the 100 test scenes are 0-99
    r = locality_probe(tiny_dir, step=0, n=1, num_clusters=3)
    assert r["chance_locality"] == pytest.approx(1 / 3)
    assert 0 <= r["locality"] <= 1 and 0 <= r["acc_emerdiff"] <= 1 and 0 <= r["acc_nearest"] <= 1
    assert 0 <= r["miou_emerdiff"] <= 100
