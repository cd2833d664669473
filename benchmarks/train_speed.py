"""CPU speed levers for training the reference model's UNet (issue 13): one table, ratios
against the baseline (1 thread, fp32, batch 16) measured in the same process.

    python benchmarks/train_speed.py [--preset small] [--steps 4] [--compile]

Each variant runs ``--warmup`` untimed steps, then ``--steps`` timed ones, of the UNet
stage's real work (text encoder + UNet forward, eps-MSE loss, backward, AdamW step) on
random latents; the median step time is reported. Variants: torch threads, bfloat16
autocast, channels_last memory format, the same batch as 2 x 8 with gradient
accumulation, and (``--compile``) torch.compile.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Any

import torch

from training.model import build_text_encoder, build_tokenizer, build_unet, encode_prompts, preset


def _setup(preset_name: str, channels_last: bool, compile_unet: bool) -> tuple[Any, Any, Any, Any]:
    cfg = preset(preset_name)
    tokenizer = build_tokenizer()
    unet = build_unet(cfg, seed=0).train()
    text = build_text_encoder(cfg, tokenizer, seed=1).train()
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(list(unet.parameters()) + list(text.parameters()), lr=1e-4)
    model = torch.compile(unet) if compile_unet else unet
    return cfg, tokenizer, (model, text), opt


def time_variant(preset_name: str, batch: int, threads: int, bf16: bool = False, channels_last: bool = False,
                 accumulate: int = 1, compile_unet: bool = False, steps: int = 4, warmup: int = 1) -> float:
    """Median seconds per optimizer step (``batch`` samples, split into ``accumulate`` micro-batches)."""
    torch.set_num_threads(threads)
    cfg, tokenizer, (unet, text), opt = _setup(preset_name, channels_last, compile_unet)
    hw = cfg["unet"]["sample_size"]
    g = torch.Generator().manual_seed(0)
    micro = batch // accumulate
    captions = ["two balls on grass under sky", ""] * (micro // 2) + [""] * (micro % 2)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for _ in range(accumulate):
            x = torch.randn(micro, 4, hw, hw, generator=g)
            noise = torch.randn(micro, 4, hw, hw, generator=g)
            t = torch.randint(0, 1000, (micro,), generator=g)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with ctx:
                pred = unet(x, t, encode_prompts(tokenizer, text, captions)).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise) / accumulate
            loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="model size preset (default: small)")
    p.add_argument("--batch", type=int, default=16, help="samples per optimizer step (default: 16)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant (default: 4)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant (default: 1)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on CPU)")
    args = p.parse_args(argv)
    cores = torch.get_num_threads()
    variants: list[tuple[str, dict[str, Any]]] = [
        ("1 thread, fp32 (baseline)", dict(threads=1)),
        (f"{cores} threads, fp32", dict(threads=cores)),
        (f"{cores} threads, bf16 autocast", dict(threads=cores, bf16=True)),
        (f"{cores} threads, channels_last", dict(threads=cores, channels_last=True)),
        (f"{cores} threads, 2 x {args.batch // 2} accumulated", dict(threads=cores, accumulate=2)),
        ("1 thread, bf16 autocast", dict(threads=1, bf16=True)),
    ]
    if args.compile:
        variants.append((f"{cores} threads, torch.compile", dict(threads=cores, compile_unet=True)))
    print(f"preset {args.preset}, batch {args.batch}, median of {args.steps} steps, torch {torch.__version__}")
    print("| variant | s/step | speed vs baseline |")
    print("|---|---|---|")
    base = None
    for name, kw in variants:
        sec = time_variant(args.preset, args.batch, steps=args.steps, warmup=args.warmup, **kw)
        base = base or sec
        print(f"| {name} | {sec:.2f} | {base / sec:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
