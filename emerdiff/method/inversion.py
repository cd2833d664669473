"""Edit-friendly DDPM inversion (Huberman-Spiegelglas et al., CVPR 2024) and replay.

Every schedule timestep t gets its own noisy latent
``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) e_t`` with *independent* noise e_t.
Going down the schedule, the noise map
``z_t = (x_prev - mu_t(x_t)) / sigma_t`` (DDIM with eta = 1) makes the sampler
reproduce every x_t exactly when it is fed z_t. Because the x_t are sampled,
not computed, the trajectory above the modulation timestep never needs a UNet
call: inverting only ``t <= t_stop`` gives exactly the same z_t as inverting
the whole schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from emerdiff.sd.layers import schedule_timesteps  # noqa: F401  (re-exported)

UNetFn = Callable[[torch.Tensor, int], torch.Tensor]  # (x_t, t) -> raw model output


@dataclass
class Schedule:
    """Timesteps and the cumulative alphas the sampler needs, on one device."""

    timesteps: list[int]  # descending
    alphas_cumprod: torch.Tensor  # (num_train_timesteps,), float64 on cpu
    final_alpha_cumprod: float  # alpha of the "previous" step of the last timestep
    prediction_type: str

    @classmethod
    def from_scheduler(cls, scheduler: Any, num_inference_steps: int) -> Schedule:
        ptype = scheduler.config.prediction_type
        if ptype not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {ptype!r} is not supported (epsilon or v_prediction)")
        return cls(
            timesteps=schedule_timesteps(scheduler, num_inference_steps),
            alphas_cumprod=scheduler.alphas_cumprod.double().cpu(),
            final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
            prediction_type=ptype,
        )

    def alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod

    def noised(self, x0: torch.Tensor, e: torch.Tensor, t: int) -> torch.Tensor:
        """The forward-noised latent sqrt(a_t) x0 + sqrt(1 - a_t) e (FlowSchedule: (1 - s) x0 + s e)."""
        a = self.alpha(t)
        return a**0.5 * x0 + (1 - a) ** 0.5 * e

    def previous(self, t: int) -> int:
        i = self.timesteps.index(t)
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1

    def eps_and_x0(self, x_t: torch.Tensor, model_output: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert the UNet output to (eps, predicted x_0) for either prediction type."""
        a = self.alpha(t)
        sa, s1a = a**0.5, (1 - a) ** 0.5
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (x_t - s1a * eps) / sa
        else:  # v = sqrt(a) eps - sqrt(1-a) x0
            x0 = sa * x_t - s1a * model_output
            eps = sa * model_output + s1a * x_t
        return eps, x0

    def posterior(self, x_t: torch.Tensor, model_output: torch.Tensor, t: int) -> tuple[torch.Tensor, float]:
        """Mean mu_t and std sigma_t of x_prev given x_t (DDIM, eta = 1)."""
        p = self.previous(t)
        a_t, a_p = self.alpha(t), self.alpha(p)
        sigma = ((1 - a_p) / (1 - a_t)) ** 0.5 * (1 - a_t / a_p) ** 0.5
        eps, x0 = self.eps_and_x0(x_t, model_output, t)
        mu = a_p**0.5 * x0 + max(1 - a_p - sigma**2, 0.0) ** 0.5 * eps
        return mu, sigma


@dataclass
class Inversion:
    """Noisy latents x_t for every timestep and noise maps z_t for the inverted ones.

    ``noisy[t]`` holds x_t for every schedule timestep; ``noise_maps[t]`` holds
    z_t for the timesteps at and below ``t_stop``; ``x0`` is the clean latent.
    """

    schedule: Schedule
    x0: torch.Tensor
    noisy: dict[int, torch.Tensor]
    noise_maps: dict[int, torch.Tensor]
    sigmas: dict[int, float]
    t_stop: int

    @property
    def inverted_timesteps(self) -> list[int]:
        return [t for t in self.schedule.timesteps if t <= self.t_stop]


def sample_noisy_latents(schedule: Schedule, x0: torch.Tensor, generator: torch.Generator) -> dict[int, torch.Tensor]:
    """x_t for every schedule timestep with independent noise, drawn in schedule order.

    Noise is drawn on the CPU from ``generator`` so results do not depend on the device.
    """
    noisy = {}
    for t in schedule.timesteps:
        e = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        noisy[t] = schedule.noised(x0, e, t)
    return noisy


def invert(
    unet_fn: UNetFn,
    schedule: Schedule,
    x0: torch.Tensor,
    generator: torch.Generator,
    t_stop: int | None = None,
    progress: Any = None,
) -> Inversion:
    """Edit-friendly inversion of ``x0`` over the timesteps ``t <= t_stop``.

    Args:
        unet_fn: (x_t, t) -> model output (eps or v), one UNet call.
        schedule: the sampler schedule.
        x0: clean latent (1, C, h, w).
        generator: CPU generator for the per-timestep noise (seed it).
        t_stop: highest timestep to invert (default: the whole schedule).
        progress: optional callable(t) called after each UNet call (progress bars).
    """
    t_stop = schedule.timesteps[0] if t_stop is None else t_stop
    if t_stop not in schedule.timesteps:
        raise ValueError(f"t_stop={t_stop} is not on the schedule {schedule.timesteps}")
    noisy = sample_noisy_latents(schedule, x0, generator)
    noise_maps: dict[int, torch.Tensor] = {}
    sigmas: dict[int, float] = {}
    for t in schedule.timesteps:
        if t > t_stop:
            continue
        p = schedule.previous(t)
        x_prev = noisy[p] if p >= 0 else x0
        mu, sigma = schedule.posterior(noisy[t], unet_fn(noisy[t], t), t)
        # sigma is 0 only if the final alpha is 1; then the residual itself is stored
        scale = sigma if sigma > 0 else 1.0
        noise_maps[t] = (x_prev - mu) / scale
        sigmas[t] = scale
        if progress is not None:
            progress(t)
    return Inversion(schedule, x0, noisy, noise_maps, sigmas, t_stop)


def replay_step(inv: Inversion, x_t: torch.Tensor, model_output: torch.Tensor, t: int) -> torch.Tensor:
    """One sampler step with the stored noise: x_prev = mu_t + sigma_t z_t (broadcasts over batch)."""
    mu, _ = inv.schedule.posterior(x_t, model_output, t)
    return mu + inv.sigmas[t] * inv.noise_maps[t]


def replay(
    unet_fn: UNetFn,
    inv: Inversion,
    t_start: int | None = None,
    x_start: torch.Tensor | None = None,
    keep: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Sample from ``t_start`` down to x_0 with the stored noise maps.

    Starting from the stored x_{t_start} (or ``x_start``) reproduces x_0. With
    ``keep=True`` also returns every visited x_t.
    """
    t_start = inv.t_stop if t_start is None else t_start
    if t_start not in inv.noise_maps:
        raise ValueError(f"t_start={t_start} was not inverted (inverted: t <= {inv.t_stop})")
    x = inv.noisy[t_start] if x_start is None else x_start
    visited = {t_start: x}
    for t in inv.inverted_timesteps:
        if t > t_start:
            continue
        x = replay_step(inv, x, unet_fn(x, t), t)
        visited[inv.schedule.previous(t)] = x
    return (x, visited) if keep else x
