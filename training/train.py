"""Train the reference model on the procedural scene world, in two stages.

    # 1. the autoencoder (L1 reconstruction + a tiny KL term, on random crops)
    python -m training.train --out runs/ref --stage vae  --steps 3000 --batch 16
    # 2. the UNet and text encoder on the frozen VAE's latents (captions, 10% dropped)
    python -m training.train --out runs/ref --stage unet --steps 20000 --batch 16
    # --stop-at N checkpoints and exits after step N (sessions with a time limit);
    # --resume continues either stage from its last checkpoint;
    # --export copies runs/ref/pipeline into emerdiff/assets/weights/

SD trained its VAE first and the UNet on the frozen VAE's latents; we do the
same (no LPIPS/GAN terms: no pretrained perceptual network is reachable
offline, and the scenes are simple). Unlike SD, the text encoder has no
pretrained weights to freeze, so it is trained jointly with the UNet (as the
LDM paper's text-to-image model did with its transformer).

Reproducibility: all randomness of step ``s`` (scene seeds, crops, caption
dropout, noise, timesteps) comes from generators seeded by (seed, stage, s),
so a resumed run draws exactly what an uninterrupted run would; checkpoints
hold model, EMA, optimizer and step. On CPU a resumed run ends with
bit-identical weights.

Measured on the 2-core dev CPU, 1 thread, batch 16, loaded machine (s/step):
VAE stage (crop 64) ~3.3; UNet stage "small" ~3.6 encoding scenes on the fly,
~2.2 with --latent-pool (pool costs ~0.09 s per scene once); "base" ~8.
A scene takes ~10 ms to generate at 128 px.

Layout of ``--out``::

    args_vae.json, args_unet.json   the arguments of each stage
    vae/ckpt.pt, vae/log.jsonl      stage checkpoint, per-step losses
    vae/model/                      trained AutoencoderKL (scaling_factor set from data)
    unet/ckpt.pt, unet/log.jsonl
    unet/latent_pool.pt             optional cache of encoded scenes (--latent-pool)
    snapshot/                       pipeline folder handed to --eval-fn (overwritten)
    pipeline/                       the final diffusers folder (load_pipeline(path))
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emerdiff.assets import WEIGHTS
from emerdiff.assets.scenes import CAPTION_WORDS, WORLDS, make_scene, train_scene_seed
from emerdiff.files import write_atomic
from training.model import (
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    count_parameters,
    folder_size_mb,
    preset,
    save_reference,
)

# eval_fn(pipeline_folder, step) -> optional dict of metrics (logged); e.g. locality.
EvalFn = Callable[[Path, int], dict | None]
MAX_SHIPPED_MB = 50.0


@dataclass
class TrainArgs:
    """Arguments of one training stage (also the CLI flags)."""

    out: str
    stage: str = "unet"  # "vae" | "unet"
    preset: str = "small"
    steps: int = 1000
    batch: int = 16
    seed: int = 0
    device: str = "cpu"
    lr: float = 2e-4
    warmup: int = 200
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    ema: float = 0.999  # 0 disables the EMA copy
    caption_dropout: float = 0.1  # share of empty captions (so the empty prompt works)
    crop: int = 64  # VAE stage: training crop size (fully convolutional; used at full size)
    kl_weight: float = 1e-6
    latent_pool: int = 0  # UNet stage: >0 pre-encodes this many scenes once and samples from them
    world: str = "textured"  # scene world: "textured" (v0/v1) or "flat" (v2)
    init_from: str = ""  # UNet stage: pipeline folder whose UNet + text encoder start the training
    vae_from: str = ""  # UNet stage: take the frozen VAE from this pipeline folder (default out/vae/model)
    ckpt_every: int = 200
    log_every: int = 1
    eval_every: int = 0
    eval_fn: str = ""  # "module:function" called as fn(pipeline_folder, step)
    save_dtype: str = "auto"  # "float32" | "float16" | "auto" (float16 only if float32 exceeds 50 MB)
    amp: bool = False  # bfloat16 autocast (CUDA)
    threads: int = 0  # torch.set_num_threads; 0 leaves the default
    pool_workers: int = 0  # processes generating the latent pool's scenes (0: this process)
    pool_only: bool = False  # UNet stage: build the --latent-pool cache and exit (shared by later runs)
    time_budget: float = 0.0  # UNet stage, >0: plan --steps from the measured speed to fit this many seconds
    resume: bool = False
    stop_at: int = 0  # >0: checkpoint and stop after this step (continue later with --resume)
    export: bool = False
    progress: bool = True

    # arguments that must match when resuming (anything else may change, e.g. steps)
    FIXED = ("stage", "preset", "batch", "seed", "lr", "warmup", "weight_decay", "ema",
             "caption_dropout", "crop", "kl_weight", "latent_pool", "world", "init_from", "vae_from")


# ------------------------------------------------------------------ helpers
def step_generator(seed: int, stage: str, step: int, device: str | torch.device = "cpu") -> torch.Generator:
    """Generator for all the randomness of one step (pure function of its arguments and the device)."""
    key = hashlib.sha256(f"{seed}/{stage}/{step}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))


def lr_at(args: TrainArgs, step: int) -> float:
    """Linear warmup then cosine decay to 10 % (stateless, so resuming needs no scheduler state)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], SD's pixel range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def scene_batch(seed: int, step: int, batch: int, size: int, purpose: int = 0,
                world: str = "textured") -> tuple[torch.Tensor, list[str]]:
    """Images in [-1, 1] and captions of the training scenes of one step."""
    scenes = [make_scene(train_scene_seed(seed, step, i, purpose), size, world=world) for i in range(batch)]
    return images_to_tensor(np.stack([s.image for s in scenes])), [s.caption for s in scenes]


