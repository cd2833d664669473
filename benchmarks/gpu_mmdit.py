"""Issue 28's GPU rows: seconds per SD3-medium / FLUX.1-dev transformer call with random weights, and what that
makes one EmerDiff segmentation cost, on one device.

The released architectures (``emerdiff.sd.mmdit.SD3_MEDIUM_TRANSFORMER_CONFIG``, ``FLUX_DEV_TRANSFORMER_CONFIG``)
are built directly on the device with random weights (no weights are reachable), cast to bf16, and called through
``mmdit_forward`` under EmerDiff's own attention processors, as the pipeline calls them, with the empty-prompt
conditioning's token counts. Speed does not depend on the weights' values, so these rows stand for the real models'
speed; nothing here says anything about segment quality. Each row: median of ``--reps`` timed calls after one
warm-up, CUDA-synchronised; TFLOP/s from the FLOP count of ``flops_mmdit.py`` (meta device, same processors).

    python3 benchmarks/gpu_mmdit.py --out OUT            # on the lease (scripts/gpu_issue28.sh)
    .venv/bin/python benchmarks/gpu_mmdit.py --smoke     # this CPU: tiny configs, the same code path

Writes ``issue28_mmdit.md`` / ``.json`` under ``--out`` (after each row, so a run cut short keeps what finished).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Small configs of the same classes for the CPU smoke run (shapes only; timings meaningless).
SMOKE_CONFIGS: dict[str, dict[str, Any]] = {
    "sd3": dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
                pos_embed_max_size=32),
    "flux": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                 axes_dims_rope=(2, 2, 4)),
}
NAMES = {"sd3": "SD3-medium", "flux": "FLUX.1-dev"}
# One segmentation at K = 25 (docs/PORTING.md, "Cost"): 2K + 1 runs through the steps at and after the
# placeholder t_m, plus the inversion's batch-1 calls over the whole schedule (50 steps).
RUNS = 51
STEPS_AFTER_TM = {"sd3": 11, "flux": 15}
INVERSION_CALLS = 50


def build(family: str, device: str, dtype: torch.dtype, smoke: bool) -> SimpleNamespace:
    """The transformer with random weights on ``device`` and the empty-prompt conditioning's shapes."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from emerdiff.sd import mmdit

    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    config = SMOKE_CONFIGS[family] if smoke else (mmdit.SD3_MEDIUM_TRANSFORMER_CONFIG if family == "sd3"
                                                  else mmdit.FLUX_DEV_TRANSFORMER_CONFIG)
    with torch.device(device):  # initialised where it runs: a 12B model initialised on a CPU takes minutes
        transformer = cls(**config).to(dtype).eval()
    c = transformer.config
    if smoke:
        text = 8
    else:
        text = 77 + mmdit.T5_MAX_LENGTH["sd3"] if family == "sd3" else mmdit.T5_MAX_LENGTH["flux"]
    return SimpleNamespace(family=family, unet=transformer, guidance=mmdit.FLUX_GUIDANCE, config=config,
                           empty_embedding=torch.zeros(1, text, c.joint_attention_dim, device=device, dtype=dtype),
                           empty_pooled=torch.zeros(1, c.pooled_projection_dim, device=device, dtype=dtype))


def time_call(model: SimpleNamespace, batch: int, latent: int, reps: int, device: str) -> tuple[float, float]:
    """(median seconds per call, peak memory GiB) of one transformer call on a (batch, 16, latent, latent) input."""
    from emerdiff.method.attention import AttentionController, controlled_attention
    from emerdiff.sd import mmdit

    x = torch.randn(batch, 16, latent, latent, device=device, dtype=model.empty_embedding.dtype)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    times = []
    with torch.no_grad(), controlled_attention(model.unet, AttentionController()):
        for i in range(reps + 1):
            sync()
            t0 = time.perf_counter()
            mmdit.mmdit_forward(model, x, 500)  # type: ignore[arg-type]
            sync()
            if i:  # the first call warms kernels and allocator up
                times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return statistics.median(times), peak


def _gib(value: float) -> str:
    return "n/a" if value != value else f"{value:.1f}"  # NaN: no CUDA memory counter on the CPU


def write(out: Path, rows: list[dict[str, Any]], header: str) -> None:
    lines = [header, "",
             "| model | image px | batch | s per call | TFLOP per call | TFLOP/s | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['resolution']} | {r['batch']} | failed: {r['error']} | | | |")
            continue
        lines.append(f"| {r['model']} | {r['resolution']} | {r['batch']} | {r['seconds']:.3f} | {r['tflop']:.2f} | "
                     f"{r['tflops']:.0f} | {_gib(r['peak_gib'])} |")
    est = [r for r in rows if r.get("estimate_s") is not None]
    if est:
        lines += ["", "One segmentation at 512 px, K = 25 (51 runs x steps after the placeholder t_m at the batched "
                  "call's speed, plus 50 batch-1 inversion calls; decoding and k-means not counted):", ""]
        lines += [f"- {r['model']}: {r['estimate_s']:.1f} s" for r in est]
    out.mkdir(parents=True, exist_ok=True)
    (out / "issue28_mmdit.md").write_text("\n".join(lines) + "\n")
    (out / "issue28_mmdit.json").write_text(json.dumps(rows, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_out", help="folder for issue28_mmdit.md/.json")
    parser.add_argument("--smoke", action="store_true", help="tiny configs on this CPU (checks the code path)")
    parser.add_argument("--families", nargs="+", default=["sd3", "flux"], choices=["sd3", "flux"])
    parser.add_argument("--batch", type=int, default=17, help="the batched call's batch (the pipeline's max_batch)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    from flops_mmdit import transformer_flops

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    header = (f"### Issue 28: SD3 / FLUX transformer calls, random weights, {str(dtype).replace('torch.', '')}, "
              f"{name}" + (" (SMOKE: tiny configs, timings meaningless)" if args.smoke else ""))
    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    for family in args.families:
        try:
            model = build(family, device, dtype, args.smoke)
        except Exception as err:  # e.g. out of memory: the other family still runs
            rows.append(dict(model=NAMES[family], resolution="-", batch="-", error=f"{type(err).__name__}: {err}"))
            write(out, rows, header)
            continue
        per_call: dict[tuple[int, int], float] = {}
        sizes = (64, 32) if args.smoke else (1024, 512)
        for resolution, batch in ((sizes[0], 1), (sizes[1], 1), (sizes[1], args.batch)):
            row: dict[str, Any] = dict(model=NAMES[family], family=family, resolution=resolution, batch=batch)
            try:
                seconds, peak = time_call(model, batch, resolution // 8, args.reps, device)
                flop = transformer_flops(family, resolution, model.config) * batch
                row.update(seconds=seconds, peak_gib=peak, tflop=flop / 1e12, tflops=flop / 1e12 / seconds)
                per_call[(resolution, batch)] = seconds
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {str(err)[:120]}"
            rows.append(row)
            write(out, rows, header)
        if (sizes[1], args.batch) in per_call and (sizes[1], 1) in per_call:
            batched = per_call[(sizes[1], args.batch)] / args.batch  # seconds per run when batched
            rows[-1]["estimate_s"] = (RUNS * STEPS_AFTER_TM[family] * batched
                                      + INVERSION_CALLS * per_call[(sizes[1], 1)])
            write(out, rows, header)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    print((out / "issue28_mmdit.md").read_text())
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
