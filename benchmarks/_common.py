"""Shared pieces of the benchmark scripts: models, memory probes, the measured runs.

Everything here is built from emerdiff's public pieces (``EmerDiff.prepare`` /
``modulate`` / ``perturb``, ``difference_maps``, ``EmerDiff.readout``),
so what is timed is the package's own code path, not a re-implementation.
The labels are Step D as ``EmerDiff.segment`` runs it (every field of
``emerdiff.method.readout.READOUT_FIELDS``, the assignment radius included).

Two runners produce a :class:`Run` each:

* :func:`run_batched` -- our pipeline: all (mask, sign) runs in batches of
  ``max_batch`` with the unmodulated run as element 0 of every chunk, inversion
  only over t <= t_m with the Step A features taken from the inversion's own
  call at t_f = 1 (with ``readout_steps`` set, ``EmerDiff.prepare`` runs no
  inversion at all: x_t are sampled and one feature call remains), difference
  maps decoded ``decode_batch`` at a time.
* :func:`run_per_mask_loop` -- what a straightforward implementation does:
  for every mask one ``EmerDiff.modulate`` call with ``max_batch=3`` (the
  unmodulated recomputed alongside +lambda and -lambda, so attention injection
  still works), then one VAE decode of that mask's two images. Its
  preparation is either the same as ours (``prepare="shared"``, which isolates
  the batching) or a full 50-step inversion plus a separate feature call
  (``prepare="full"``, the textbook recipe).
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from emerdiff import EmerDiffConfig
from emerdiff.method.modulation import difference_maps
from emerdiff.method.pipeline import EmerDiff, StageClock
from emerdiff.sd.loading import SDPipeline, load_pipeline, resolve_device, resolve_dtype

RANDOM_MODELS = {"sd15-random": "sd15", "sd21-random": "sd21-base"}
# Stages shown in the tables, in pipeline order. "features" includes the k-means.
STAGES = ("encode", "inversion", "features", "modulation", "decode", "assign")


# ------------------------------------------------------------------ models
def random_sd_model(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> SDPipeline:
    """Full-size SD 1.5 / 2.1-base UNet + SD VAE with random weights, random text embedding.

    Speed does not depend on the weight values, so this is the architecture's
    cost without a download. No tokenizer or text encoder: the empty-prompt
    embedding is a random (1, 77, cross_attention_dim) tensor.
    """
    from builders import random_unet
    from diffusers import AutoencoderKL, DDIMScheduler

    from emerdiff.sd.components import SD_SCHEDULER_CONFIG, SD_VAE_CONFIG

    unet = random_unet(RANDOM_MODELS[name], seed=seed).to(device, dtype)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**SD_VAE_CONFIG).eval().requires_grad_(False).to(device, dtype)
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    gen = torch.Generator("cpu").manual_seed(seed + 2)
    emb = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen).to(device, dtype)
    return SDPipeline(unet, vae, scheduler, None, None, emb, name)


def build_model(name: str, device: str | None = None, dtype: str | None = None) -> SDPipeline:
    """'tiny', 'reference', 'sd15-random', 'sd21-random' or a diffusers folder / hub id."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if name in RANDOM_MODELS:
        return random_sd_model(name, dev, dt)
    return load_pipeline(name, device=dev, dtype=dt)