class EMA:
    """Exponential moving average of parameters, with the usual warmup of the decay."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self, modules: list[torch.nn.Module]) -> None:
        for p, s in zip([p for m in modules for p in m.parameters()], self.shadow):
            p.copy_(s)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)


def _save_ckpt(path: Path, state: dict) -> None:
    # atomic: an interrupted save never corrupts the last checkpoint
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def _open_log(path: Path, start: int) -> Any:
    """Append to a JSONL log, dropping entries past ``start`` (left by a run that died after its checkpoint)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", -1) < start]
        path.write_text("".join(line + "\n" for line in kept))
    return path.open("a")


def _check_resume(args: TrainArgs, saved: dict) -> None:
    # keys a checkpoint predates read as their defaults
    defaults = dataclasses.asdict(TrainArgs(out=""))
    diff = {k: (saved.get(k, defaults[k]), getattr(args, k)) for k in TrainArgs.FIXED
            if saved.get(k, defaults[k]) != getattr(args, k)}
    if diff:
        raise SystemExit(f"--resume with different settings than the checkpoint: {diff}")


def _load_eval_fn(spec: str) -> EvalFn | None:
    if not spec:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _end(args: TrainArgs) -> int:
    """Last step (exclusive) of this invocation; the schedule still runs to ``args.steps``."""
    return min(args.steps, args.stop_at) if args.stop_at > 0 else args.steps


def _progress(args: TrainArgs, start: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=args.steps, initial=start, disable=not args.progress,
                desc=f"{args.stage}", dynamic_ncols=True)


def _autocast(args: TrainArgs, device: torch.device) -> Any:
    if args.amp:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


