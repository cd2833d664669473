"""The shipped reference model: it denoises held-out scenes and its EmerDiff readout localises.

Skipped only while no weights are shipped (emerdiff/assets/weights/).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emerdiff.assets import WEIGHTS

pytestmark = pytest.mark.skipif(not (WEIGHTS / "model_index.json").exists(),
                                reason="no reference weights shipped yet")


@pytest.fixture(scope="module")
def reference():
    from emerdiff import load_pipeline

    return load_pipeline("reference", device="cpu")


@pytest.fixture(scope="module")
def scene():
    from emerdiff.assets import model_world
    from emerdiff.assets.scenes import heldout_scene_seeds, make_scene

    return make_scene(heldout_scene_seeds(1, start=500)[0], 128, world=model_world("reference"))


def test_predicts_the_noise_of_held_out_scenes(reference, scene):
    from emerdiff.sd.images import load_image, to_model_input

    x = to_model_input(load_image(scene.image), 128)
    with torch.no_grad():
        z = reference.vae.encode(x).latent_dist.mean * reference.vae.config.scaling_factor
    g = torch.Generator().manual_seed(0)
    errors = []
    for t in (101, 281, 501):
        eps = torch.randn(z.shape, generator=g)
        a = float(reference.scheduler.alphas_cumprod[t])
        with torch.no_grad():
            pred = reference.unet(a**0.5 * z + (1 - a) ** 0.5 * eps, torch.tensor([t]),
                                  reference.empty_embedding).sample
        errors.append(float((pred - eps).pow(2).mean()))
    assert max(errors) < 0.5, errors  # predicting zero would score ~1


def test_readout_localises_on_a_held_out_scene(reference, scene):
    """A perturbation inside a mask changes pixels there more than elsewhere."""
    from emerdiff import EmerDiff, EmerDiffConfig

    k = 8
    cfg = EmerDiffConfig(resolution=128, num_clusters=k, blur_sigma=1.0, kmeans_n_init=2)
    seg = EmerDiff(reference, cfg).segment(scene.image, progress=False)
    assert seg.lowres_labels.shape == (16, 16)
    area = np.bincount(seg.lowres_labels.ravel(), minlength=seg.num_segments) / 256
    # energy share inside each mask vs the share a mask-blind readout would give (its area)
    assert float(np.mean(seg.locality)) > 2 * float(np.mean(area))
