"""`emerdiff` command line: segment images, list layers, evaluate, make figures."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .files import FileSet, write_atomic  # noqa: F401  (write_atomic: kept importable from here)

EPILOG = """examples:
  emerdiff layers tiny
  emerdiff segment photo.jpg --model ./stable-diffusion-v1-5 --out results/
  emerdiff segment a.png b.png --model tiny --k 8 --resolution 256 --out results/
models: a local diffusers folder, a hub id (needs network or the HF cache;
HF_HUB_OFFLINE=1 forbids the network), 'tiny' (random, for tests) or 'reference'."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="diffusers folder, hub id, 'tiny' or 'reference' (default: tiny)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--offline", action="store_true", help="never contact the hub (same as HF_HUB_OFFLINE=1)")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    from .config import EmerDiffConfig

    d = EmerDiffConfig()
    g = p.add_argument_group("method settings (defaults: the paper's)")
    g.add_argument("--k", type=int, default=d.num_clusters, help=f"number of k-means segments K (default {d.num_clusters})")
    g.add_argument("--resolution", type=int, default=d.resolution, help=f"model input size (default {d.resolution})")
    g.add_argument("--query-layer", default=d.query_layer, help="attention layer whose queries are clustered")
    g.add_argument("--feature-timestep", type=int, default=d.feature_timestep)
    g.add_argument("--modulation-layer", default=d.modulation_layer, help="attention layer that is perturbed")
    g.add_argument("--modulation-timestep", type=int, default=d.modulation_timestep)
    g.add_argument("--strength", type=float, default=d.modulation_strength, help="lambda (default 10)")
    g.add_argument("--no-injection", action="store_true", help="do not share attention with the reference run")
    g.add_argument("--steps", type=int, default=d.num_inference_steps, help="schedule length (default 50)")
    g.add_argument("--readout-steps", type=int, default=None, help="reduced-step readout after the modulation")
    g.add_argument("--blur-sigma", type=float, default=d.blur_sigma)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--max-batch", type=int, default=d.max_batch, help="UNet batch of the modulated runs")


def config_from_args(args: argparse.Namespace) -> Any:
    from .config import EmerDiffConfig

    return EmerDiffConfig(
        num_clusters=args.k, resolution=args.resolution, query_layer=args.query_layer,
        feature_timestep=args.feature_timestep, modulation_layer=args.modulation_layer,
        modulation_timestep=args.modulation_timestep, modulation_strength=args.strength,
        attention_injection=not args.no_injection, num_inference_steps=args.steps,
        readout_steps=args.readout_steps, blur_sigma=args.blur_sigma, seed=args.seed,
        max_batch=args.max_batch, device=args.device, dtype=args.dtype,
    )


def load_model_from_args(args: argparse.Namespace) -> Any:
    from .models import load_pipeline

    return load_pipeline(args.model, device=args.device, dtype=args.dtype,
                         local_files_only=True if args.offline else None)


def cmd_layers(args: argparse.Namespace) -> int:
    from .models import layer_table

    model = load_model_from_args(args)
    latent = args.resolution // model.vae_scale_factor if args.resolution else None
    rows = layer_table(model.unet, latent)
    print(f"{'layer':58s} {'kind':5s} {'block':13s} {'grid':>7s} {'channels':>8s} {'heads':>5s}")
    for r in rows:
        print(f"{r['layer']:58s} {r['kind']:5s} {r['block']:13s} {r['resolution']:>7s} {r['channels']:8d} {r['heads']:5d}")
    return 0


def _output_set(out_dir: Path, stem: str) -> FileSet:
    """The outputs of one image; ``STEM.npz`` is renamed into place last, so it marks a complete set."""
    return FileSet(out_dir / f"{stem}.npz")


def save_outputs(seg: Any, image: Any, out_dir: Path, stem: str, files: FileSet | None = None) -> list[Path]:
    """Label PNG (indexed palette), overlay PNG and .npz, written atomically as one set.

    With ``files`` the outputs are only staged there (the caller adds more and commits).
    """
    from PIL import Image

    from .viz import label_png, overlay

    own = files is None
    files = _output_set(out_dir, stem) if files is None else files
    rgb = image.permute(1, 2, 0).numpy()
    paths = [files.add(out_dir / f"{stem}_labels.png", lambda p: label_png(seg.labels).save(p, format="PNG"))]
    over = (overlay(rgb, seg.labels) * 255).astype(np.uint8)
    paths.append(files.add(out_dir / f"{stem}_overlay.png", lambda p: Image.fromarray(over).save(p, format="PNG")))

    def write_npz(p: str) -> None:
        with open(p, "wb") as f:
            seg.save_npz(f)

    paths.append(files.add(out_dir / f"{stem}.npz", write_npz))
    if own:
        files.commit()
    return paths