# ------------------------------------------------------------------ VAE stage
def train_vae(args: TrainArgs) -> Path:
    """Train the AutoencoderKL; returns the folder of the trained VAE (``out/vae/model``)."""
    cfg = preset(args.preset)
    out = Path(args.out) / "vae"
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    vae = build_vae(cfg, seed=args.seed).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    start = _maybe_resume(args, out, {"vae": vae}, opt, None)
    size, crop = cfg["image_size"], min(args.crop, cfg["image_size"])
    log = _open_log(out / "log.jsonl", start)
    bar = _progress(args, start)
    for step in range(start, _end(args)):
        t0 = time.perf_counter()
        g = step_generator(args.seed, "vae", step)
        x, _ = scene_batch(args.seed, step, args.batch, size, world=args.world)
        # random crops and horizontal flips (the VAE is fully convolutional; used at full size)
        ys = torch.randint(0, size - crop + 1, (args.batch,), generator=g)
        xs = torch.randint(0, size - crop + 1, (args.batch,), generator=g)
        flip = torch.rand(args.batch, generator=g) < 0.5
        x = torch.stack([x[i, :, ys[i]:ys[i] + crop, xs[i]:xs[i] + crop] for i in range(args.batch)])
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(device)
        eps = torch.randn((args.batch, cfg["vae"]["latent_channels"], crop // _vae_factor(cfg),
                           crop // _vae_factor(cfg)), generator=g).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(args, step)
        with _autocast(args, device):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.mean + post.std * eps).sample
        rec_loss = (rec.float() - x).abs().mean()
        kl = post.kl().mean()
        loss = rec_loss + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), args.grad_clip)
        opt.step()
        _log_step(log, bar, args, step, dict(loss=loss.item(), l1=rec_loss.item(), kl=kl.item()), t0)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == _end(args):
            _save_ckpt(out / "ckpt.pt", dict(step=step + 1, args=dataclasses.asdict(args),
                                             models={"vae": vae.state_dict()}, opt=opt.state_dict()))
    bar.close()
    log.close()
    if _end(args) < args.steps:
        return out / "ckpt.pt"
    vae.eval()
    scale = latent_scaling_factor(vae, cfg, args.seed, device, world=args.world)
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(str(out / "model"), safe_serialization=True)
    return out / "model"


def _vae_factor(cfg: dict) -> int:
    return 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)


@torch.no_grad()
def latent_scaling_factor(vae: Any, cfg: dict, seed: int, device: torch.device, n: int = 64,
                          world: str = "textured") -> float:
    """1 / std of the latents of n training scenes (SD's 0.18215 was found the same way)."""
    x, _ = scene_batch(seed, 0, n, cfg["image_size"], purpose=1, world=world)
    z = torch.cat([vae.encode(x[i:i + 16].to(device)).latent_dist.mean for i in range(0, n, 16)])
    return float(1.0 / z.float().std().clamp_min(1e-6))


# ------------------------------------------------------------------ UNet stage
def load_stage_vae(args: TrainArgs, device: torch.device) -> Any:
    from diffusers import AutoencoderKL

    folder = Path(args.vae_from) / "vae" if args.vae_from else Path(args.out) / "vae" / "model"
    if not (folder / "config.json").exists():
        hint = "pass a pipeline folder" if args.vae_from else "run `--stage vae` with the same --out first"
        raise SystemExit(f"no trained VAE in {folder}: {hint}")
    return AutoencoderKL.from_pretrained(str(folder), use_safetensors=True).to(device).eval().requires_grad_(False)


def _pool_scene(job: tuple[tuple[int, ...], int, str]) -> tuple[np.ndarray, str]:
    seed, size, world = job
    scene = make_scene(seed, size, world=world)
    return scene.image, scene.caption


@torch.no_grad()
def _latent_pool(args: TrainArgs, vae: Any, cfg: dict, device: torch.device) -> dict:
    """Encode ``latent_pool`` scenes once (posterior mean and std, captions), cached on disk."""
    path = Path(args.out) / "unet" / "latent_pool.pt"
    if path.exists():
        pool = torch.load(path, weights_only=True)
        if len(pool["captions"]) == args.latent_pool and pool.get("world", "textured") == args.world:
            return pool
    jobs = [(train_scene_seed(args.seed, 0, i, purpose=2), cfg["image_size"], args.world)
            for i in range(args.latent_pool)]
    means, stds, caps = [], [], []
    with contextlib.ExitStack() as stack:
        if args.pool_workers > 0:  # same scenes in the same order: imap keeps the order
            import multiprocessing

            workers = stack.enter_context(multiprocessing.get_context("spawn").Pool(args.pool_workers))
            scenes = workers.imap(_pool_scene, jobs, chunksize=64)
        else:
            scenes = map(_pool_scene, jobs)
        step = 16 if device.type == "cpu" else 256  # CPU pools stay identical to earlier runs
        for i in range(0, args.latent_pool, step):
            chunk = [next(scenes) for _ in range(min(step, args.latent_pool - i))]
            post = vae.encode(images_to_tensor(np.stack([img for img, _ in chunk])).to(device)).latent_dist
            means.append(post.mean.cpu())
            stds.append(post.std.cpu())
            caps += [cap for _, cap in chunk]
    pool = dict(mean=torch.cat(means), std=torch.cat(stds), captions=caps, world=args.world)
    _save_ckpt(path, pool)
    return pool


