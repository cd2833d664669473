"""One dataclass holding every knob of the method (docs/METHOD.md).

Every number of the paper is a default here, never a literal in the code, so
the probe notebooks can sweep it. `EmerDiffConfig.validate(model)` checks the
config against a loaded UNet and scheduler and fails early with the list of
valid choices.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

QUERY_LAYER = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
MODULATION_LAYER = "up_blocks.1.attentions.2.transformer_blocks.0.attn2"
MAX_STEPS = 1000  # the SD training schedule has 1000 timesteps
MAX_STRENGTH = 1e4  # 1000x the paper's lambda; beyond it activations overflow
LOWRES_METHODS = ("kmeans", "diffseg")  # Step A sources (EmerDiffConfig.lowres)
FEATURE_NORMALIZATIONS = ("none", "l2")  # EmerDiffConfig.feature_normalization before k-means
# EmerDiffConfig.readout_filter: Step D's optional image-guided filter of the difference maps (not the paper's)
READOUT_FILTERS = ("none", "guided_filter", "joint_bilateral")
KMEANS_BACKENDS = ("sklearn", "torch", "auto")  # EmerDiffConfig.kmeans_backend (emerdiff/method/kmeans.py)
SDPA_BACKENDS = ("default", "flash", "efficient", "cudnn", "math")  # EmerDiffConfig.sdpa_backend (emerdiff/sd/speed.py)
# EmerDiffConfig.compile_mode: torch.compile's modes; "reduce-overhead" replays CUDA graphs (the batch-1 inversion
# and feature calls are latency-bound), "max-autotune" also searches kernels
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Fields that change how fast a segmentation runs, not its result (beyond float rounding): an evaluation's
# cached records do not depend on them (evaluation.signature.run_signature).
EXECUTION_FIELDS = ("max_batch", "decode_batch", "channels_last", "compile_unet", "compile_decoder", "compile_mode",
                    "sdpa_backend")
# Fields added after runs were first cached (evaluate's run.json, sweep folders), with the default that reproduces
# the older runs: at that default a field is left out of a stored signature, so an older run still resumes.
LATER_FIELDS: dict[str, Any] = {"kmeans_backend": "sklearn", "readout_filter": "none"}


def without_later_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a dict) less the :data:`LATER_FIELDS` that hold their default: as a run stored before them."""
    return {k: v for k, v in config.items() if not (k in LATER_FIELDS and v == LATER_FIELDS[k])}


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}; the paper's value is "
                         f"{getattr(EmerDiffConfig, name)}")


# The annotation of every EmerDiffConfig field -> (test, what a valid value is). Floats take ints too
# (10 means 10.0); no number field takes a bool (True would silently be 1). A field whose annotation is
# not here fails tests/test_reliability_cli.py, so a new field cannot slip past check_types.
_TYPE_RULES: dict[str, tuple[Any, str]] = {
    "bool": (lambda v: isinstance(v, (bool, np_bool())), "True or False"),
    "int": (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, (bool, np_bool())), "an integer"),
    "float": (lambda v: isinstance(v, numbers.Real) and not isinstance(v, (bool, np_bool())), "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "dict[str, Any]": (lambda v: isinstance(v, dict), "a dict"),
}


def np_bool() -> type:
    """numpy's bool type, imported lazily (numpy is not needed to build a config)."""
    import numpy

    return numpy.bool_


def field_type_rule(annotation: str) -> tuple[Any, str] | None:
    """(test, description) for a field annotation such as ``'int'`` or ``'int | None'``; None if unknown."""
    parts = [part.strip() for part in annotation.split("|")]
    optional = "None" in parts
    parts = [part for part in parts if part != "None"]
    if len(parts) != 1 or parts[0] not in _TYPE_RULES:
        return None
    test, what = _TYPE_RULES[parts[0]]
    if optional:
        return (lambda v: v is None or test(v)), f"{what} or None"
    return test, what


