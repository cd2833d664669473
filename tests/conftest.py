"""Shared fixtures: one tiny random SD pipeline per session, loaded through the real path."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from emerdiff.sdconfig import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from emerdiff import load_pipeline

    return load_pipeline(tiny_dir, device="cpu")


@pytest.fixture
def fast_config():
    """A config that runs in about a second on the tiny model (4x4 token grid)."""
    from emerdiff import EmerDiffConfig

    return EmerDiffConfig(resolution=128, num_clusters=4, num_inference_steps=10,
                          modulation_timestep=201, feature_timestep=1, kmeans_n_init=2,
                          max_batch=9, blur_sigma=1.0)


@pytest.fixture
def photo():
    """A real photo that ships with scikit-image (512x512 RGB uint8)."""
    from skimage import data

    return data.astronaut()


def pytest_configure(config):
    torch.manual_seed(0)