def build_pool(args: TrainArgs) -> Path:
    """``--pool-only``: encode the latent pool once; runs with the same seed, world, size and VAE
    can share the file (it is checked for size and world when loaded)."""
    if args.latent_pool <= 0:
        raise SystemExit("--pool-only needs --latent-pool N")
    device = torch.device(args.device)
    (Path(args.out) / "unet").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pool = _latent_pool(args, load_stage_vae(args, device), preset(args.preset), device)
    print(f"latent pool: {len(pool['captions'])} scenes in {time.perf_counter() - t0:.1f} s")
    return Path(args.out) / "unet" / "latent_pool.pt"


def train_unet(args: TrainArgs, eval_fn: EvalFn | None = None) -> Path:
    """Train UNet + text encoder on the frozen VAE; returns the final pipeline folder."""
    from diffusers import DDPMScheduler

    from emerdiff.sd.components import SD_SCHEDULER_CONFIG

    cfg = preset(args.preset)
    out = Path(args.out) / "unet"
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    vae = load_stage_vae(args, device)
    scale = float(vae.config.scaling_factor)
    tokenizer = build_tokenizer()
    unet = build_unet(cfg, seed=args.seed).to(device).train()
    text = build_text_encoder(cfg, tokenizer, seed=args.seed + 1).to(device).train()
    if args.init_from:
        _init_from(args.init_from, unet, text)
    params = list(unet.parameters()) + list(text.parameters())
    # fused AdamW: one kernel per step on CUDA (the small model is launch-bound there)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    ema = EMA([unet, text], args.ema) if args.ema > 0 else None
    start = _maybe_resume(args, out, {"unet": unet, "text": text}, opt, ema)
    scheduler = DDPMScheduler.from_config(SD_SCHEDULER_CONFIG)  # same betas as SD
    alphas = scheduler.alphas_cumprod.to(device)
    pool = _latent_pool(args, vae, cfg, device) if args.latent_pool > 0 else None
    if pool is not None:  # on the device once, not a host copy per step
        pool = dict(pool, mean=pool["mean"].to(device), std=pool["std"].to(device))
    tokens = TokenCache(tokenizer)
    latent_hw = cfg["image_size"] // _vae_factor(cfg)
    log = _open_log(out / "log.jsonl", start)
    planner = StepPlanner(args, start, log) if args.time_budget > 0 else None
    bar = _progress(args, start)
    step = start
    while step < _end(args):
        t0 = time.perf_counter()
        g = step_generator(args.seed, "unet", step)
        if pool is None:
            x, captions = scene_batch(args.seed, step, args.batch, cfg["image_size"], world=args.world)
            with torch.no_grad():
                post = vae.encode(x.to(device)).latent_dist
                mean, std = post.mean, post.std
        else:
            idx = torch.randint(0, len(pool["captions"]), (args.batch,), generator=g)
            mean, std = pool["mean"][idx.to(device)], pool["std"][idx.to(device)]
            captions = [pool["captions"][i] for i in idx.tolist()]
        shape = (args.batch, cfg["vae"]["latent_channels"], latent_hw, latent_hw)
        # on CUDA the two big draws come from a device generator (a host draw per step costs more
        # than the step); on CPU the stream is the one every earlier run used
        g_noise = g if device.type == "cpu" else step_generator(args.seed, "unet", step, device)
        z = torch.randn(shape, generator=g_noise, device=g_noise.device).to(device)
        noise = torch.randn(shape, generator=g_noise, device=g_noise.device).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=g).to(device)
        drop = (torch.rand(args.batch, generator=g) < args.caption_dropout).tolist()
        captions = ["" if d else c for c, d in zip(captions, drop)]
        latents = (mean + std * z) * scale  # a posterior sample, scaled as SD does
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        for group in opt.param_groups:
            group["lr"] = lr_at(args, step)
        with _autocast(args, device):
            cond = text(tokens(captions).to(device))[0]  # = encode_prompts(tokenizer, text, captions)
            pred = unet(noisy, t, cond).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(step)
        _log_step(log, bar, args, step, dict(loss=loss.item()), t0)
        done = step + 1
        if planner is not None:
            planner.after(done, bar)
        if done % args.ckpt_every == 0 or done == _end(args):
            _save_ckpt(out / "ckpt.pt", dict(
                step=done, args=dataclasses.asdict(args), opt=opt.state_dict(),
                models={"unet": unet.state_dict(), "text": text.state_dict()},
                ema=ema.state_dict() if ema is not None else None))
        if eval_fn is not None and args.eval_every > 0 and (done % args.eval_every == 0 or done == args.steps):
            folder = _write_pipeline(args, Path(args.out) / "snapshot", unet, text, vae, ema, cfg, done)
            metrics = eval_fn(folder, done)
            if metrics:
                log.write(json.dumps({"step": step, "eval": metrics}, default=float) + "\n")
                log.flush()
        step = done
    bar.close()
    log.close()
    if _end(args) < args.steps:
        return out / "ckpt.pt"
    return _write_pipeline(args, Path(args.out) / "pipeline", unet, text, vae, ema, cfg, args.steps)


