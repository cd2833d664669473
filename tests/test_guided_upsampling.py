"""The image-guided upsampling baselines (guided filter, joint bilateral): same segments, readout only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emerdiff.config import EmerDiffConfig
from emerdiff.evaluation.records import METHODS, build_record, load_record, save_record
from emerdiff.method.readout import (
    bilinear_upsample,
    cluster_score_maps,
    guide_image,
    guided_filter_upsample,
    joint_bilateral_upsample,
)

SIZE = 64
GRID = (4, 4)


def two_cluster_scene(edge: int = 27):
    """Tokens of columns 0-1 in cluster 0, 2-3 in cluster 1 (token boundary at x = 32, where the
    bilinear score maps cross), but the image's colour edge, and the truth, at x = ``edge``."""
    feats = np.array([[1.0, 0.0] if i % 4 < 2 else [0.0, 1.0] for i in range(16)], dtype=np.float32)
    centroids = np.eye(2, dtype=np.float32)
    image = torch.zeros(3, SIZE, SIZE)
    image[0, :, :edge] = 0.9  # red | blue
    image[2, :, edge:] = 0.8
    truth = np.zeros((SIZE, SIZE), dtype=np.int64)
    truth[:, edge:] = 1
    return feats, centroids, image, truth


def boundary_column(labels: np.ndarray) -> float:
    """Mean over rows of the first column labelled 1."""
    return float(np.mean([np.argmax(row == 1) for row in labels]))


@pytest.mark.parametrize("readout", ["guided", "bilateral"])
def test_guided_readouts_move_the_boundary_to_the_colour_edge(readout):
    feats, cent, image, truth = two_cluster_scene()
    bilinear = bilinear_upsample(feats, cent, GRID, (SIZE, SIZE))
    if readout == "guided":
        labels = guided_filter_upsample(feats, cent, GRID, image, radius=8, eps=1e-3)
    else:
        labels = joint_bilateral_upsample(feats, cent, GRID, image, sigma_space=4.0, sigma_color=0.1)
    assert boundary_column(bilinear) == 32  # the coarse scores put the boundary between the tokens
    assert abs(boundary_column(labels) - 27) < abs(boundary_column(bilinear) - 27)
    assert (labels == truth).sum() > (bilinear == truth).sum()


@pytest.mark.parametrize("readout", ["guided", "bilateral"])
def test_no_colour_edge_no_move_on_the_far_side(readout):
    """The colour edge right of the token boundary (x = 37) moves the boundary right, not left: the
    filters follow the image, not a fixed bias."""
    feats, cent, image, truth = two_cluster_scene(edge=37)
    if readout == "guided":
        labels = guided_filter_upsample(feats, cent, GRID, image, radius=8, eps=1e-3)
    else:
        labels = joint_bilateral_upsample(feats, cent, GRID, image, sigma_space=4.0, sigma_color=0.1)
    assert 32 < boundary_column(labels) <= 37


def _box(x: torch.Tensor, r: int) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (r, r, r, r), mode="reflect"), 2 * r + 1, stride=1)


