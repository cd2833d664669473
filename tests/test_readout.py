"""Step D: readout_labels (the one readout every caller uses) and its argmax kernel, with and without
the assignment radius (config.assign_radius). That every entry point reads out alike is
tests/test_readout_entry_points.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emerdiff import EmerDiff, EmerDiffConfig
from emerdiff.method.readout import (
    READOUT_FIELDS,
    assign_labels,
    gaussian_blur,
    nearby_masks,
    nearest_upsample,
    readout_labels,
)


def _maps_and_grid(seed: int = 0, k: int = 5, grid: int = 6, res: int = 48):
    rng = np.random.default_rng(seed)
    low = rng.integers(0, k, (grid, grid))
    low[:k, 0] = np.arange(k)  # every mask present
    maps = torch.as_tensor(rng.random((k, res, res)), dtype=torch.float32)
    return maps, low


def test_no_radius_is_the_papers_argmax_and_a_wide_radius_changes_nothing():
    maps, low = _maps_and_grid()
    plain = gaussian_blur(maps, 1.0).argmax(0)
    assert torch.equal(assign_labels(maps, 1.0), plain)
    assert torch.equal(assign_labels(maps, 1.0, low, radius=6), plain)  # the window covers the whole grid


def test_radius_zero_is_nearest_upsampling_whatever_the_maps():
    for seed in range(3):
        maps, low = _maps_and_grid(seed)
        got = assign_labels(maps, 1.0, low, radius=0).numpy()
        assert np.array_equal(got, nearest_upsample(low, (48, 48)))


def test_radius_one_never_picks_a_mask_absent_from_the_3x3_tokens():
    maps, low = _maps_and_grid(seed=4)
    labels = assign_labels(maps, 0.0, low, radius=1).numpy()
    cell = 48 // 6
    for y in range(0, 48, 3):
        for x in range(0, 48, 3):
            ty, tx = y // cell, x // cell
            window = low[max(ty - 1, 0):ty + 2, max(tx - 1, 0):tx + 2]
            assert labels[y, x] in window
    # and inside the allowed set it is still the argmax of the maps
    allowed = nearby_masks(low, 5, 1, (48, 48)).numpy()
    best = np.where(allowed, maps.numpy(), -np.inf).argmax(0)
    assert np.array_equal(labels, best)
    # a mask with the largest response everywhere still only wins near its own tokens
    boosted = maps.clone()
    boosted[3] += 10.0
    won = assign_labels(boosted, 0.0, low, radius=1).numpy() == 3
    assert won.any() and np.array_equal(won, allowed[3])


def test_assign_radius_needs_the_token_grid_and_a_valid_value():
    maps, _ = _maps_and_grid()
    with pytest.raises(ValueError, match="lowres_labels"):
        assign_labels(maps, 1.0, radius=1)
    for bad in (-1, 1.5, "1"):
        with pytest.raises(ValueError, match="assign_radius"):
            EmerDiffConfig(assign_radius=bad).check_values()
    EmerDiffConfig(assign_radius=2).check_values()


def test_segment_with_radius_zero_gives_nearest_upsampling(tiny_model, fast_config, photo):
    """Through the pipeline: radius 0 leaves each pixel its own token's mask; None is unchanged."""
    free = EmerDiff(tiny_model, fast_config).segment(photo, progress=False)
    zero = EmerDiff(tiny_model, fast_config.replace(assign_radius=0)).segment(photo, progress=False)
    assert np.array_equal(zero.lowres_labels, free.lowres_labels)
    assert np.array_equal(zero.labels, zero.nearest_labels)
    assert zero.config["assign_radius"] == 0 and free.config["assign_radius"] is None