class TokenCache:
    """Token ids of captions, tokenized once per distinct caption (the scene world repeats them);
    the same ids the tokenizer returns for the batch."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.rows: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        new = [c for c in dict.fromkeys(captions) if c not in self.rows]
        if new:
            ids = self.tokenizer(new, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            self.rows.update(zip(new, ids))
        return torch.stack([self.rows[c] for c in captions])


class StepPlanner:
    """``--time-budget``: times the first steps (inside the warmup, whose learning rates do not
    depend on ``--steps``), then sets ``args.steps`` so the run fits the budget. The planned
    number is logged and written to the checkpoint's arguments: rerunning with ``--steps N``
    reproduces the schedule."""

    PROBE = 30  # steps timed (after WARM untimed ones: CUDA autotuning, allocator)
    WARM = 10

    def __init__(self, args: TrainArgs, start: int, log: Any):
        if args.warmup < self.WARM + self.PROBE:
            raise SystemExit(f"--time-budget needs --warmup >= {self.WARM + self.PROBE} "
                             "(the timed steps must not depend on --steps)")
        if start > 0:
            raise SystemExit("--time-budget plans a fresh run; to continue one, --resume with its --steps")
        self.args, self.log, self.t_start, self.t_probe = args, log, time.perf_counter(), 0.0

    def after(self, done: int, bar: Any) -> None:
        if done == self.WARM:
            _sync(self.args.device)
            self.t_probe = time.perf_counter()
        elif done == self.WARM + self.PROBE:
            _sync(self.args.device)
            per_step = (time.perf_counter() - self.t_probe) / self.PROBE
            left = self.args.time_budget - (time.perf_counter() - self.t_start)
            planned = done + max(0, int(left / per_step))
            self.args.steps = max(done, planned - planned % 100)  # round numbers to rerun with
            self.log.write(json.dumps(dict(step=done - 1, planned_steps=self.args.steps,
                                           sec_per_step=round(per_step, 5))) + "\n")
            self.log.flush()
            Path(self.args.out, "args_unet.json").write_text(json.dumps(dataclasses.asdict(self.args), indent=2))
            bar.total = self.args.steps
            bar.refresh()


def keep_snapshot(folder: Path, step: int) -> None:
    """An ``--eval-fn`` that keeps every snapshot's UNet and text encoder (float16, one
    safetensors file ``<out>/snapshots/step_NNNNNN.safetensors``, ~10 MB for "small") for a
    learning curve evaluated elsewhere; :func:`unpack_snapshot` turns one back into a pipeline."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    tensors = {}
    for sub, fname in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        tensors.update({f"{sub}/{k}": v.half() for k, v in load_file(folder / sub / fname).items()})
    target = folder.parent / "snapshots" / f"step_{step:06d}.safetensors"
    target.parent.mkdir(exist_ok=True)
    save_file(tensors, target, metadata={"step": str(step),
                                         "reference": (folder / "reference.json").read_text()})