def save_openvocab(labeller: Any, seg: Any, image: Any, vocabulary: list[str], out_dir: Path, stem: str,
                   model_name: str, files: FileSet | None = None) -> list[Path]:
    """Class map (indexed PNG), class names (JSON) and a legend figure, written atomically.

    With ``files`` they join that image's output set (committed by the caller).
    """
    from .viz import label_png

    own = files is None
    files = FileSet(out_dir / f"{stem}_classes.json") if files is None else files
    result = labeller.label(image, seg, vocabulary)
    paths = [files.add(out_dir / f"{stem}_classes.png", lambda p: label_png(result.class_map).save(p, format="PNG"))]
    info = dict(vocabulary=vocabulary, mask_classes=result.mask_classes.tolist(),
                mask_scores=result.mask_scores.round(4).tolist(), labeller=type(labeller).__name__)
    paths.append(files.add(out_dir / f"{stem}_classes.json", lambda p: Path(p).write_text(json.dumps(info, indent=1))))
    from .openvocab import legend_figure

    fig = legend_figure(image, result, title=f"{type(labeller).__name__} on {model_name}")
    import matplotlib.pyplot as plt

    try:
        paths.append(files.add(out_dir / f"{stem}_legend.png", lambda p: fig.savefig(p, format="png", dpi=100)))
    finally:
        plt.close(fig)
    if own:
        files.commit()
    return paths


def cmd_segment(args: argparse.Namespace) -> int:
    from .images import ImageError, load_image
    from .pipeline import EmerDiff

    from .files import check_output_dir, clean_stale_temps, unique_stems
    from .models import model_geometry

    config = config_from_args(args)
    try:
        # everything checkable without the model, before the (slow) load and before any write
        config.check_for_segmentation()
        geometry = model_geometry(args.model)
        if geometry is not None:
            config.check_resolution(*geometry)
        check_output_dir(Path(args.out))
        model = load_model_from_args(args)
        segmenter = EmerDiff(model, config)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    labeller, vocabulary = None, None
    if args.vocab:
        from .openvocab import CLIPMaskLabeller, CrossAttentionLabeller, check_vocabulary

        try:
            vocabulary = check_vocabulary(args.vocab)
            if args.labeller == "clip":
                labeller = CLIPMaskLabeller(args.clip_model, device=args.device,
                                            local_files_only=True if args.offline else None)
            else:
                labeller = CrossAttentionLabeller(model, resolution=config.resolution, seed=config.seed)
        except (ValueError, RuntimeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    out = Path(args.out)
    for leftover in clean_stale_temps([out]):
        print(f"removed {leftover.name}, a temp file left by an interrupted run", file=sys.stderr)
    stems = unique_stems(args.images)
    failed = 0
    for item, stem in zip(args.images, stems):
        if stem != Path(item).stem:
            print(f"{item}: another input is also named {Path(item).stem}; writing {stem}_* for this one",
                  file=sys.stderr)
        try:
            image = load_image(item)
            seg = segmenter.segment(image, progress=not args.quiet)
        except (ImageError, ValueError) as err:
            failed += 1
            print(f"skipped {item}: {err}", file=sys.stderr)
            continue
        files = _output_set(out, stem)
        try:
            paths = save_outputs(seg, image, out, stem, files)
            if labeller is not None:
                paths += save_openvocab(labeller, seg, image, vocabulary, out, stem, model.source, files)
            files.commit()
        except BaseException:
            files.abort()
            raise
        print(f"{item}: {seg.num_segments} segments, {seg.timings['total']:.1f} s -> {', '.join(map(str, paths))}")
    if failed:
        print(f"{failed} of {len(args.images)} image(s) failed", file=sys.stderr)
    return 1 if failed else 0


# Notebook sizes per model (mirrors the Makefile's FIG_SIZE).
FIGURE_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(resolution=128, K=4, num_inference_steps=10, modulation_timestep=201, blur_sigma=1.0),
    "reference": dict(resolution=128, K=8, num_inference_steps=50, modulation_timestep=281, blur_sigma=1.0),
    "default": dict(resolution=512, K=25, num_inference_steps=50, modulation_timestep=281, blur_sigma=4.0),
}


