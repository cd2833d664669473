"""Step C: perturb every segment with +lambda and -lambda in one batched denoising.

Batch layout of one UNet call: element 0 is the unmodulated run (its
attention is shared with the others when injection is on), elements 1.. are
(mask i, sign) pairs ``+M_0, -M_0, +M_1, -M_1, ...``. Chunks of ``max_batch``
elements each carry their own copy of the unmodulated run, so every chunk is
self-contained; on CUDA out-of-memory a chunk is retried at half the size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from emerdiff.method.attention import AttentionController, controlled_attention
from emerdiff.method.inversion import Inversion, replay_step
from emerdiff.sd.images import to_model_input


@dataclass
class CallCounter:
    """UNet forward calls and batch elements processed, per stage."""

    calls: dict[str, int] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)

    def add(self, stage: str, batch: int) -> None:
        self.calls[stage] = self.calls.get(stage, 0) + 1
        self.samples[stage] = self.samples.get(stage, 0) + batch


def unet_forward(model: Any, x: torch.Tensor, t: int, counter: CallCounter | None = None, stage: str = "unet") -> torch.Tensor:
    """One UNet call with the empty-prompt conditioning, batch-expanded.

    The model's ``unet_kwargs`` (SDPipeline) adds what its family needs beyond the
    text embedding: nothing for SD, SDXL's pooled text and size conditioning.
    """
    if getattr(model, "family", "sd") in ("sd3", "flux"):  # MMDiT (issue 28): its own call, velocity out
        from emerdiff.sd.mmdit import mmdit_forward

        with torch.no_grad():
            out = mmdit_forward(model, x, t)
        if counter is not None:
            counter.add(stage, x.shape[0])
        return out
    emb = model.empty_embedding.expand(x.shape[0], -1, -1)
    timestep = torch.tensor(t, device=x.device)
    # stand-ins without unet_kwargs (test namespaces, prompt views) must be SD-shaped
    extra = model.unet_kwargs(x.shape[0], tuple(x.shape[-2:])) if hasattr(model, "unet_kwargs") else {}
    if not hasattr(model, "unet_kwargs") and getattr(model.unet.config, "addition_embed_type", None):
        raise ValueError(f"{type(model).__name__} has no unet_kwargs, but its UNet needs added conditioning "
                         f"({model.unet.config.addition_embed_type!r}, SDXL); pass the SDPipeline of load_pipeline")
    with torch.no_grad():
        out = model.unet(x, timestep, encoder_hidden_states=emb, return_dict=False, **extra)[0]
    if counter is not None:
        counter.add(stage, x.shape[0])
    return out


def signed_coefficients(masks: torch.Tensor, strength: float) -> torch.Tensor:
    """(K, N) masks -> (2K, N) coefficients ordered +lambda M_0, -lambda M_0, +lambda M_1, ..."""
    return torch.stack([strength * masks, -strength * masks], dim=1).reshape(-1, masks.shape[1])


def readout_path(timesteps_below: list[int], readout_steps: int | None) -> list[int] | None:
    """Timesteps visited after the modulated one in reduced-step mode (None: full schedule)."""
    if readout_steps is None:
        return None
    rest = timesteps_below
    n = min(readout_steps - 1, len(rest))
    if n <= 0:
        return []
    idx = [round(i * (len(rest) - 1) / max(n - 1, 1)) for i in range(n)] if n > 1 else [len(rest) - 1]
    return [rest[i] for i in sorted(set(idx))]


def denoise_from(
    model: Any,
    inv: Inversion,
    coefficients: torch.Tensor,
    controller: AttentionController,
    t_modulation: int,
    readout_steps: int | None = None,
    counter: CallCounter | None = None,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Denoise one chunk from x_{t_m} to x_0; coefficients (B, N) with row 0 the unmodulated run (zeros).

    Returns the final latents (B, C, h, w). The modulation is active only in
    the call at ``t_modulation``.
    """
    batch = coefficients.shape[0]
    x = inv.noisy[t_modulation].expand(batch, -1, -1, -1).clone()
    below = [t for t in inv.inverted_timesteps if t < t_modulation]
    path = readout_path(below, readout_steps)
    with controlled_attention(model.unet, controller):
        if path is None:  # full schedule with the stored noise maps: exact replay when lambda = 0
            for t in [t_modulation] + below:
                controller.modulation = coefficients if t == t_modulation else None
                x = replay_step(inv, x, unet_forward(model, x, t, counter, "modulation"), t)
                if on_step:
                    on_step()
            return x
        # reduced-step readout: deterministic DDIM jumps (eta = 0) through `path`, then x0_hat
        visit = [t_modulation] + path
        for i, t in enumerate(visit):
            controller.modulation = coefficients if t == t_modulation else None
            out = unet_forward(model, x, t, counter, "modulation")
            eps, x0 = inv.schedule.eps_and_x0(x, out, t)
            if i + 1 < len(visit):
                x = inv.schedule.noised(x0, eps, visit[i + 1])
            else:
                x = x0
            if on_step:
                on_step()
        return x


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def modulated_latents(
    model: Any,
    inv: Inversion,
    masks: torch.Tensor,
    grid: tuple[int, int],
    *,
    layer: str,
    t_modulation: int,
    strength: float,
    share_attention: bool = True,
    max_batch: int = 16,
    readout_steps: int | None = None,
    explicit_probabilities: bool = False,
    counter: CallCounter | None = None,
    progress: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final latents of all (mask, sign) runs and of the unmodulated run.

    Args:
        masks: (K, h*w) float masks on the ``grid`` token grid (the query layer's).
        layer: modulation layer path; masks are resized to its grid if it differs.
    Returns:
        (latents (2K, C, h, w) ordered +M_0, -M_0, +M_1, ..., unmodulated latent (1, C, h, w)).
    """
    coeffs = signed_coefficients(masks, strength)
    latent_hw = tuple(inv.x0.shape[-2:])
    per_chunk = max(1, max_batch - 1)
    outputs: list[torch.Tensor] = []
    unmodulated: torch.Tensor | None = None
    start = 0
    while start < coeffs.shape[0]:
        rows = coeffs[start:start + per_chunk]
        batch = torch.cat([torch.zeros_like(rows[:1]), rows])
        controller = AttentionController(
            modulation_layer=layer, modulation_grid=grid, share_attention=share_attention,
            explicit_probabilities=explicit_probabilities, latent_size=latent_hw,  # type: ignore[arg-type]
        )
        try:
            out = denoise_from(model, inv, batch, controller, t_modulation, readout_steps, counter,
                               on_step=(lambda: progress.update(1)) if progress is not None else None)
        except RuntimeError as err:
            if not _is_oom(err) or per_chunk == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            per_chunk = max(1, per_chunk // 2)  # retry the same rows in smaller chunks
            continue
        unmodulated = out[:1] if unmodulated is None else unmodulated
        outputs.append(out[1:])
        start += rows.shape[0]
    assert unmodulated is not None
    return torch.cat(outputs), unmodulated


def encode(model: Any, image: torch.Tensor, resolution: int) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> scaled VAE latent mean (1, C, R/8, R/8) at ``resolution``."""
    x = to_model_input(image, resolution).to(model.device, model.dtype)
    with torch.no_grad():
        dist = model.vae.encode(x).latent_dist
    shift = getattr(model.vae.config, "shift_factor", None)  # SD3/FLUX VAEs: z = (mean - shift) * scale
    return (dist.mean - shift if shift else dist.mean) * model.vae.config.scaling_factor


def decode(model: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode of scaled latents -> images in [-1, 1], (B, 3, H, W)."""
    with torch.no_grad():
        z = latents / model.vae.config.scaling_factor
        shift = getattr(model.vae.config, "shift_factor", None)
        return model.vae.decode(z + shift if shift else z, return_dict=False)[0]


def difference_maps(
    model: Any,
    latents: torch.Tensor,
    decode_batch: int = 8,
    keep_images: bool = False,
    progress: Any = None,
    on_pairs: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """d_i(p) = || I_i^-(p) - I_i^+(p) ||_2 over RGB for latents ordered +M_0, -M_0, ...

    Decodes ``decode_batch`` images at a time (rounded to whole pairs) and keeps
    only the maps, so memory does not grow with K unless ``keep_images``.
    ``on_pairs(plus, minus)`` sees each chunk's decoded I+ and I- ((n, 3, H, W) in
    [-1, 1], unclamped) before they are dropped (``EmerDiff.segment``'s +/- symmetry).
    Returns (maps (K, H, W) float32, images (2K, 3, H, W) or None).
    """
    pairs_per_chunk = max(1, decode_batch // 2)
    maps, images = [], []
    n_pairs = latents.shape[0] // 2
    for start in range(0, n_pairs, pairs_per_chunk):
        chunk = latents[2 * start: 2 * min(n_pairs, start + pairs_per_chunk)]
        imgs = decode(model, chunk).float()
        plus, minus = imgs[0::2], imgs[1::2]
        maps.append((minus - plus).pow(2).sum(1).sqrt())
        if on_pairs is not None:
            on_pairs(plus, minus)
        if keep_images:
            images.append(imgs)
        if progress is not None:
            progress.update(chunk.shape[0])
    return torch.cat(maps), (torch.cat(images) if keep_images else None)


def expected_unet_calls(num_masks: int, steps_after: int, max_batch: int) -> int:
    """UNet calls of the modulated stage: chunks x steps (for reports and tests)."""
    return math.ceil(2 * num_masks / max(1, max_batch - 1)) * steps_after