def unpack_snapshot(snapshot: str | Path, base: str | Path, out: str | Path) -> Path:
    """A pipeline folder from a :func:`keep_snapshot` file: ``base`` (a pipeline of the same
    preset, e.g. the one whose VAE was frozen) with the snapshot's UNet and text encoder
    (stored as float32) and its ``reference.json``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out)
    with safe_open(str(snapshot), "pt") as f:
        meta = f.metadata()
        parts: dict[str, dict] = {"unet": {}, "text_encoder": {}}
        for key in f.keys():
            sub, _, name = key.partition("/")
            parts[sub][name] = f.get_tensor(key).float()
    for sub, fname in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        save_file(parts[sub], out / sub / fname)
    (out / "reference.json").write_text(meta["reference"])
    return out


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _init_from(folder: str, unet: Any, text: Any) -> None:
    """Start from a trained pipeline's UNet and text encoder (fine-tuning; same preset required)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    src = Path(folder)
    if not (src / "unet" / "config.json").exists():
        raise SystemExit(f"--init-from {folder}: no diffusers pipeline folder there (unet/config.json missing)")
    try:
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(str(src / "unet")).float().state_dict())
        text.load_state_dict(CLIPTextModel.from_pretrained(str(src / "text_encoder")).float().state_dict())
    except RuntimeError as err:  # shape mismatch: another preset
        raise SystemExit(f"--init-from {folder}: weights do not fit --preset {unet.config.block_out_channels}: {err}")


def _write_pipeline(args: TrainArgs, folder: Path, unet: Any, text: Any, vae: Any, ema: EMA | None,
                    cfg: dict, step: int) -> Path:
    """Save the (EMA) weights as a diffusers folder; the training weights are left untouched."""
    from copy import deepcopy

    unet_s, text_s = deepcopy(unet).eval(), deepcopy(text).eval()
    if ema is not None:
        ema.copy_to([unet_s, text_s])
    n_params = sum(count_parameters(m) for m in (unet_s, text_s, vae))
    dtype = {"float32": None, "float16": torch.float16}.get(args.save_dtype)
    if args.save_dtype == "auto":
        dtype = torch.float16 if n_params * 4 / 1e6 > MAX_SHIPPED_MB * 0.98 else None
    save_reference(folder, unet_s, vae, text_s, words=CAPTION_WORDS, dtype=dtype, extra=dict(
        step=step, preset=args.preset, world=args.world, preset_config=cfg, train_args=dataclasses.asdict(args),
        parameters=n_params, ema=args.ema > 0))
    return folder