def test_constant_guide_gives_box_smoothed_bilinear():
    """With a flat image the guided filter's a = 0, b = box(p): the output is box(box(scores))."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(16, 5)).astype(np.float32)
    cent = rng.normal(size=(3, 5)).astype(np.float32)
    image = torch.full((3, SIZE, SIZE), 0.4)
    for r in (2, 5):
        expected = _box(_box(cluster_score_maps(feats, cent, GRID, (SIZE, SIZE)), r), r)[0].argmax(0).numpy()
        got = guided_filter_upsample(feats, cent, GRID, image, radius=r, eps=1e-2)
        assert (got == expected).mean() > 0.999  # float rounding may flip a near tie
    # and the smoothing is real: it is not the plain bilinear baseline
    assert not np.array_equal(guided_filter_upsample(feats, cent, GRID, image, radius=5, eps=1e-2),
                              bilinear_upsample(feats, cent, GRID, (SIZE, SIZE)))


def test_constant_guide_gives_gaussian_smoothed_bilinear():
    """With a flat image the joint bilateral filter is the spatial Gaussian alone (radius ceil(2 sigma))."""
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(16, 5)).astype(np.float32)
    cent = rng.normal(size=(3, 5)).astype(np.float32)
    image = torch.full((3, SIZE, SIZE), 0.7)
    sigma = 3.0
    r = math.ceil(2 * sigma)
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k2 = (k[:, None] * k[None, :]) / (k.sum() ** 2)
    scores = cluster_score_maps(feats, cent, GRID, (SIZE, SIZE))[0][:, None]
    smoothed = F.conv2d(F.pad(scores, (r, r, r, r), mode="reflect"), k2[None, None])[:, 0]
    got = joint_bilateral_upsample(feats, cent, GRID, image, sigma_space=sigma, sigma_color=0.1)
    assert (got == smoothed.argmax(0).numpy()).mean() > 0.999


@pytest.mark.parametrize("readout", ["guided", "bilateral"])
def test_output_holds_only_cluster_ids(readout):
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(16, 6)).astype(np.float32)
    cent = rng.normal(size=(4, 6)).astype(np.float32)
    image = rng.integers(0, 256, size=(48, 40, 3), dtype=np.uint8)  # HWC uint8, not square
    if readout == "guided":
        labels = guided_filter_upsample(feats, cent, GRID, image, radius=4, eps=1e-3)
    else:
        labels = joint_bilateral_upsample(feats, cent, GRID, image, sigma_space=2.0, sigma_color=0.2)
    assert labels.shape == (48, 40) and labels.dtype == np.int64
    assert set(np.unique(labels)) <= set(range(4))


def test_guide_image_forms_agree():
    rng = np.random.default_rng(3)
    hwc = rng.integers(0, 256, size=(8, 6, 3), dtype=np.uint8)
    chw = torch.from_numpy(hwc).permute(2, 0, 1).float() / 255
    assert torch.allclose(guide_image(hwc), guide_image(chw))
    assert guide_image(hwc).shape == (1, 3, 8, 6)
    with pytest.raises(ValueError, match="shape"):
        guide_image(np.zeros((2, 8, 6, 3)))


@pytest.mark.parametrize("kwargs", [dict(radius=0), dict(radius=2.5), dict(radius=True), dict(eps=0.0),
                                    dict(eps=-1e-3), dict(eps=float("nan"))])
def test_guided_filter_parameters_validated(kwargs):
    feats, cent, image, _ = two_cluster_scene()
    params = {"radius": 4, "eps": 1e-3, **kwargs}
    with pytest.raises(ValueError, match="radius|eps"):
        guided_filter_upsample(feats, cent, GRID, image, **params)


@pytest.mark.parametrize("kwargs", [dict(sigma_space=0.0), dict(sigma_space=-2.0), dict(sigma_color=0.0),
                                    dict(sigma_color=float("inf"))])
def test_joint_bilateral_parameters_validated(kwargs):
    feats, cent, image, _ = two_cluster_scene()
    params = {"sigma_space": 2.0, "sigma_color": 0.1, **kwargs}
    with pytest.raises(ValueError, match="sigma_space|sigma_color"):
        joint_bilateral_upsample(feats, cent, GRID, image, **params)


@pytest.mark.parametrize("field,value", [("guided_radius", 0), ("guided_radius", 65), ("guided_radius", 2.0),
                                         ("guided_eps", 0.0), ("guided_eps", 2.0),
                                         ("bilateral_sigma_space", 0.0), ("bilateral_sigma_space", 40.0),
                                         ("bilateral_sigma_color", -0.1)])
def test_config_fields_checked(field, value):
    cfg = EmerDiffConfig.for_model("reference")
    assert cfg.replace(**{field: getattr(cfg, field)}) is not None
    with pytest.raises(ValueError, match=field):
        cfg.replace(**{field: value}).check_values()


def test_defaults_are_the_validated_values():
    """docs/reference/guided_upsampling_validation.md: the grid points chosen on validation scenes 100-139."""
    for cfg in (EmerDiffConfig(), EmerDiffConfig.for_model("reference")):
        cfg.check_values()
        assert (cfg.guided_radius, cfg.guided_eps) == (24, 1e-5)
        assert (cfg.bilateral_sigma_space, cfg.bilateral_sigma_color) == (16.0, 0.01)


def _seg(guided: bool) -> dict:
    low = np.array([[0, 1], [0, 1]])
    labels = np.repeat(np.repeat(low, 4, 0), 4, 1)
    seg = dict(labels=labels, nearest_labels=labels, bilinear_labels=labels, lowres_labels=low,
               mask_embeddings=np.eye(2, dtype=np.float32), query_features=np.eye(2, dtype=np.float32)[low.ravel()])
    if guided:
        seg.update(guided_filter_labels=np.zeros_like(labels), joint_bilateral_labels=labels)
    return seg


def test_records_hold_the_guided_methods_and_old_ones_still_load(tmp_path):
    gt = np.repeat(np.repeat(np.array([[0, 1], [0, 1]]), 4, 0), 4, 1)
    new = build_record("a", _seg(True), gt, 2, methods=METHODS)
    assert new.methods == ("emerdiff", "nearest", "bilinear", "guided_filter", "joint_bilateral")
    assert new.counts["guided_filter"].tolist() == [[32, 32], [0, 0]]  # every pixel in mask 0
    assert new.counts["joint_bilateral"].tolist() == [[32, 0], [0, 32]]
    # a segmentation from before the guided baselines (or an injected segmenter without them)
    old = build_record("b", _seg(False), gt, 2, methods=METHODS)
    assert old.methods == ("emerdiff", "nearest", "bilinear")
    maps = {"emerdiff": gt, "guided_filter": np.asarray(None)}  # what the runner passes for a missing map
    save_record(tmp_path / "b.npz", old, maps)
    again = load_record(tmp_path / "b.npz", "b")
    assert again.methods == old.methods
    with np.load(tmp_path / "b.npz") as z:
        assert "map_emerdiff" in z.files and "map_guided_filter" not in z.files
    save_record(tmp_path / "a.npz", new)
    assert load_record(tmp_path / "a.npz", "a").methods == new.methods
