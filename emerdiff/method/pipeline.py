"""EmerDiff end to end: image -> latent -> low-res segments -> inversion ->
batched modulated denoising -> difference maps -> full-resolution labels.

    model = load_pipeline("tiny")                # or a SD folder / hub id
    seg = EmerDiff(model, EmerDiffConfig(num_clusters=8, resolution=256)).segment("cat.png")
    seg.labels        # (H, W) labels at the input's size
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from emerdiff.config import EmerDiffConfig
from emerdiff.method.attention import AttentionController, controlled_attention
from emerdiff.method.diffseg import DiffSegResult, run_diffseg
from emerdiff.method.features import LowResSegments, cluster_features, segments_from_labels
from emerdiff.method.inversion import Inversion, Schedule, invert, sample_noisy_latents
from emerdiff.method.measures import cheap_measures, symmetry
from emerdiff.method.modulation import (
    CallCounter,
    decode,
    difference_maps,
    encode,
    expected_unet_calls,
    modulated_latents,
    unet_forward,
)
from emerdiff.method.readout import (
    bilinear_upsample,
    check_difference_maps,
    guided_filter_upsample,
    joint_bilateral_upsample,
    locality,
    model_guide,
    nearest_upsample,
    readout_labels,
)
from emerdiff.sd.images import ImageInput, load_image, resize_labels
from emerdiff.sd.loading import SDPipeline, feature_resolution


@dataclass
class Segmentation:
    """Result of :meth:`EmerDiff.segment`. Label maps are numpy int arrays.

    Attributes:
        labels: (H, W) EmerDiff labels at the original image size.
        lowres_labels: (h, w) k-means labels on the query layer's token grid.
        nearest_labels, bilinear_labels: (H, W) upsampling baselines of the same segments.
        guided_filter_labels, joint_bilateral_labels: (H, W) image-guided upsampling baselines of the same
            segments: the bilinear baseline's score maps filtered guided by the image at ``resolution``
            (:func:`emerdiff.method.readout.guided_filter_upsample`, ``joint_bilateral_upsample``), then
            resized (nearest) to the image's size; None in results made before they existed.
        mask_embeddings: (K', C) mean query vector inside each low-res mask.
        query_features: (h*w, C) the clustered query vectors (unit length when
            ``feature_normalization="l2"``; embeddings and centroids are in the same space).
        locality: (K',) share of each difference map's energy inside its mask.
        symmetry: (K',) +/- symmetry of each mask's responses around the unmodulated run
            (:func:`emerdiff.method.measures.symmetry`: 1 antisymmetric, 0 chance, -1 even; NaN if
            neither sign changed anything).
        faithfulness: mean locality, token agreement and +/- symmetry with their chance levels
            (:func:`emerdiff.method.measures.cheap_measures`; docs/METHOD.md, "Faithfulness measures").
        difference_maps: (K', R, R) maps at the model resolution, if requested.
        image_size: (H, W) of the input.
        timings: seconds per stage; unet_calls / unet_samples: per stage.
        config: the config used (dict); model: what was loaded.
    """

    labels: np.ndarray
    lowres_labels: np.ndarray
    nearest_labels: np.ndarray
    bilinear_labels: np.ndarray
    mask_embeddings: np.ndarray
    query_features: np.ndarray
    centroids: np.ndarray
    locality: np.ndarray
    image_size: tuple[int, int]
    timings: dict[str, float]
    unet_calls: dict[str, int]
    unet_samples: dict[str, int]
    config: dict[str, Any]
    model: str
    difference_maps: np.ndarray | None = None
    images: np.ndarray | None = None  # (2K', 3, R, R) I+ / I- in [0, 1], if requested
    # other methods' (H, W) labels in the same mask ids, e.g. "diffseg" (DiffSeg alone) when lowres="diffseg"
    extra_labels: dict[str, np.ndarray] = field(default_factory=dict)
    faithfulness: dict[str, float] = field(default_factory=dict)
    symmetry: np.ndarray | None = None
    guided_filter_labels: np.ndarray | None = None
    joint_bilateral_labels: np.ndarray | None = None

    @property
    def num_segments(self) -> int:
        return int(self.mask_embeddings.shape[0])

    def save_npz(self, path: str) -> None:
        """Write every array and the metadata to an .npz (not atomic; see cli for that)."""
        import json

        arrays = {k: v for k, v in self.__dict__.items() if isinstance(v, np.ndarray)}
        arrays.update({f"extra_{k}_labels": v for k, v in self.extra_labels.items()})
        meta = dict(image_size=self.image_size, timings=self.timings, unet_calls=self.unet_calls,
                    unet_samples=self.unet_samples, config=self.config, model=self.model,
                    faithfulness=self.faithfulness)
        np.savez_compressed(path, **arrays, meta=np.array(json.dumps(meta)))


@dataclass
class PreparedImage:
    """Everything about one image that does not depend on the perturbation (cached by the inspector)."""

    image: torch.Tensor  # (3, H, W) in [0, 1]
    x0: torch.Tensor  # (1, C, h, w) scaled latent
    inversion: Inversion
    segments: LowResSegments
    grid: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)
    counter: CallCounter = field(default_factory=CallCounter)
    diffseg: DiffSegResult | None = None  # DiffSeg's own segments when lowres="diffseg"

    @property
    def image_size(self) -> tuple[int, int]:
        return (int(self.image.shape[1]), int(self.image.shape[2]))

    def masks(self, device: torch.device | None = None) -> torch.Tensor:
        return torch.from_numpy(self.segments.masks()).to(device or self.x0.device)

    def check_start(self, timestep: int, readout_steps: int | None) -> None:
        """Raise unless the modulated denoising can start at ``timestep`` from this preparation.

        The full-schedule readout replays the stored noise maps, so it needs ``timestep``
        inverted; the reduced readout (``readout_steps`` set) is deterministic from x_t,
        which exists for every schedule timestep.
        """
        inv = self.inversion
        if timestep not in inv.noisy:
            raise ValueError(f"timestep {timestep} is not on the schedule {sorted(inv.noisy, reverse=True)}")
        if readout_steps is None and timestep not in inv.noise_maps:
            raise ValueError(f"timestep {timestep} was not inverted (this image was prepared up to "
                             f"t={inv.t_stop}); call prepare(image, t_stop={timestep}) or set readout_steps")


class StageClock:
    """Accumulating per-stage wall clock (``with clock("stage"):``); synchronises CUDA at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings: dict[str, float] = {}

    def __call__(self, stage: str) -> StageClock:
        self.current = stage
        return self

    stage = __call__

    def __enter__(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[self.current] = self.timings.get(self.current, 0.0) + time.perf_counter() - self.t0


# Config fields Step C may override per call (probes, inspector, diagnosis); the others fix the preparation.
MODULATION_FIELDS = ("modulation_layer", "modulation_timestep", "modulation_strength", "attention_injection",
                     "readout_steps", "max_batch", "decode_batch")


class EmerDiff:
    """Training-free segmentation with a frozen Stable Diffusion model.

    Args:
        model: an :class:`SDPipeline` from :func:`emerdiff.load_pipeline`.
        config: an :class:`EmerDiffConfig` (validated against the model here).
    """

    def __init__(self, model: SDPipeline, config: EmerDiffConfig | None = None) -> None:
        self.model = model
        self.config = config or EmerDiffConfig.for_model(model)  # SDXL: its own resolution and layers
        self.config.validate(model)
        if getattr(model, "family", "sd") in ("sd3", "flux"):  # MMDiT: flow matching (issue 28)
            from emerdiff.method.mmdit import FlowSchedule

            self.schedule: Any = FlowSchedule.from_model(model, self.config.num_inference_steps, self.config.resolution)
        else:
            self.schedule = Schedule.from_scheduler(model.scheduler, self.config.num_inference_steps)
        from emerdiff.sd.speed import apply_speed  # issue 25's levers (channels_last, compile, SDPA); off: no-op

        apply_speed(model, self.config)

    # -------------------------------------------------------------- stages
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) in [0, 1] -> scaled VAE latent mean (1, C, R/8, R/8)."""
        return encode(self.model, image, self.config.resolution)

    def latent_size(self) -> int:
        return self.config.resolution // self.model.vae_scale_factor

    def query_grid(self, layer: str | None = None) -> tuple[int, int]:
        return feature_resolution(self.model.unet, layer or self.config.query_layer, self.latent_size())

    def prepare(self, image: ImageInput, t_stop: int | None = None, progress: bool = False,
                lowres_labels: np.ndarray | None = None) -> PreparedImage:
        """Load, encode, invert (t <= t_stop, default the modulation timestep) and cluster.

        ``lowres_labels`` (a label map of any size and source) replaces the k-means of Step A:
        it is projected onto the query grid (:func:`emerdiff.method.features.project_labels`).
        """
        cfg = self.config
        img = load_image(image)
        clock = StageClock(self.model.device)
        counter = CallCounter()
        t_stop = cfg.modulation_timestep if t_stop is None else t_stop
        with clock("encode"):
            x0 = self.encode(img)
        generator = torch.Generator("cpu").manual_seed(cfg.seed)
        controller = AttentionController()
        t_f = cfg.feature_timestep
        bar = tqdm(total=len([t for t in self.schedule.timesteps if t <= t_stop]), desc="inversion (UNet calls)",
                   disable=not progress, leave=False)

        def unet_fn(x: torch.Tensor, t: int) -> torch.Tensor:
            # the inversion's own call at t_f gives the Step A features for free
            controller.capture_layers = {cfg.query_layer} if t == t_f else set()
            return unet_forward(self.model, x, t, counter, "inversion")

        if cfg.readout_steps is not None:
            # The reduced readout is deterministic from the sampled x_{t_m} and never
            # reads a noise map, so no inversion call is needed at all; the feature
            # call sees the same x_{t_f} the inversion would have used.
            bar.close()
            noisy = sample_noisy_latents(self.schedule, x0, generator)
            inv = Inversion(self.schedule, x0, noisy, {}, {}, t_stop)
            with clock("features"):
                queries = self.extract_queries(inv, [cfg.query_layer], t_f, cfg.feature_noise_draws,
                                               generator, counter, include_stored=True)[cfg.query_layer]
        else:
            with clock("inversion"), controlled_attention(self.model.unet, controller):
                inv = invert(unet_fn, self.schedule, x0, generator, t_stop=t_stop,
                             progress=lambda t: bar.update(1))
            bar.close()
            with clock("features"):
                queries = controller.captured.get(cfg.query_layer)
                if queries is None or cfg.feature_noise_draws > 1:
                    queries = self.extract_queries(inv, [cfg.query_layer], t_f, cfg.feature_noise_draws,
                                                   generator, counter, include_stored=True)[cfg.query_layer]
                else:
                    queries = queries[0]
        grid = self.query_grid()
        diffseg = None
        if cfg.lowres == "diffseg" and lowres_labels is None:  # DiffSeg's map, refined like external labels
            with clock("diffseg"):
                diffseg = run_diffseg(self.model, x0, cfg, counter)
            lowres_labels = diffseg.labels
        with clock("kmeans"):
            segments = (cluster_features(queries, grid, cfg.num_clusters, cfg.seed, cfg.kmeans_n_init,
                                         cfg.feature_normalization, cfg.kmeans_backend, self.model.device)
                        if lowres_labels is None else
                        segments_from_labels(lowres_labels, queries, grid, cfg.feature_normalization))
        return PreparedImage(img, x0, inv, segments, grid, clock.timings, counter, diffseg)

    def extract_queries(
        self,
        inv: Inversion,
        layers: Iterable[str],
        timestep: int,
        draws: int = 1,
        generator: torch.Generator | None = None,
        counter: CallCounter | None = None,
        include_stored: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Query vectors (tokens, C) of several layers at ``timestep``, averaged over noise draws.

        Draw 0 is the inversion's own x_t (if ``include_stored``); the others are
        fresh noise from ``generator``. All draws run as one batch.
        """
        layers = list(layers)
        xs = []
        if include_stored and timestep in inv.noisy:
            xs.append(inv.noisy[timestep])
        gen = generator or torch.Generator("cpu").manual_seed(self.config.seed + 1)
        while len(xs) < draws:
            e = torch.randn(inv.x0.shape, generator=gen).to(inv.x0.device, inv.x0.dtype)
            xs.append(self.schedule.noised(inv.x0, e, timestep))
        controller = AttentionController(capture_layers=set(layers))
        with controlled_attention(self.model.unet, controller):
            unet_forward(self.model, torch.cat(xs), timestep, counter, "features")
        return {name: controller.captured[name].float().mean(0) for name in layers}

    def modulation_config(self, **overrides: Any) -> EmerDiffConfig:
        """The config with Step C overrides applied and checked against the model.

        Only the fields of :data:`MODULATION_FIELDS` may change here: everything
        else (resolution, clustering, the schedule) is fixed by :meth:`prepare`.
        """
        if not overrides:
            return self.config
        bad = sorted(set(overrides) - set(MODULATION_FIELDS))
        if bad:
            raise ValueError(f"cannot override {bad} at modulation time; allowed: {list(MODULATION_FIELDS)} "
                             "(other fields need a new EmerDiff and a new prepare)")
        cfg = self.config.replace(**overrides)
        cfg.validate(self.model)
        return cfg

    def modulate(
        self,
        prepared: PreparedImage,
        mask_ids: Sequence[int] | None = None,
        *,
        masks: torch.Tensor | None = None,
        explicit_probabilities: bool = False,
        counter: CallCounter | None = None,
        progress: Any = None,
        **overrides: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step C, the one entry point: final latents of every (mask, +/-lambda) run and the unmodulated run.

        Args:
            prepared: from :meth:`prepare`.
            mask_ids: which of the prepared segments to perturb (default all); or
            masks: (K, h*w) float masks on ``prepared.grid`` given directly.
            explicit_probabilities: compute attention with explicit softmax (benchmarks).
            overrides: any of :data:`MODULATION_FIELDS` (e.g. ``modulation_strength=-10``,
                ``readout_steps=1``, or ``readout_steps=None`` for the full schedule).
        Returns:
            (latents (2K, C, h, w) ordered +M_0, -M_0, +M_1, ..., unmodulated latent (1, C, h, w)).
        """
        cfg = self.modulation_config(**overrides)
        prepared.check_start(cfg.modulation_timestep, cfg.readout_steps)
        if masks is None:
            masks = prepared.masks()
            if mask_ids is not None:
                masks = masks[list(mask_ids)]
        elif mask_ids is not None:
            raise ValueError("give mask_ids or masks, not both")
        return modulated_latents(
            self.model, prepared.inversion, masks, prepared.grid, layer=cfg.modulation_layer,
            t_modulation=cfg.modulation_timestep, strength=cfg.modulation_strength,
            share_attention=cfg.attention_injection, max_batch=cfg.max_batch, readout_steps=cfg.readout_steps,
            explicit_probabilities=explicit_probabilities, counter=counter, progress=progress,
        )

    def unet_calls_after(self, timestep: int | None = None, readout_steps: int | None = None) -> int:
        """UNet steps of one modulated run from ``timestep`` (default t_m) down to x_0."""
        cfg = self.config
        t_m = cfg.modulation_timestep if timestep is None else timestep
        steps = len([t for t in self.schedule.timesteps if t <= t_m])
        n = cfg.readout_steps if readout_steps is None else readout_steps
        return steps if n is None else min(steps, n)

    def perturb(
        self,
        prepared: PreparedImage,
        mask_ids: Sequence[int] | None = None,
        *,
        keep_images: bool = False,
        counter: CallCounter | None = None,
        clock: StageClock | None = None,
        progress: bool = False,
        **overrides: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Difference maps (len(mask_ids), R, R) for the chosen masks (default all).

        ``overrides`` are :meth:`modulate`'s (e.g. ``modulation_layer=...`` for probes and
        the inspector); a timestep other than the prepared one needs ``prepare(t_stop=...)``.
        Returns (maps, the decoded I+/I- images in [-1, 1] if ``keep_images``).
        """
        maps, images, _ = self._perturb(prepared, mask_ids, keep_images=keep_images, counter=counter, clock=clock,
                                        progress=progress, with_symmetry=False, **overrides)
        return maps, images

    def _perturb(
        self,
        prepared: PreparedImage,
        mask_ids: Sequence[int] | None,
        *,
        keep_images: bool,
        counter: CallCounter | None,
        clock: StageClock | None,
        progress: bool,
        with_symmetry: bool,
        **overrides: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray | None]:
        """:meth:`perturb`, plus with ``with_symmetry`` the (K,) +/- symmetry of every mask
        (:func:`emerdiff.method.measures.symmetry`) around the unmodulated run of the same batch.

        The symmetry is scored chunk by chunk while the decoder's I+ / I- are in hand: one extra
        decode (the unmodulated reconstruction I0) and K numbers kept, instead of holding all 2K images to score later.
        """
        cfg = self.modulation_config(**overrides)
        counter = counter or CallCounter()
        clock = clock or StageClock(self.model.device)
        k = prepared.segments.num_segments if mask_ids is None else len(list(mask_ids))
        calls = expected_unet_calls(k, self.unet_calls_after(cfg.modulation_timestep, cfg.readout_steps),
                                    cfg.max_batch)
        # one tick per batched UNet call, then one per decoded image (I+ and I- of every mask, and I0)
        decodes = 2 * k + int(with_symmetry)
        bar = tqdm(total=calls + decodes, desc=f"modulation ({calls} UNet calls + {decodes} decodes)",
                   disable=not progress, leave=False)
        with clock("modulation"):
            latents, unmodulated = self.modulate(prepared, mask_ids, counter=counter, progress=bar, **overrides)
        scores: list[np.ndarray] = []
        with clock("decode"):
            i0 = None
            if with_symmetry:
                i0 = decode(self.model, unmodulated).float()
                bar.update(1)

            def score_pairs(plus: torch.Tensor, minus: torch.Tensor) -> None:
                scores.append(symmetry(plus, minus, i0))

            maps, images = difference_maps(self.model, latents, cfg.decode_batch, keep_images, progress=bar,
                                           on_pairs=score_pairs if with_symmetry else None)
        bar.close()
        return maps, images, (np.concatenate(scores) if with_symmetry else None)

    def readout(self, difference_maps: torch.Tensor, prepared: PreparedImage,
                size: tuple[int, int] | None = None) -> np.ndarray:
        """Step D with this config: (K', R, R) maps of ``prepared``'s segments -> (R, R) labels, or
        resized to ``size`` (:func:`emerdiff.method.readout.readout_labels`, which every caller uses;
        ``prepared``'s image is its guide when ``readout_filter`` is set)."""
        return readout_labels(difference_maps, prepared.segments.labels, self.config, size, guide=prepared.image)

    def reconstruct(self, prepared: PreparedImage) -> torch.Tensor:
        """The unmodulated reconstruction decoded, (3, R, R) in [0, 1]."""
        return ((decode(self.model, prepared.inversion.x0)[0].float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------ segment
    def segment(
        self,
        image: ImageInput,
        return_difference_maps: bool = False,
        keep_images: bool = False,
        progress: bool = True,
        lowres_labels: np.ndarray | None = None,
    ) -> Segmentation:
        """Segment one image; labels come back at the image's original size.

        ``lowres_labels``: use these segments instead of Step A's k-means (see :meth:`refine`).
        """
        cfg = self.config
        cfg.check_for_segmentation()  # e.g. lambda = 0 would label nothing
        t_start = time.perf_counter()
        prepared = self.prepare(image, progress=progress, lowres_labels=lowres_labels)
        clock = StageClock(self.model.device)
        clock.timings.update(prepared.timings)
        counter = prepared.counter
        maps, images, sym = self._perturb(prepared, None, keep_images=keep_images, counter=counter, clock=clock,
                                          progress=progress, with_symmetry=True)
        check_difference_maps(maps, f"modulation_strength={cfg.modulation_strength}, "
                                    f"dtype={str(self.model.dtype).replace('torch.', '')}")
        size = prepared.image_size
        segs = prepared.segments
        with clock("assign"):
            model_res_labels = self.readout(maps, prepared)
            labels = resize_labels(model_res_labels, size)
            loc = locality(maps, prepared.masks(maps.device), prepared.grid).cpu().numpy()
            faithfulness = cheap_measures(loc, segs.labels, model_res_labels, sym)
        with clock("baselines"):
            nearest = nearest_upsample(segs.labels, size)
            bilinear = bilinear_upsample(segs.features, segs.centroids, prepared.grid, size)
            # the image as the model sees it, so the filters' pixel parameters mean the same at any input size
            guide = model_guide(prepared.image, (cfg.resolution, cfg.resolution))[0]
            guided = resize_labels(guided_filter_upsample(segs.features, segs.centroids, prepared.grid, guide,
                                                          cfg.guided_radius, cfg.guided_eps), size)
            bilateral = resize_labels(joint_bilateral_upsample(segs.features, segs.centroids, prepared.grid, guide,
                                                               cfg.bilateral_sigma_space, cfg.bilateral_sigma_color),
                                      size)
        clock.timings["total"] = time.perf_counter() - t_start
        return Segmentation(
            labels=labels,
            lowres_labels=segs.labels,
            nearest_labels=nearest,
            bilinear_labels=bilinear,
            mask_embeddings=segs.mask_embeddings(),
            query_features=segs.features,
            centroids=segs.centroids,
            locality=loc,
            image_size=size,
            timings=clock.timings,
            unet_calls=dict(counter.calls),
            unet_samples=dict(counter.samples),
            config=cfg.to_dict(),
            model=self.model.source,
            difference_maps=maps.cpu().numpy() if return_difference_maps else None,
            images=(((images + 1) / 2).clamp(0, 1).cpu().numpy() if images is not None else None),
            extra_labels={} if prepared.diffseg is None else
            {"diffseg": prepared.diffseg.pixel_labels(size, cfg.resolution, segs.labels)},
            faithfulness=faithfulness,
            symmetry=sym,
            guided_filter_labels=guided,
            joint_bilateral_labels=bilateral,
        )

    def refine(self, image: ImageInput, lowres_labels: np.ndarray, **kwargs: Any) -> Segmentation:
        """Pixel-level labels for segments from any source (SAM, DINO k-means, DiffSeg, a drawing).

        ``lowres_labels`` is a label map at any resolution; it is projected onto the modulation
        grid by majority vote per token and read out through the modulated denoising exactly as
        :meth:`segment` reads out its own k-means segments (given those, it reproduces them).
        Keyword arguments are :meth:`segment`'s.
        """
        return self.segment(image, lowres_labels=np.asarray(lowres_labels), **kwargs)
