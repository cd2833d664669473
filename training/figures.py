"""Figures of the reference model: samples (from captions and the empty prompt) and the loss curve.

    python -m training.figures --model reference --log runs/ref/unet/log.jsonl --out DIR
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emerdiff.assets.scenes import heldout_scene_seeds, make_scene


@torch.no_grad()
def sample(model: Any, prompts: Sequence[str], steps: int = 50, guidance: float = 3.0, seed: int = 0,
           size: int = 128) -> np.ndarray:
    """DDIM (eta = 0) samples with classifier-free guidance; (N, H, W, 3) uint8.

    ``guidance`` 1 is plain conditional sampling; the empty prompt ignores it.
    """
    from emerdiff.method.inversion import Schedule

    schedule = Schedule.from_scheduler(model.scheduler, steps)
    cond = model.encode_text(list(prompts))
    uncond = model.empty_embedding.expand(len(prompts), -1, -1)
    latent = size // model.vae_scale_factor
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(len(prompts), model.unet.config.in_channels, latent, latent, generator=g).to(model.device, model.dtype)
    for i, t in enumerate(schedule.timesteps):
        out = model.unet(torch.cat([x, x]), torch.tensor(t, device=x.device),
                         encoder_hidden_states=torch.cat([uncond, cond])).sample
        u, c = out.chunk(2)
        eps_out = u + guidance * (c - u)
        eps, x0 = schedule.eps_and_x0(x, eps_out, t)
        a_prev = schedule.alpha(schedule.previous(t))
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps if i + 1 < len(schedule.timesteps) else x0
    img = model.vae.decode(x / model.vae.config.scaling_factor).sample.float()
    return ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def samples_figure(model: Any, n: int = 6, seed: int = 0, model_label: str = "reference",
                   world: str = "textured") -> Any:
    """Row 1: held-out scenes of ``world``; row 2: samples from their captions; row 3: empty-prompt samples."""
    import matplotlib.pyplot as plt

    scenes = [make_scene(s, 128, world=world) for s in heldout_scene_seeds(n, start=1000)]
    captions = [s.caption for s in scenes]
    from_captions = sample(model, captions, seed=seed)
    unconditional = sample(model, [""] * n, seed=seed + 1, guidance=1.0)
    fig, axes = plt.subplots(3, n, figsize=(2.1 * n, 7.2))
    for j in range(n):
        for i, (img, title) in enumerate(((scenes[j].image, "held-out scene"), (from_captions[j], "sample"),
                                          (unconditional[j], "empty prompt"))):
            ax = axes[i, j]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(title)
        axes[1, j].set_title(captions[j], fontsize=6, wrap=True)
    fig.suptitle(f"Samples of the reference model (DDIM 50 steps, guidance 3) · {model_label}", fontsize=9)
    fig.tight_layout()
    return fig


def loss_figure(log_path: str | Path, window: int = 50, model_label: str = "reference") -> Any:
    """Training loss (raw and running mean) and the logged evaluation metrics: one panel of
    locality (every ``locality*`` key, chance included) and one of majority-mapped pixel
    accuracy (every ``acc_*`` key: EmerDiff's readouts against nearest and bilinear)."""
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [dict(r["eval"], step=r["step"] + 1) for r in rows if isinstance(r.get("eval"), dict)]
    steps = np.array([r["step"] for r in train])
    loss = np.array([r["loss"] for r in train])
    panels = [("loss", None)]
    if evals:
        keys = sorted({k for r in evals for k, v in r.items() if isinstance(v, (int, float)) and k != "step"})
        loc = [k for k in keys if "locality" in k]
        acc = [k for k in keys if k.startswith("acc_")]
        panels += [("locality (share of the change inside its mask)", loc)] if loc else []
        panels += [("majority-mapped pixel accuracy", acc)] if acc else []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, loss, lw=0.5, alpha=0.4, label="loss")
    if len(loss) >= window:
        ax.plot(steps[window - 1:], np.convolve(loss, np.ones(window) / window, "valid"), label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("eps MSE")
    ax.set_yscale("log")
    ax.legend()
    n_scenes = evals[-1].get("scenes", 4) if evals else 0
    for ax, (title, keys) in zip(axes[0, 1:], panels[1:]):
        for key in keys:
            pts = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
            style = dict(ls="--", color="grey") if "chance" in key else dict(marker="o", ms=3)
            ax.plot(*zip(*pts), label=key.replace("locality_", "").replace("acc_", ""), **style)
        ax.set_xlabel("step")
        ax.set_title(f"{title}\nvalidation scenes ({n_scenes})", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"Reference model training · {model_label}", fontsize=9)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    from emerdiff.sd.loading import load_pipeline

    p = argparse.ArgumentParser(prog="python -m training.figures", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="reference")
    p.add_argument("--log", default=None, help="UNet-stage log.jsonl for the loss curve")
    p.add_argument("--out", default="figures")
    p.add_argument("--n", type=int, default=6)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_pipeline(args.model, device="cpu")
    from training.heldout import model_world

    fig = samples_figure(model, args.n, model_label=str(args.model), world=model_world(args.model))
    fig.savefig(out / "reference_samples.png", dpi=110)
    if args.log:
        loss_figure(args.log, model_label=str(args.model)).savefig(out / "reference_training.png", dpi=110)
    print(f"figures in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