def _maybe_resume(args: TrainArgs, out: Path, models: dict, opt: Any, ema: EMA | None) -> int:
    """Load the stage checkpoint when --resume; returns the step to start from."""
    path = out / "ckpt.pt"
    if not args.resume:
        return 0
    if not path.exists():
        print(f"--resume: no checkpoint at {path}, starting from step 0", file=sys.stderr)
        return 0
    state = torch.load(path, map_location=args.device, weights_only=True)
    _check_resume(args, state["args"])
    for name, module in models.items():
        module.load_state_dict(state["models"][name])
    opt.load_state_dict(state["opt"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    return int(state["step"])


def _log_step(log: Any, bar: Any, args: TrainArgs, step: int, values: dict, t0: float) -> None:
    sec = time.perf_counter() - t0
    if step % args.log_every == 0:
        log.write(json.dumps(dict(step=step, lr=lr_at(args, step), sec=round(sec, 4), **values)) + "\n")
        log.flush()
    bar.set_postfix(loss=f"{values['loss']:.4f}", s_step=f"{sec:.2f}")
    bar.update(1)


def export(pipeline: str | Path, target: Path = WEIGHTS) -> Path:
    """Copy a trained pipeline folder into the package (``emerdiff/assets/weights``)."""
    pipeline = Path(pipeline)
    size = folder_size_mb(pipeline)
    if size > MAX_SHIPPED_MB:
        raise SystemExit(f"{pipeline} is {size:.1f} MB, over the {MAX_SHIPPED_MB} MB the package may ship")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(pipeline, target)
    return target


# ------------------------------------------------------------------ CLI
HELP = {
    "stage": "vae: train the autoencoder; unet: train UNet + text encoder on the frozen VAE",
    "preset": "model size: small (CPU), base (SD attention pattern, GPU), tiny (tests)",
    "steps": "total steps of the stage (the LR schedule runs to this)",
    "ema": "EMA decay of the saved UNet/text weights (0: no EMA)",
    "caption_dropout": "share of captions replaced by the empty prompt",
    "crop": "VAE stage: random crop size for training",
    "latent_pool": "UNet stage: pre-encode this many scenes once and sample batches from them",
    "world": "scene world: textured (reference v0/v1) or flat (v2)",
    "init_from": "UNet stage: pipeline folder whose UNet and text encoder start training (fine-tuning)",
    "vae_from": "UNet stage: pipeline folder whose VAE is used frozen (instead of out/vae/model)",
    "ckpt_every": "checkpoint every N steps (and at the end)",
    "eval_every": "call --eval-fn every N steps on a snapshot pipeline folder",
    "eval_fn": "module:function called as fn(pipeline_folder, step) -> dict of metrics (logged)",
    "save_dtype": "weights dtype of the written pipeline: float32, float16 or auto",
    "amp": "bfloat16 autocast (CUDA)",
    "threads": "torch.set_num_threads (0: leave the default)",
    "pool_workers": "processes that generate the --latent-pool scenes (0: in this process; same scenes)",
    "pool_only": "UNet stage: build the --latent-pool cache (out/unet/latent_pool.pt) and exit",
    "time_budget": "UNet stage: time the first steps, then set --steps to fit this many seconds "
                   "(logged as planned_steps; needs --warmup >= 40)",
    "resume": "continue the stage from out/<stage>/ckpt.pt",
    "stop_at": "checkpoint and exit after this step; continue later with --resume",
    "export": "after the UNet stage, copy out/pipeline into emerdiff/assets/weights",
}


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainArgs(out="")
    for f in dataclasses.fields(TrainArgs):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "out":
            p.add_argument(flag, required=True, help="run folder (checkpoints, logs, final pipeline)")
        elif f.name == "progress":
            p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
        elif isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=HELP.get(f.name))
        elif f.name == "stage":
            p.add_argument(flag, choices=["vae", "unet"], default=default, help=HELP["stage"])
        elif f.name == "world":
            p.add_argument(flag, choices=list(WORLDS), default=default, help=HELP["world"] + f" (default: {default})")
        else:
            p.add_argument(flag, type=type(default), default=default,
                           help=(HELP.get(f.name, "") + f" (default: {default})").strip())
    return TrainArgs(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None, eval_fn: EvalFn | None = None) -> Path:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes every step
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"args_{args.stage}.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    if args.stage == "vae":
        result = train_vae(args)
    elif args.pool_only:
        result = build_pool(args)
    else:
        result = train_unet(args, eval_fn=eval_fn or _load_eval_fn(args.eval_fn))
        if args.export and result.name != "ckpt.pt":
            print(f"exported to {export(result)}")
    print(f"done: {result}")
    return result


if __name__ == "__main__":
    main()