# ------------------------------------------------------------------ memory
def rss_bytes() -> int:
    """Current resident set size of this process (psutil; /proc fallback)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil ships with the dev extras
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryProbe:
    """Peak memory of a block: CPU RSS sampled by a thread, CUDA max allocated.

    ``ru_maxrss`` is a lifetime peak that cannot be reset, so the per-row CPU
    peak comes from polling RSS every ``interval`` seconds (a spike shorter
    than that can be missed; the tensors here live for whole UNet calls).
    ``rss_peak_delta`` is the peak above the RSS at entry, i.e. what the row
    itself allocated on top of the loaded model.
    """

    def __init__(self, device: torch.device, interval: float = 0.02) -> None:
        self.device = device
        self.interval = interval
        self.rss_start = self.rss_peak = 0
        self.cuda_peak: int | None = None
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.rss_peak = max(self.rss_peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryProbe:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_start = self.rss_peak = rss_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.rss_peak = max(self.rss_peak, rss_bytes())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_peak = int(torch.cuda.max_memory_allocated(self.device))

    @property
    def rss_peak_delta(self) -> int:
        return self.rss_peak - self.rss_start


# ------------------------------------------------------------------ timing
def stage_view(timings: dict[str, float]) -> dict[str, float]:
    """Pipeline timings folded into :data:`STAGES` (k-means counted as features)."""
    out = {s: float(timings.get(s, 0.0)) for s in STAGES}
    out["features"] += float(timings.get("kmeans", 0.0))
    return out


# ------------------------------------------------------------------ results
@dataclass
class Run:
    """One measured configuration."""

    method: str
    timings: dict[str, float]  # seconds per stage (STAGES) + "total"
    unet_calls: dict[str, int]
    unet_samples: dict[str, int]
    images_decoded: int
    num_masks: int
    labels: np.ndarray
    rss_peak: int
    rss_peak_delta: int
    cuda_peak: int | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_calls(self) -> int:
        return int(sum(self.unet_calls.values()))

    @property
    def total_samples(self) -> int:
        return int(sum(self.unet_samples.values()))


def _assign(pipe: EmerDiff, maps: torch.Tensor, prepared: Any, clock: StageClock) -> np.ndarray:
    """Step D through ``EmerDiff.readout`` (what ``segment`` runs), timed as the 'assign' stage."""
    with clock.stage("assign"):
        return pipe.readout(maps, prepared, prepared.image_size)


def run_batched(pipe: EmerDiff, image: Any, attention: str = "sdpa") -> Run:
    """Our pipeline, stage by stage as ``EmerDiff.segment`` runs it (the same labels: the same
    preparation, maps and ``EmerDiff.readout``).

    attention: "sdpa" (the fused kernel, as shipped) or "explicit" (hand-computed
    probabilities: the non-fused comparison). Preparation is ``pipe.prepare``, so
    with ``readout_steps`` set there is no inversion (one feature call instead).
    """
    cfg = pipe.config
    device = pipe.model.device
    with MemoryProbe(device) as mem:
        t0 = time.perf_counter()
        prepared = pipe.prepare(image)
        counter = prepared.counter
        clock = StageClock(device)
        clock.timings.update(prepared.timings)
        if attention == "sdpa":
            maps, _ = pipe.perturb(prepared, counter=counter, clock=clock)  # type: ignore[arg-type]
        elif attention == "explicit":
            with clock.stage("modulation"):
                latents, _ = pipe.modulate(prepared, explicit_probabilities=True, counter=counter)
            with clock.stage("decode"):
                maps, _ = difference_maps(pipe.model, latents, cfg.decode_batch)
        else:
            raise ValueError(f"attention must be 'sdpa' or 'explicit', got {attention!r}")
        labels = _assign(pipe, maps, prepared, clock)
        total = time.perf_counter() - t0
    timings = stage_view(clock.timings)
    timings["total"] = total
    k = prepared.segments.num_segments
    return Run("batched", timings, dict(counter.calls), dict(counter.samples), 2 * k, k, labels,
               mem.rss_peak, mem.rss_peak_delta, mem.cuda_peak)


def run_per_mask_loop(pipe: EmerDiff, image: Any, prepare: str = "full") -> Run:
    """The straightforward implementation: one mask at a time, batch [unmodulated, +M_i, -M_i].

    prepare: "full" -- edit-friendly inversion over the whole schedule (50
    calls at the defaults) and a separate UNet call for the Step A features,
    also with ``readout_steps`` set (the textbook recipe inverts regardless);
    "shared" -- our preparation, ``pipe.prepare`` (inversion t <= t_m with the
    features from its t_f call; with ``readout_steps``: no inversion, one
    feature call), so the ratio shows the batching alone.
    The modulated stage calls ``EmerDiff.modulate`` once per mask with
    ``max_batch=3`` (the unmodulated run is recomputed alongside every pair, which is
    what attention injection needs when masks are processed one by one), and
    decodes that mask's two images as one batch of 2.
    """
    cfg = pipe.config
    device = pipe.model.device
    with MemoryProbe(device) as mem:
        t0 = time.perf_counter()
        if prepare == "full":  # readout_steps=None: EmerDiff.prepare skips the inversion in readout mode
            textbook = EmerDiff(pipe.model, cfg.replace(readout_steps=None))
            prepared = textbook.prepare(image, t_stop=pipe.schedule.timesteps[0])
        elif prepare == "shared":
            prepared = pipe.prepare(image)
        else:
            raise ValueError(f"prepare must be 'full' or 'shared', got {prepare!r}")
        counter = prepared.counter
        clock = StageClock(device)
        clock.timings.update(prepared.timings)
        if prepare == "full":  # the textbook recipe runs the feature extraction as its own call
            with clock.stage("features"):
                pipe.extract_queries(prepared.inversion, [cfg.query_layer], cfg.feature_timestep,
                                     counter=counter)
        masks = prepared.masks()
        maps = []
        for i in range(masks.shape[0]):
            with clock.stage("modulation"):
                # max_batch=3: the unmodulated run is recomputed alongside every +/- pair
                latents, _ = pipe.modulate(prepared, [i], max_batch=3, counter=counter)
            with clock.stage("decode"):
                maps.append(difference_maps(pipe.model, latents, decode_batch=2)[0])
        labels = _assign(pipe, torch.cat(maps), prepared, clock)
        total = time.perf_counter() - t0
    timings = stage_view(clock.timings)
    timings["total"] = total
    k = int(masks.shape[0])
    return Run(f"per-mask loop ({prepare} prep)", timings, dict(counter.calls), dict(counter.samples),
               2 * k, k, labels, mem.rss_peak, mem.rss_peak_delta, mem.cuda_peak)


def pixel_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels with the same label (labels of the same k-means segments, so no matching)."""
    return float((np.asarray(a) == np.asarray(b)).mean())


# ------------------------------------------------------------------ machine
def machine_info(device: torch.device) -> dict[str, Any]:
    """What ran the numbers: CPU model, cores, load, torch; GPU name on CUDA."""
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info: dict[str, Any] = dict(
        cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
        load_avg=[round(x, 2) for x in os.getloadavg()], torch=torch.__version__,
        python=platform.python_version(), device=str(device),
        ru_maxrss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def config_for(model: SDPipeline, base: EmerDiffConfig, **changes: Any) -> EmerDiffConfig:
    """A validated copy of ``base`` with changes (validation fails early with valid choices)."""
    cfg = base.replace(**changes)
    cfg.validate(model)
    return cfg