def test_readout_labels_reads_every_step_d_field_from_the_config():
    maps, low = _maps_and_grid(seed=1)
    base = EmerDiffConfig(resolution=64, blur_sigma=1.0)
    assert set(READOUT_FIELDS) <= set(base.to_dict())  # each a real config field
    plain = readout_labels(maps, low, base)
    assert plain.dtype == np.int64 and plain.shape == (48, 48)
    assert np.array_equal(plain, gaussian_blur(maps, 1.0).argmax(0).numpy())  # the paper's readout by default
    # each field, changed alone, moves the labels
    for name, value in (("blur_sigma", 4.0), ("assign_radius", 0)):
        assert not np.array_equal(readout_labels(maps, low, base.replace(**{name: value})), plain), name
    assert np.array_equal(readout_labels(maps, low, base.replace(assign_radius=0)), nearest_upsample(low, (48, 48)))
    # size: the model-resolution labels resized, nothing else
    big = readout_labels(maps, low, base, size=(96, 96))
    assert big.shape == (96, 96) and np.array_equal(big[::2, ::2], plain)  # 2x: each label a 2x2 block


def test_readout_labels_over_chosen_masks_gives_their_ids():
    """Maps of some segments only (a sweep over chosen masks): labels are those segments' ids, and
    with a radius a pixel with none of them nearby lets them all compete instead of failing."""
    maps, low = _maps_and_grid(seed=2)
    ids = [1, 3]
    sub = maps[ids]
    cfg = EmerDiffConfig(resolution=64, blur_sigma=0.0)
    free = readout_labels(sub, low, cfg, mask_ids=ids)
    assert np.array_equal(free, np.asarray(ids)[sub.argmax(0).numpy()])
    near = readout_labels(sub, low, cfg.replace(assign_radius=0), mask_ids=ids)
    tokens = nearest_upsample(low, (48, 48))
    swept = np.isin(tokens, ids)
    assert np.array_equal(near[swept], tokens[swept])  # radius 0: a swept mask's own pixels stay its own
    assert np.array_equal(near[~swept], free[~swept])  # elsewhere no swept mask is near: all compete
    with pytest.raises(ValueError, match="one id per map"):
        readout_labels(sub, low, cfg, mask_ids=[1])


def test_readout_labels_refuses_what_would_be_silently_wrong():
    maps, low = _maps_and_grid()
    with pytest.raises(TypeError, match="assign_radius"):  # a stand-in config missing a Step D field
        from types import SimpleNamespace

        readout_labels(maps, low, SimpleNamespace(blur_sigma=1.0))
    with pytest.raises(ValueError, match="mask_ids"):  # fewer maps than segments, not said which
        readout_labels(maps[:3], low, EmerDiffConfig())


# ------------------------------------------------------------ the image-guided readout (readout_filter)
FILTERS = ("guided_filter", "joint_bilateral")


def _edge_example(res: int = 48, edge: int = 20):
    """Two blurry difference maps that cross (tie) at x = 16, a token boundary, and a guide image with a
    sharp colour edge at x = ``edge``: the response leaked 4 px past the object's colour edge."""
    x = np.arange(res)
    m0 = np.clip((24 - x) / 16, 0, 1)  # 1 left, 0 right, 0.5 at x = 16
    maps = torch.tensor(np.stack([np.tile(m0, (res, 1)), np.tile(1 - m0, (res, 1))]), dtype=torch.float32)
    guide = np.zeros((res, res, 3), np.uint8)
    guide[:, :edge] = (200, 40, 40)
    guide[:, edge:] = (40, 40, 200)
    low = np.zeros((6, 6), np.int64)
    low[:, 2:] = 1  # 8 px tokens: segment 1 starts at x = 16
    return maps, low, guide


