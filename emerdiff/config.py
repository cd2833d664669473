"""One dataclass holding every knob of the method (DESIGN §1).

Every number of the paper is a default here, never a literal in the code, so
the probe notebooks can sweep it. `EmerDiffConfig.validate(model)` checks the
config against a loaded UNet and scheduler and fails early with the list of
valid choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

QUERY_LAYER = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
MODULATION_LAYER = "up_blocks.1.attentions.2.transformer_blocks.0.attn2"


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
    # execution
    seed: int = 0
    device: str | None = None  # None: cuda if available else cpu
    dtype: str | None = None  # "float32" | "float16" | "bfloat16"; None: fp32 on cpu, fp16 on cuda
    max_batch: int = 16  # UNet batch in the modulated denoising (reference included)
    decode_batch: int = 8  # VAE decode batch
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into results

    # ------------------------------------------------------------------ dict
    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON/papermill friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EmerDiffConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"unknown EmerDiffConfig field(s) {unknown}; valid fields: {sorted(names)}"
            )
        return cls(**values)

    def replace(self, **changes: Any) -> "EmerDiffConfig":
        """A copy with some fields changed (validated names)."""
        return EmerDiffConfig.from_dict({**self.to_dict(), **changes})

    # ------------------------------------------------------------- checking
    def check_values(self) -> None:
        """Checks that need no model."""
        if self.resolution < 64 or self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 and >= 64, got {self.resolution}")
        if self.num_clusters < 2:
            raise ValueError(f"num_clusters (K) must be >= 2, got {self.num_clusters}")
        if self.feature_noise_draws < 1:
            raise ValueError("feature_noise_draws must be >= 1")
        if self.max_batch < 2:
            raise ValueError("max_batch must be >= 2 (the reference plus one modulated run)")
        if self.decode_batch < 1:
            raise ValueError("decode_batch must be >= 1")
        if self.blur_sigma < 0:
            raise ValueError("blur_sigma must be >= 0")
        if self.readout_steps is not None and self.readout_steps < 1:
            raise ValueError("readout_steps must be None (full schedule) or >= 1")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")

    def validate(self, model: Any) -> None:
        """Check layers and timesteps against a loaded model (`load_pipeline`).

        Raises ValueError naming the bad value and listing the valid ones.
        """
        from .models import attention_layers, feature_resolution
        from .inversion import schedule_timesteps

        self.check_values()
        layers = attention_layers(model.unet)
        for what in ("query_layer", "modulation_layer"):
            name = getattr(self, what)
            if name not in layers:
                raise ValueError(
                    f"unknown {what} {name!r}. Valid attention layers of this UNet:\n  "
                    + "\n  ".join(layers)
                )
        timesteps = schedule_timesteps(model.scheduler, self.num_inference_steps)
        for what in ("feature_timestep", "modulation_timestep"):
            t = getattr(self, what)
            if t not in timesteps:
                nearest = sorted(timesteps, key=lambda s: abs(s - t))[:2]
                raise ValueError(
                    f"{what}={t} is not on the {self.num_inference_steps}-step schedule; "
                    f"nearest valid timesteps: {sorted(nearest)}"
                )
        latent = self.resolution // model.vae_scale_factor
        h, w = feature_resolution(model.unet, self.query_layer, latent)
        if self.num_clusters > h * w:
            raise ValueError(
                f"num_clusters={self.num_clusters} is larger than the {h * w} tokens "
                f"({h}x{w}) of the query layer at resolution {self.resolution}; "
                "lower K or raise the resolution"
            )