@dataclass
class EmerDiffConfig:
    """Settings of one EmerDiff segmentation.

    Layers are diffusers module paths (see ``emerdiff layers MODEL``);
    timesteps must lie on the ``num_inference_steps`` schedule (981, 961, ...,
    1 for 50 steps).
    """

    # pre-processing
    resolution: int = 512  # the image is resized to resolution x resolution
    # Step A: low-resolution segments
    query_layer: str = QUERY_LAYER
    feature_timestep: int = 1
    feature_noise_draws: int = 1  # >1: average the queries over several noise draws
    num_clusters: int = 25  # K
    kmeans_n_init: int = 10
    # "none": k-means on the raw queries (our reading of the paper); "l2": each token's query scaled to
    # unit length first (cosine geometry; docs/DEPARTURES.md). Centroids live in the clustered space.
    feature_normalization: str = "none"
    lowres: str = "kmeans"  # Step A source: "kmeans" (the paper) or "diffseg" (emerdiff/method/diffseg.py)
    # DiffSeg (Tian et al., CVPR 2024); sources of each value in emerdiff/method/diffseg.py
    diffseg_timestep: int = 300  # the UNet's timestep for its one call
    diffseg_add_noise: bool = False  # official code: the clean latent with t's embedding
    diffseg_kl_threshold: float = 1.1  # tau (COCO-Stuff-27 setting; 0.9 for Cityscapes)
    diffseg_iterations: int = 3  # N merging iterations
    diffseg_anchors: int = 16  # M: an M x M anchor grid
    diffseg_refine: bool = False  # k-means refinement of the proposals
    # Step B: inversion schedule
    num_inference_steps: int = 50
    # Step C: perturbation
    modulation_layer: str = MODULATION_LAYER
    modulation_timestep: int = 281
    modulation_strength: float = 10.0  # lambda; runs with +lambda and -lambda
    attention_injection: bool = True  # modulated runs reuse the reference's attention
    readout_steps: int | None = None  # None: full schedule after t_m; n: n steps to x_0
    # Step D: assignment
    blur_sigma: float = 4.0  # Gaussian sigma on difference maps, pixels at `resolution`
    # None: the paper's argmax over every mask; r: each pixel chooses among the masks found within
    # r tokens of its own token (docs/DEPARTURES.md; r = 0 gives nearest upsampling)
    assign_radius: int | None = None
    # "none": the paper's readout (blur, argmax). "guided_filter" / "joint_bilateral": after the blur, each
    # difference map is filtered guided by the image at `resolution` with the image-guided baselines' filter
    # and parameters below (guided_radius/guided_eps or bilateral_sigma_*), then the argmax: label edges
    # snap to colour edges. Not the paper's (docs/DEPARTURES.md); readout_labels needs the image (guide=).
    readout_filter: str = "none"
    # image-guided upsampling baselines (Segmentation.guided_filter_labels / joint_bilateral_labels): the
    # per-cluster score maps of the bilinear baseline filtered guided by the image at `resolution`, pixels at
    # `resolution`; with readout_filter set, Step D's filter of the difference maps reads the same fields.
    # Chosen on the reference model's validation scenes at 128 px (concept mIoU, the best grid point
    # of each, on the grid's edge: docs/reference/guided_upsampling_validation.md); not validated at 512 px,
    # and not scaled up there: kornia's filters cost grows with the window's area.
    guided_radius: int = 24  # guided filter (He et al.): box radius, pixels
    guided_eps: float = 1e-5  # guided filter regulariser, squared RGB units in [0, 1]
    bilateral_sigma_space: float = 16.0  # joint bilateral (Kopf et al.): spatial sigma, pixels
    bilateral_sigma_color: float = 0.01  # joint bilateral: colour sigma, RGB distance in [0, 1]
    # execution
    seed: int = 0
    max_batch: int = 16  # UNet batch in the modulated denoising (reference included)
    decode_batch: int = 8  # VAE decode batch
    # speed levers (issue 25; emerdiff/sd/speed.py, emerdiff/method/kmeans.py): off / the old behaviour by
    # default until a GPU measurement shows they pay (benchmarks/gpu_issue25.py, benchmarks/RESULTS.md)
    kmeans_backend: str = "sklearn"  # Step A k-means: "sklearn" (CPU), "torch" (the model's device), "auto" (torch on CUDA)
    channels_last: bool = False  # UNet and VAE weights (and the UNet's input) in channels_last memory format
    compile_unet: bool = False  # torch.compile the UNet's forward (static shapes: one graph per chunk size)
    compile_decoder: bool = False  # torch.compile the VAE decoder
    compile_mode: str = "default"  # torch.compile mode of both: default, reduce-overhead (CUDA graphs), max-autotune, ...
    sdpa_backend: str = "default"  # scaled-dot-product attention kernel: "default" (torch picks), flash, efficient, cudnn, math
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into results

    # ------------------------------------------------------------------ dict
    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON/papermill friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EmerDiffConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"unknown EmerDiffConfig field(s) {unknown}; valid fields: {sorted(names)}"
            )
        return cls(**values)

    def replace(self, **changes: Any) -> EmerDiffConfig:
        """A copy with some fields changed (validated names)."""
        return EmerDiffConfig.from_dict({**self.to_dict(), **changes})

    @classmethod
    def for_model(cls, model: Any, **changes: Any) -> EmerDiffConfig:
        """The settings for ``model``: the dataclass defaults, then the preset of the model's kind
        (:data:`PRESETS`, :func:`model_kind`: paper / reference / tiny / sdxl), then ``changes``
        (field names, checked). The one path from a model to its config: the CLI and the notebooks
        call it too. ``model``: a loaded SDPipeline, a folder, a hub id, 'tiny' or 'reference'."""
        return cls.from_dict({**cls().to_dict(), **preset(model, changes), **changes})

    # ------------------------------------------------------------- checking
    def check_types(self) -> None:
        """Every field's value has the field's type (bool, int, float, str, ``int | None`` ...); a ValueError
        names the field, the value, its type and what is expected (e.g. ``attention_injection='no'``, a
        truthy string, is refused instead of leaving injection on)."""
        for f in dataclasses.fields(self):
            rule = field_type_rule(str(f.type))
            if rule is None:
                continue
            test, what = rule
            value = getattr(self, f.name)
            if not test(value):
                raise ValueError(f"{f.name} must be {what}, got {value!r} (type {type(value).__name__}); "
                                 f"set {f.name} to {what} (default: {getattr(EmerDiffConfig(), f.name)!r})")

    def check_values(self) -> None:
        """Checks that need no model; a ValueError names the field, the value, the valid range and the fix.

        The types of every field first (:meth:`check_types`), then the ranges."""
        self.check_types()
        for name in ("resolution", "num_clusters", "feature_noise_draws", "kmeans_n_init", "num_inference_steps",
                     "feature_timestep", "modulation_timestep", "max_batch", "decode_batch", "seed"):
            _check_int(name, getattr(self, name))
        if self.readout_steps is not None:
            _check_int("readout_steps", self.readout_steps)
        if self.assign_radius is not None:
            _check_int("assign_radius", self.assign_radius)
            if self.assign_radius < 0:
                raise ValueError(f"assign_radius must be None (every mask competes, the paper) or >= 0 tokens, "
                                 f"got {self.assign_radius}")
        for name in ("modulation_strength", "blur_sigma"):
            _check_number(name, getattr(self, name))
        if self.resolution < 64 or self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 and >= 64, got {self.resolution}")
        if self.num_clusters < 2:
            raise ValueError(f"num_clusters (K) must be >= 2, got {self.num_clusters}")
        if self.feature_noise_draws < 1:
            raise ValueError("feature_noise_draws must be >= 1")
        if self.kmeans_n_init < 1:
            raise ValueError(f"kmeans_n_init must be >= 1, got {self.kmeans_n_init}")
        if self.feature_normalization not in FEATURE_NORMALIZATIONS:
            raise ValueError(f"feature_normalization must be one of {list(FEATURE_NORMALIZATIONS)}, got "
                             f"{self.feature_normalization!r} (none: k-means on the raw query vectors, the "
                             "default; l2: each vector scaled to unit length first)")
        if not 1 <= self.num_inference_steps <= MAX_STEPS:
            raise ValueError(
                f"num_inference_steps (--steps) must be between 1 and {MAX_STEPS} (the training schedule's "
                f"length), got {self.num_inference_steps}; the paper uses 50"
            )
        if self.max_batch < 2:
            raise ValueError("max_batch must be >= 2 (the reference plus one modulated run)")
        if self.decode_batch < 1:
            raise ValueError("decode_batch must be >= 1")
        sigma_max = self.resolution / 8
        if not 0 <= self.blur_sigma <= sigma_max:
            raise ValueError(
                f"blur_sigma (--blur-sigma) must lie in [0, resolution/8 = {sigma_max:g}] pixels, got "
                f"{self.blur_sigma}; the paper uses 4 at 512 px (0 = no blur)"
            )
        if abs(self.modulation_strength) > MAX_STRENGTH:
            raise ValueError(
                f"modulation_strength (--strength, lambda) must lie in [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}], "
                f"got {self.modulation_strength}; the paper uses 10"
            )
        self.check_guided()
        if self.readout_filter not in READOUT_FILTERS:
            raise ValueError(f"readout_filter must be one of {list(READOUT_FILTERS)}, got {self.readout_filter!r} "
                             "(none: the paper's readout, blur then argmax; guided_filter / joint_bilateral: each "
                             "difference map also filtered guided by the image, with the guided_radius/guided_eps or "
                             "bilateral_sigma_space/bilateral_sigma_color of the image-guided baselines)")
        if self.readout_steps is not None and self.readout_steps < 1:
            raise ValueError("readout_steps must be None (full schedule) or >= 1")
        self.check_diffseg()
        self.check_speed()

    def check_guided(self) -> None:
        """The image-guided upsampling baselines' parameters (guided_radius, guided_eps,
        bilateral_sigma_space, bilateral_sigma_color); a ValueError names the field, value and range."""
        _check_int("guided_radius", self.guided_radius)
        if not 1 <= self.guided_radius <= self.resolution // 2:
            raise ValueError(f"guided_radius must lie in [1, resolution/2 = {self.resolution // 2}] pixels, got "
                             f"{self.guided_radius}; the default is {EmerDiffConfig.guided_radius}")
        for name, top in (("guided_eps", 1.0), ("bilateral_sigma_space", self.resolution / 4),
                          ("bilateral_sigma_color", 2.0)):
            value = getattr(self, name)
            _check_number(name, value)
            if not 0 < value <= top:
                raise ValueError(f"{name} must lie in (0, {top:g}], got {value}; "
                                 f"the default is {getattr(EmerDiffConfig, name)}")

    def check_speed(self) -> None:
        """The speed levers' names (their bools are checked by :meth:`check_types`)."""
        if self.kmeans_backend not in KMEANS_BACKENDS:
            raise ValueError(f"kmeans_backend must be one of {list(KMEANS_BACKENDS)}, got {self.kmeans_backend!r} "
                             "(sklearn: scikit-learn on the CPU; torch: on the model's device; auto: torch on CUDA)")
        if self.sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"sdpa_backend must be one of {list(SDPA_BACKENDS)}, got {self.sdpa_backend!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {list(COMPILE_MODES)}, got {self.compile_mode!r} "
                             "(reduce-overhead: CUDA graphs)")

    def check_diffseg(self) -> None:
        """The Step A source and DiffSeg's constants (checked even when k-means is used, so a bad
        value never waits for the day someone switches)."""
        if self.lowres not in LOWRES_METHODS:
            raise ValueError(f"lowres must be one of {list(LOWRES_METHODS)}, got {self.lowres!r} "
                             "(kmeans: the paper's Step A; diffseg: DiffSeg's self-attention merging)")
        for name in ("diffseg_timestep", "diffseg_iterations", "diffseg_anchors"):
            _check_int(name, getattr(self, name))
        _check_number("diffseg_kl_threshold", self.diffseg_kl_threshold)
        for name in ("diffseg_add_noise", "diffseg_refine"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not 0 <= self.diffseg_timestep < MAX_STEPS:
            raise ValueError(f"diffseg_timestep must lie in [0, {MAX_STEPS - 1}], got {self.diffseg_timestep}; "
                             "DiffSeg uses 300")
        if self.diffseg_kl_threshold <= 0:
            raise ValueError(f"diffseg_kl_threshold must be > 0 (a KL distance), got {self.diffseg_kl_threshold}; "
                             "DiffSeg uses 1.1 (COCO-Stuff) or 0.9 (Cityscapes)")
        if self.diffseg_iterations < 1:
            raise ValueError(f"diffseg_iterations must be >= 1, got {self.diffseg_iterations}; DiffSeg uses 3")
        if self.diffseg_anchors < 1:
            raise ValueError(f"diffseg_anchors must be >= 1 (anchors per side), got {self.diffseg_anchors}; "
                             "DiffSeg uses 16")

    def check_for_segmentation(self) -> None:
        """:meth:`check_values` plus what a segmentation needs: a non-zero lambda.

        (lambda = 0 stays a valid config for probes that want an unperturbed
        baseline, but it gives all-zero difference maps, so no labels.)
        """
        self.check_values()
        if self.modulation_strength == 0:
            raise ValueError(
                "modulation_strength (--strength, lambda) is 0: nothing is perturbed, so every difference "
                "map is zero and no pixel can be labelled; use a non-zero value such as the paper's 10"
            )

    def check_resolution(self, vae_scale_factor: int, unet_factor: int) -> None:
        """The image size must give a latent the UNet can halve at every down block.

        Args:
            vae_scale_factor: VAE downsampling (8 for SD).
            unet_factor: total UNet downsampling, 2 ** (down blocks - 1) (8 for SD).
        """
        step = vae_scale_factor * unet_factor
        if self.resolution % step:
            lower = max(step, self.resolution // step * step)
            upper = (self.resolution // step + 1) * step
            raise ValueError(
                f"resolution={self.resolution} does not fit this model: it must be a multiple of {step} "
                f"(the VAE downsamples x{vae_scale_factor}, the UNet x{unet_factor} more); "
                f"use {lower} or {upper}"
            )

    def validate(self, model: Any) -> None:
        """Check layers and timesteps against a loaded model (`load_pipeline`).

        Raises ValueError naming the bad value and listing the valid ones.
        """
        from emerdiff.sd.layers import schedule_timesteps
        from emerdiff.sd.loading import attention_layers, family_defaults, feature_resolution, unet_downsampling

        self.check_values()
        self.check_resolution(model.vae_scale_factor, unet_downsampling(model.unet.config))
        layers = attention_layers(model.unet)
        own = family_defaults(model)
        if own and (self.query_layer, self.modulation_layer) == (QUERY_LAYER, MODULATION_LAYER):
            # SD's paths exist in SDXL too, one level finer: refuse instead of running the wrong level
            raise ValueError(
                f"query_layer and modulation_layer are SD's defaults, but {getattr(model, 'source', 'this model')} "
                f"is {model.family}: its low-resolution layers are {own['query_layer']} and "
                f"{own['modulation_layer']}. Use EmerDiffConfig.for_model(model, ...) or set both layers"
            )
        for what in ("query_layer", "modulation_layer"):
            name = getattr(self, what)
            if name not in layers:
                raise ValueError(
                    f"unknown {what} {name!r}. Valid attention layers of this UNet:\n  "
                    + "\n  ".join(layers)
                )
        from emerdiff.sd.layers import model_timesteps
        from emerdiff.sd.mmdit import MMDIT_FAMILIES

        mmdit = getattr(model, "family", "sd") in MMDIT_FAMILIES
        # SD3/FLUX: integer flow timesteps round(1000 sigma); FLUX's shift depends on the resolution (issue 28)
        timesteps = (model_timesteps(model, self.num_inference_steps, self.resolution) if mmdit
                     else schedule_timesteps(model.scheduler, self.num_inference_steps))
        for what in ("feature_timestep", "modulation_timestep"):
            t = getattr(self, what)
            if t not in timesteps:
                nearest = sorted(timesteps, key=lambda s: abs(s - t))[:2]
                raise ValueError(
                    f"{what}={t} is not on the {self.num_inference_steps}-step schedule; "
                    f"nearest valid timesteps: {sorted(nearest)}"
                )
        if self.lowres == "diffseg" and mmdit:
            raise ValueError(f"lowres='diffseg' reads a UNet's self-attention levels; {model.family} is an MMDiT "
                             "(joint attention over text and image tokens): use lowres='kmeans'")
        if self.lowres == "diffseg":
            from emerdiff.sd.loading import self_attention_layers

            if not self_attention_layers(model.unet):
                raise ValueError("lowres='diffseg' needs self-attention layers and this UNet has none; "
                                 "use lowres='kmeans'")
        latent = self.resolution // model.vae_scale_factor
        h, w = feature_resolution(model.unet, self.query_layer, latent)
        if self.num_clusters > h * w:
            raise ValueError(
                f"num_clusters={self.num_clusters} is larger than the {h * w} tokens "
                f"({h}x{w}) of the query layer at resolution {self.resolution}; "
                "lower K or raise the resolution"
            )


# ------------------------------------------------------------------ presets
# The one table of per-model settings. EmerDiffConfig.for_model(model, **changes) = the dataclass
# defaults, then PRESETS[model_kind(model)], then changes; `emerdiff segment/refine/evaluate/figures`,
# emerdiff.notebook.lab.setup and training/heldout.py all build their config through it.
# max_batch 2K + 1 runs every modulated run and the reference in one UNet batch.
PRESETS: dict[str, dict[str, Any]] = {
    # SD 1.x/2.x at 512 px: the paper's values (the dataclass defaults, stated here so the table is whole)
    "paper": dict(resolution=512, num_clusters=25, num_inference_steps=50, modulation_timestep=281, blur_sigma=4.0,
                  max_batch=16),
    # the shipped model (emerdiff/assets/weights), and any folder whose native size is <= 128 px. The held-out
    # tables (docs/reference/v2_heldout_results.md) were made with exactly these values. t_m 81: reference v2's
    # readout, chosen on validation scenes (docs/reference/v2.md); the paper's 281 spreads a local change over
    # this small model's image in the 14 later steps (diagnosis.md). DiffSeg's tau 0.1: its self-attention is
    # far flatter than SD's (at the published 1.1 every map merges into one segment); 0.1 gives 3-8 segments
    # (mean 5.4) on validation scenes 100-109 (docs/METHOD.md).
    "reference": dict(resolution=128, num_clusters=8, num_inference_steps=50, modulation_timestep=81, blur_sigma=1.0,
                      max_batch=17, diffseg_kl_threshold=0.1),
    # the random-weights test model ('tiny'): small and fast, not meant to segment well
    "tiny": dict(resolution=128, num_clusters=4, num_inference_steps=10, modulation_timestep=201, blur_sigma=1.0,
                 max_batch=9),
    # SDXL: the paper's method settings; its native resolution and its own query/modulation layers come
    # from the model (sdxl_fields, i.e. emerdiff.sd.layers.family_defaults)
    "sdxl": dict(num_clusters=25, num_inference_steps=50, modulation_timestep=281, blur_sigma=4.0, max_batch=16),
    # SD3 / FLUX (issue 28): PLACEHOLDERS chosen without real weights (docs/PORTING.md). The model-read part
    # (emerdiff.sd.mmdit.mmdit_defaults): resolution min(native, 512) (32x32 tokens), query = modulation block
    # SD3 transformer_blocks.{n//2}.attn / FLUX the last double-stream block, t_m = the flow timestep matching SD's
    # 281 in signal-to-noise ratio, t_f = the schedule's last. Run the block/timestep probes (notebooks 01-02) on
    # real weights and write the evidence here before trusting them.
    "sd3": dict(num_clusters=25, num_inference_steps=50, blur_sigma=4.0, max_batch=16),
    "flux": dict(num_clusters=25, num_inference_steps=50, blur_sigma=4.0, max_batch=16),
}
SMALL_MODEL_MAX_SIDE = 128  # a model whose native image side is at most this is sized like the reference model


def _native_side(unet_config: dict[str, Any], vae_config: dict[str, Any]) -> int:
    return int(unet_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)


def model_kind(model: Any) -> str:
    """The :data:`PRESETS` key of ``model``: ``'tiny'`` or ``'reference'`` by name; ``'sdxl'`` for an
    SDXL UNet; ``'reference'`` for any other model whose native image side (UNet sample_size x the VAE
    factor) is <= 128 px; else ``'paper'``.

    ``model``: a loaded :class:`~emerdiff.sd.loading.SDPipeline` (its ``source`` and ``family``), or
    anything ``load_pipeline`` takes (a name, a diffusers folder, a hub id), read from its config files
    without loading weights. A hub id that is not cached, or an unreadable folder, is ``'paper'``
    (``load_pipeline`` reports what is wrong with it).
    """
    if hasattr(model, "unet"):  # a loaded model
        source = getattr(model, "source", None)
        if source in ("tiny", "reference"):
            return source
        if getattr(model, "family", "sd") in ("sdxl", "sd3", "flux"):
            return model.family
        try:
            native = int(model.unet.config.sample_size) * 2 ** (len(model.vae.config.block_out_channels) - 1)
        except (AttributeError, TypeError, ValueError):  # a stand-in without configs: the paper's
            return "paper"
        return "reference" if native <= SMALL_MODEL_MAX_SIDE else "paper"
    name = str(model)
    if name in ("tiny", "reference"):
        return name
    from emerdiff.sd.layers import _unet_config_of, unet_family
    from emerdiff.sd.mmdit import folder_family

    try:
        mmdit = folder_family(name)  # SD3 / FLUX folders (model_index.json)
    except (OSError, ValueError):
        mmdit = None
    if mmdit is not None:
        return mmdit
    configs = _unet_config_of(name)
    if configs is None:
        return "paper"
    unet, vae = configs
    try:
        if unet_family(unet) == "sdxl":
            return "sdxl"
        native = _native_side(unet, vae)
    except (KeyError, TypeError, ValueError):  # a foreign config: load_pipeline reports it
        return "paper"
    return "reference" if native <= SMALL_MODEL_MAX_SIDE else "paper"


def preset(model: Any, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The :data:`PRESETS` entry of ``model``'s kind (:func:`model_kind`) as EmerDiffConfig fields; for
    SDXL plus the model's native resolution and its query/modulation layers
    (:func:`emerdiff.sd.layers.family_defaults`)."""
    kind = model_kind(model)
    fields = dict(PRESETS[kind])
    if kind in ("sdxl", "sd3", "flux"):
        from emerdiff.sd.layers import family_defaults

        changes = changes or {}
        # SD3/FLUX timesteps lie on the schedule of the resolution and step count the config will use
        steps = changes.get("num_inference_steps", fields.get("num_inference_steps", 50))
        fields.update(family_defaults(model, changes.get("resolution"), steps if isinstance(steps, int) else 50))
    return fields