@pytest.mark.parametrize("name", FILTERS)
def test_guided_readout_puts_the_label_boundary_on_the_colour_edge(name):
    maps, low, guide = _edge_example()
    on_edge = np.zeros((48, 48), np.int64)
    on_edge[:, 20:] = 1
    cfg = EmerDiffConfig(blur_sigma=1.0)  # the baselines' default filter parameters
    plain = readout_labels(maps, low, cfg, guide=guide)
    assert (plain != on_edge).any(axis=1).all()  # the paper's readout: the boundary where the maps cross
    assert np.array_equal(plain, readout_labels(maps, low, cfg))  # "none" ignores the guide
    guided = readout_labels(maps, low, cfg.replace(readout_filter=name), guide=guide)
    assert np.array_equal(guided, on_edge)  # every row's boundary on the colour edge
    # the same with an assignment radius, and for scaled maps (both filters are linear in the maps)
    assert np.array_equal(readout_labels(maps, low, cfg.replace(readout_filter=name, assign_radius=1), guide=guide),
                          on_edge)
    assert np.array_equal(readout_labels(maps * 7, low, cfg.replace(readout_filter=name), guide=guide), on_edge)
    # a guide at another size (the original photo) is resized to the maps' as the model input is: the
    # antialiased resize blends the edge's two pixels, so the boundary lands within a pixel of the edge
    big = np.repeat(np.repeat(guide, 2, axis=0), 2, axis=1)
    from_big = readout_labels(maps, low, cfg.replace(readout_filter=name), guide=big)
    assert np.array_equal(np.delete(from_big, [19, 20], axis=1), np.delete(on_edge, [19, 20], axis=1))
    # the colour edge moved: the labels follow it, not the maps
    maps, low, guide = _edge_example(edge=12)
    assert (readout_labels(maps, low, cfg.replace(readout_filter=name), guide=guide)[:, :12] == 0).all()
    assert (readout_labels(maps, low, cfg.replace(readout_filter=name), guide=guide)[:, 12:] == 1).all()


def test_guided_readout_reads_the_baselines_parameters():
    maps, low, guide = _edge_example()
    cfg = EmerDiffConfig(blur_sigma=1.0)
    # a 1 px box with a large eps barely moves the maps: the boundary stays where they cross
    weak = readout_labels(maps, low, cfg.replace(readout_filter="guided_filter", guided_radius=1, guided_eps=1.0),
                          guide=guide)
    assert np.array_equal(weak, readout_labels(maps, low, cfg))
    weak = readout_labels(maps, low, cfg.replace(readout_filter="joint_bilateral", bilateral_sigma_space=0.5,
                                                 bilateral_sigma_color=2.0), guide=guide)
    assert np.array_equal(weak, readout_labels(maps, low, cfg))


@pytest.mark.parametrize("name", FILTERS)
def test_guided_readout_without_a_guide_says_how_to_pass_one(name):
    maps, low, _ = _edge_example()
    with pytest.raises(ValueError, match=rf"readout_filter='{name}'.*guide=.*prepared.image"):
        readout_labels(maps, low, EmerDiffConfig(readout_filter=name))


def test_an_unknown_readout_filter_is_refused_listing_the_valid_ones():
    with pytest.raises(ValueError, match=r"readout_filter must be one of \['none', 'guided_filter', 'joint_bilateral'\]"):
        EmerDiffConfig(readout_filter="bilateral").check_values()
    with pytest.raises(ValueError, match="readout_filter must be a string"):
        EmerDiffConfig(readout_filter=None).check_values()
    maps, low, guide = _edge_example()  # a config never checked is refused by the readout too
    with pytest.raises(ValueError, match="readout_filter must be one of"):
        readout_labels(maps, low, EmerDiffConfig(readout_filter="guided"), guide=guide)
    for name in ("none", *FILTERS):
        EmerDiffConfig(readout_filter=name).check_values()


def test_readout_filter_can_be_set_from_the_command_line():
    from emerdiff.cli.options import parse_sets

    changes = parse_sets(["readout_filter=guided_filter"])
    assert changes == {"readout_filter": "guided_filter"}
    cfg = EmerDiffConfig.for_model("tiny", **changes)
    cfg.check_values()
    assert cfg.readout_filter == "guided_filter"
    with pytest.raises(ValueError, match="readout_filter must be one of"):
        EmerDiffConfig.for_model("tiny", **parse_sets(["readout_filter=box"])).check_values()
