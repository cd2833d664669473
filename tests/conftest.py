"""Shared fixtures: one tiny random SD pipeline per session, loaded through the real path.

Every test starts from the same process state, whatever ran before it: `make test` spreads the
tests over two pytest-xdist workers, so which tests share a process, and in which order, changes
from run to run.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

# One torch thread per test process. The tiny models gain nothing from a second thread, and on a
# 2-core machine that is busy (another process, or the other xdist worker) two threads that wait
# for each other made single tests up to 10x slower; `make test` gets its parallelism from two
# worker processes instead.
TORCH_THREADS = 1


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from emerdiff.sd.components import build_tiny_pipeline

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
    torch.set_num_threads(TORCH_THREADS)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture of the test is set up: global seeds 0 and one torch thread again (a test
    may have changed either), so no test or fixture depends on the tests that ran before it."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    torch.set_num_threads(TORCH_THREADS)