def figure_sizes(model: str) -> dict[str, Any]:
    """Notebook sizes for a model name or folder: a folder whose native image size (UNet
    sample_size x VAE factor, read from the configs without loading weights) is <= 128 px is
    sized like the reference model; everything else gets the paper's 512 px settings."""
    if model in FIGURE_SIZES:
        return dict(FIGURE_SIZES[model])
    folder = Path(model)
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        native = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return dict(FIGURE_SIZES["default"])  # hub ids and unreadable folders: the paper's sizes
    return dict(FIGURE_SIZES["reference" if native <= 128 else "default"])


def cmd_figures(args: argparse.Namespace) -> int:
    """Run the study notebooks with papermill; each writes its figures into --out."""
    import papermill

    folder = Path(args.notebooks)
    notebooks = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if any(nb.stem.startswith(o) for o in args.only)]
    if not notebooks:
        print(f"error: no study notebooks (NN_name.ipynb) in {folder}", file=sys.stderr)
        return 2
    params: dict[str, Any] = figure_sizes(args.model)
    params.update(model=args.model, device=args.device, output_dir=str(Path(args.out).resolve()))
    for key, value in args.param or []:
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    executed = Path(args.executed)
    executed.mkdir(parents=True, exist_ok=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for nb in notebooks:
        print(f"running {nb.name} ...", file=sys.stderr)
        papermill.execute_notebook(str(nb), str(executed / nb.name), parameters=params,
                                   kernel_name=args.kernel, log_output=False, progress_bar=False)
    print(f"figures in {args.out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emerdiff",
        description="Training-free pixel-level segmentation from a frozen Stable Diffusion (EmerDiff, ICLR 2024).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("segment", help="segment images: label PNG, overlay PNG and .npz per image",
                       description="Segment each IMAGE and write IMAGE_labels.png (indexed palette), "
                       "IMAGE_overlay.png and IMAGE.npz into --out. A bad image is reported and skipped; "
                       "the exit code is 1 if any image failed.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", default="emerdiff_out", help="output folder (default: emerdiff_out)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--vocab", default=None,
                   help="comma-separated class names: also write a class map + legend (open vocabulary)")
    p.add_argument("--labeller", choices=["clip", "unet"], default="clip",
                   help="clip: MaskCLIP features pooled in masks; unet: the diffusion model's own "
                   "cross-attention (no extra model) (default: clip)")
    p.add_argument("--clip-model", default="openai/clip-vit-base-patch16", help="CLIP hub id or folder")
    _add_model_args(p)
    _add_config_args(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("layers", help="list every attention layer with kind, block and token grid",
                       description="List the attention layers of MODEL's UNet, to pick probe layers.")
    p.add_argument("model", help="diffusers folder, hub id, 'tiny' or 'reference'")
    p.add_argument("--resolution", type=int, default=None, help="image size for the grid column (default: the UNet's sample size x 8)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--offline", action="store_true")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("figures", help="run the study notebooks (papermill) and write every figure",
                       description="Run notebooks/NN_*.ipynb top to bottom with papermill (what `make "
                       "figures` does, without the Make dependency tracking). A failing cell stops "
                       "with that cell's error.")
    p.add_argument("--model", default="reference", help="model for every notebook (default: reference)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="figures", help="figure folder (default: figures)")
    p.add_argument("--notebooks", default="notebooks", help="folder of the study notebooks")
    p.add_argument("--executed", default="notebooks/executed", help="where executed copies go")
    p.add_argument("--only", nargs="*", help="notebook name prefixes to run, e.g. 00 04")
    p.add_argument("--kernel", default="python3", help="Jupyter kernel (default: python3; `make setup` "
                   "also registers 'emerdiff')")
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="override a notebook parameter (JSON value), repeatable")
    p.set_defaults(func=cmd_figures)

    from .evaluation_run import add_parser as add_evaluate_parser

    add_evaluate_parser(sub)
    return parser
    evaluation_run.add_parser(sub)
    evaluate = sub.choices["evaluate"]
    if evaluate.get_default("func") is None:
        evaluate.set_defaults(func=evaluation_run.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a clear one-line error for known failures
        from .images import ImageError
        from .models import ModelLoadError

        if isinstance(err, (ModelLoadError, ImageError, ValueError)):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
