"""`emerdiff` command line: segment images, list layers, evaluate, make figures."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from emerdiff.cli.options import (  # noqa: F401
    DEBUG_ENV,
    DEBUG_FLAG,
    DEFAULT_LABELLER,
    add_config_args,
    add_labeller_args,
    add_threads_arg,
    config_from_args,
    debug_requested,
    error_hint,
    one_line,
    pop_debug_flag,
    quiet_libraries,
    run_guarded,
    settings_line,
)
from emerdiff.cli.outputs import (  # noqa: F401  (re-exported: the output-set names, issue 24)
    IDS_SUFFIX,
    MAPS_SUFFIXES,
    OUTPUT_SUFFIXES,
    VOCAB_SUFFIXES,
    check_targets,
    output_paths,
    output_set,
    save_openvocab,
    save_outputs,
)
from emerdiff.files import FileSet, check_output_file, write_atomic  # noqa: F401  (write_atomic: kept importable)

EPILOG = """examples:
  emerdiff segment photo.jpg                 # the reference model, sized for it (128 px, K 8)
  emerdiff segment photo.jpg --model ./stable-diffusion-v1-5 --out results/   # 512 px, K 25
  emerdiff segment a.png b.png --model tiny --num-clusters 8 --resolution 256 --out results/
  emerdiff segment photo.jpg --save-maps     # + every mask's difference map (npz) and a contact sheet
  emerdiff refine photo.jpg --masks sam_labels.png   # your segments (any source) at pixel level
  emerdiff layers reference
models: 'reference' (the project's own small trained model, the default), a local
diffusers folder, a hub id (needs network or the HF cache; HF_HUB_OFFLINE=1 forbids
the network) or 'tiny' (random weights, for tests). The settings (resolution,
num_clusters, schedule, t_m, blur, batch) are the model's preset (emerdiff.config.PRESETS,
the same as EmerDiffConfig.for_model) unless given: see `emerdiff segment --help`."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="reference",
                   help="'reference' (the project's small trained model), a diffusers folder, a hub id or "
                   "'tiny' (random weights) (default: reference)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="weights dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--offline", action="store_true",
                   help="never contact the hub, same as HF_HUB_OFFLINE=1 (default: off)")
    add_threads_arg(p)


def _add_output_args(p: argparse.ArgumentParser) -> None:
    """--out, --quiet, --vocab and --save-maps: one definition for `segment` and `refine`."""
    p.add_argument("--out", default="emerdiff_out", help="output folder (default: emerdiff_out)")
    p.add_argument("--quiet", action="store_true",
                   help="no settings line, no per-image line, no progress or weight-loading bars (default: off)")
    p.add_argument("--vocab", default=None,
                   help="comma-separated class names: also write a class map + legend (open vocabulary) "
                   "(default: none)")
    p.add_argument("--save-maps", action="store_true",
                   help="also write NAME_maps.npz (every mask's difference map, float16, with the mask ids, "
                   "low-res masks and config) and NAME_maps.png (one tile per mask: outline + map) "
                   "(default: off)")


def load_model_from_args(args: argparse.Namespace) -> Any:
    from emerdiff.sd.loading import load_pipeline

    if getattr(args, "quiet", False):  # here, not in main: --help and refusals import no diffusers (issue 25)
        quiet_libraries()
    return load_pipeline(args.model, device=args.device, dtype=args.dtype,
                         local_files_only=True if args.offline else None)


def cmd_layers(args: argparse.Namespace) -> int:
    from emerdiff.config import EmerDiffConfig
    from emerdiff.sd.loading import default_layers, layer_table, model_geometry, unet_downsampling

    if args.resolution is not None:  # segment's rule: refused before the load if the configs are on disk
        config = EmerDiffConfig.for_model(args.model, resolution=args.resolution)
        config.check_values()
        geometry = model_geometry(args.model)
        if geometry is not None:
            config.check_resolution(*geometry)
    model = load_model_from_args(args)
    latent = None
    if args.resolution is not None:
        config.check_resolution(model.vae_scale_factor, unet_downsampling(model.unet.config))
        latent = args.resolution // model.vae_scale_factor
    rows = layer_table(model.unet, latent)
    print(f"{'layer':58s} {'kind':5s} {'block':13s} {'grid':>7s} {'channels':>8s} {'heads':>5s}")
    for r in rows:
        print(f"{r['layer']:58s} {r['kind']:5s} {r['block']:13s} {r['resolution']:>7s} {r['channels']:8d} {r['heads']:5d}")
    query, modulation = default_layers(model.unet)
    rule = ("placeholder blocks chosen without real weights, see docs/PORTING.md; probe them"
            if model.family in ("sd3", "flux") else  # MMDiT (issue 28)
            "first and last cross-attention of the lowest-resolution decoder block")
    print(f"{model.family} defaults ({rule}): query_layer {query}, modulation_layer {modulation}")
    return 0


# Label maps with more distinct values than this are photos or anti-aliased drawings, not segments.
MAX_LABELS = 1024
_GREY_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N")


def read_label_map(path: str | Path, option: str = "--masks") -> np.ndarray:
    """A label PNG (or any image file) -> (h, w) int64 segment ids, at the file's own size.

    Indexed-palette PNGs (what ``segment`` writes) and 8/16-bit greyscale give their pixel
    values; an RGB(A) image is colour-coded: each distinct colour is one segment (ids in
    increasing colour order; a grey RGB image keeps its grey values). Raises ValueError
    for a missing, empty, corrupt or non-label file, naming the fix.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise ValueError(f"{option} {p} does not exist; pass a label PNG (pixel value or colour = segment)")
    if p.is_dir():
        raise ValueError(f"{option} {p} is a folder; pass a label PNG file")
    if p.stat().st_size == 0:
        raise ValueError(f"{option} {p} is empty (0 bytes); re-export the label map")
    try:
        with Image.open(p) as img:
            img.load()
            mode = img.mode
            if mode == "P" or mode in _GREY_MODES:
                arr = np.asarray(img).astype(np.int64)
            elif mode == "LA":
                arr = np.asarray(img.getchannel("L")).astype(np.int64)
            elif mode == "F":
                arr = np.asarray(img, np.float64)
                if not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
                    raise ValueError(f"{option} {p}: a float label map must hold whole numbers (segment ids)")
                arr = arr.astype(np.int64)
            else:  # colour-coded: one segment per colour; alpha is not a segment
                rgb = np.asarray(img.convert("RGB")).astype(np.int64)
                if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
                    arr = rgb[..., 0]
                else:
                    arr = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2], return_inverse=True)[1]
                    arr = arr.reshape(rgb.shape[:2])
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read {option} {p} as an image ({type(err).__name__}: {err}); the file is corrupt, "
                         "truncated or not an image; a label PNG is expected") from err
    n = len(np.unique(arr))
    if n > MAX_LABELS:
        raise ValueError(f"{option} {p} has {n} distinct values, more than {MAX_LABELS}: it looks like a photo or "
                         "an anti-aliased drawing, not a label map; save one value (or one flat colour) per segment")
    return arr


def check_label_aspect(labels_shape: tuple[int, int], image_size: tuple[int, int], name: str = "--masks") -> None:
    """Refuse a label map whose aspect ratio is not the image's (within one label pixel), unless it is
    square: the model's own square view, like ``segment``'s low-resolution labels (any size)."""
    h, w = labels_shape
    H, W = image_size
    if h == w or abs(w - h * W / H) <= max(1.0, 0.01 * w) or abs(h - w * H / W) <= max(1.0, 0.01 * h):
        return
    raise ValueError(f"{name} is {w}x{h} (aspect {w / h:.3g}) but the image is {W}x{H} (aspect {W / H:.3g}); "
                     "a label map must cover the image with its aspect ratio at any resolution (e.g. "
                     f"{W}x{H} or {max(1, round(16 * W / H))}x16), or be square (the model's view)")


def cmd_segment(args: argparse.Namespace) -> int:
    return _segment_images(args, [(item, None) for item in args.images])


def cmd_refine(args: argparse.Namespace) -> int:
    """`emerdiff refine IMAGE --masks LABELS.png`: EmerDiff.refine with segments from a file.

    The output labels are numbered 0..K-1 like `segment`'s; ``IMAGE_ids.json`` maps each back to its id
    in ``--masks`` and lists the ids that won no token of the grid (a segment smaller than a token). A
    map with more segments than the grid has tokens is refused before any work: some would be dropped.
    """
    from emerdiff.sd.images import ImageError, load_image

    try:  # both files checked before the (slow) model load
        labels = read_label_map(args.masks)
        check_label_aspect(labels.shape, tuple(load_image(args.image).shape[1:]))
    except (ImageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return _segment_images(args, [(args.image, labels)], refine_segments=len(np.unique(labels)))


def mask_ids(lowres_labels: np.ndarray, masks: np.ndarray) -> tuple[list[int], list[int]]:
    """Refine's way back to the user's ids: for each segment 0..K-1 on the token grid, the id of
    ``masks`` covering most of it (the grid brought to the map's size by nearest neighbour); and the
    ids of ``masks`` that no segment carries (they won no token: smaller than one)."""
    from emerdiff.sd.images import resize_labels

    grid = resize_labels(lowres_labels, masks.shape)
    values, inverse = np.unique(masks, return_inverse=True)
    k = int(lowres_labels.max()) + 1
    counts = np.zeros((k, len(values)), dtype=np.int64)
    np.add.at(counts, (grid.ravel(), inverse.ravel()), 1)
    ids = [int(values[i]) for i in counts.argmax(1)]
    return ids, sorted(int(v) for v in set(values.tolist()) - set(ids))


def _refine_grid_check(model: Any, config: Any, refine_segments: int, masks: str) -> Any:
    """The config for refine (K = the number of segments in --masks); refused if the query grid has
    fewer tokens than --masks has segments (each segment needs a token, or it would be dropped)."""
    from emerdiff.sd.loading import feature_resolution

    h, w = feature_resolution(model.unet, config.query_layer, config.resolution // model.vae_scale_factor)
    if refine_segments > h * w:
        raise ValueError(f"--masks {masks} has {refine_segments} segments but the query layer's grid holds only {h * w} "
                         f"tokens ({h}x{w} at resolution {config.resolution}): every segment needs a token, so "
                         f"{refine_segments - h * w} or more would be dropped; merge segments to at most {h * w}, "
                         "or raise --resolution")
    return config.replace(num_clusters=max(2, refine_segments))


def _segment_images(args: argparse.Namespace, jobs: list[tuple[str, np.ndarray | None]],
                    refine_segments: int | None = None) -> int:
    """segment (labels None: k-means) or refine (given low-res labels) each image; write its outputs.

    ``refine_segments``: the number of segments in the given labels, recorded as the config's K.
    Everything checkable is checked before the model load and any write: the settings, --out, and every
    output path (no folder in the way, no input written over). An image that fails is reported and
    skipped; a write that fails (a full disk) stops the run with one line, keeping earlier images'
    outputs and leaving no part of the failed image's set.
    """
    from emerdiff.files import check_output_dir, clean_stale_temps, unique_stems
    from emerdiff.threads import apply_threads, choose_threads

    config = config_from_args(args)  # a refused setting: no torch loaded yet (issue 25)
    threads = choose_threads(args.threads)  # issue 29: not torch's one-per-core default on a busy machine
    if not args.quiet:
        print(settings_line(args, config, threads), file=sys.stderr)
    out = Path(args.out)
    items = [item for item, _ in jobs]
    stems = unique_stems(items)
    refine = refine_segments is not None
    try:
        # everything checkable without the model, before the (slow) load and before any write
        config.check_for_segmentation()
        from emerdiff.sd.loading import model_geometry  # torch from here on

        geometry = model_geometry(args.model)
        if geometry is not None:
            config.check_resolution(*geometry)
        check_output_dir(out)
        inputs = [("IMAGE", item) for item in items] + ([("--masks", args.masks)] if refine else [])
        check_targets([p for stem in stems for p in output_paths(out, stem, vocab=bool(args.vocab),
                                                                    maps=args.save_maps, ids=refine)], inputs)
        apply_threads(threads)
        model = load_model_from_args(args)
        if refine:
            config = _refine_grid_check(model, config, refine_segments, args.masks)
        from emerdiff.method.pipeline import EmerDiff

        segmenter = EmerDiff(model, config)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    labeller, vocabulary = None, None
    if args.vocab:
        from emerdiff.method.vocabulary import CLIPMaskLabeller, CrossAttentionLabeller, check_vocabulary

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
    from emerdiff.sd.images import ImageError, load_image

    for leftover in clean_stale_temps([out]):
        print(f"removed {leftover.name}, a temp file left by an interrupted run", file=sys.stderr)
    debug = debug_requested(getattr(args, "debug", False))
    failed = written = 0
    shown: set[str] = set()  # open-vocabulary warnings printed once a run
    for i, ((item, lowres), stem) in enumerate(zip(jobs, stems), 1):
        if not args.quiet:
            print(f"[{i}/{len(items)}] {item}", file=sys.stderr)
        if stem != Path(item).stem:
            print(f"{item}: another input is also named {Path(item).stem}; writing {stem}_* for this one",
                  file=sys.stderr)
        try:
            image = load_image(item)
            seg = segmenter.segment(image, progress=not args.quiet, lowres_labels=lowres,
                                    return_difference_maps=args.save_maps)
        except Exception as err:  # any failure of one image: report it, go on with the next
            if debug:
                raise
            failed += 1
            what = "" if isinstance(err, (ImageError, ValueError)) else f"{type(err).__name__}: "
            print(f"skipped {item}: {what}{one_line(err) if what else err}", file=sys.stderr)
            continue
        files = output_set(out, stem)
        try:
            paths = save_outputs(seg, image, out, stem, files)
            if labeller is not None:
                paths += save_openvocab(labeller, seg, image, vocabulary, out, stem, model.source, files, shown)
            if args.save_maps:
                from emerdiff.studies.sweep import stage_segmentation_maps

                paths += stage_segmentation_maps(files, out, stem, seg, image, model.source)
            if refine:
                paths.append(_stage_ids(files, out, stem, seg, lowres, args.masks))
            files.commit()
        except OSError as err:  # a full disk, a folder made meanwhile: the next image would fail alike
            files.abort()
            if debug:
                raise
            print(f"error: writing the outputs of {item} into {out} failed: {type(err).__name__}: {one_line(err)}"
                  f"{error_hint(err)}; nothing of {item} was kept, the {written} image(s) before it are complete; "
                  f"stopped (full trace: {DEBUG_FLAG} or {DEBUG_ENV}=1)", file=sys.stderr)
            return 1
        except BaseException:
            files.abort()
            raise
        written += 1
        print(f"{item}: {seg.num_segments} segments, {seg.timings['total']:.1f} s -> {', '.join(map(str, paths))}")
    if failed:
        print(f"{failed} of {len(items)} image(s) failed", file=sys.stderr)
    return 1 if failed else 0


def _stage_ids(files: FileSet, out: Path, stem: str, seg: Any, masks: np.ndarray, masks_path: str) -> Path:
    """refine: stage ``STEM_ids.json`` (output label -> its id in --masks, and the ids dropped)."""
    ids, dropped = mask_ids(seg.lowres_labels, masks)
    if dropped:
        print(f"note: --masks {masks_path}: id(s) {', '.join(map(str, dropped))} won no token of the "
              f"{'x'.join(map(str, seg.lowres_labels.shape))} grid (each is smaller than a token) and are not in "
              f"the output; {stem}{IDS_SUFFIX} maps each output label to its --masks id", file=sys.stderr)
    info = dict(masks=str(masks_path), mask_ids=ids, dropped_ids=dropped,
                note="mask_ids[i] is the --masks id (pixel value; for an RGB map the rank of its colour) of "
                     "output label i")
    return files.add(out / f"{stem}{IDS_SUFFIX}", lambda p: Path(p).write_text(json.dumps(info, indent=1)))


def cmd_figures(args: argparse.Namespace) -> int:
    """Run the study notebooks with papermill; each writes its figures into --out."""
    try:
        import papermill
    except ImportError:  # papermill is in the notebooks extra, not the core install
        print("error: `emerdiff figures` runs the notebooks with papermill, which is not installed: "
              "pip install 'emerdiff[notebooks]'", file=sys.stderr)
        return 2

    folder = Path(args.notebooks)
    if not folder.is_dir():
        print(f"error: --notebooks {folder} is not a folder; pass the folder of the study notebooks "
              "(NN_name.ipynb, default: notebooks)", file=sys.stderr)
        return 2
    notebooks = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        print(f"error: no study notebooks (NN_name.ipynb) in {folder}; pass their folder as --notebooks",
              file=sys.stderr)
        return 2
    if args.only is not None:
        chosen = [nb for nb in notebooks if any(nb.stem.startswith(o) for o in args.only)]
        if not chosen:
            print(f"error: --only {' '.join(args.only) or '(nothing)'} matches none of the {len(notebooks)} study "
                  f"notebooks in {folder}: {', '.join(nb.stem for nb in notebooks)}; pass name prefixes of these "
                  f"(e.g. --only {notebooks[0].stem[:2]}), or leave --only out to run them all", file=sys.stderr)
            return 2
        notebooks = chosen
    # no settings here: each notebook's lab.setup takes the model's preset (EmerDiffConfig.for_model)
    # for every setting left None, the same path as `segment` and the Python API
    params: dict[str, Any] = dict(model=args.model, device=args.device, output_dir=str(Path(args.out).resolve()))
    if args.threads is not None:  # else each notebook's torch_threads default: emerdiff.threads' policy
        params["torch_threads"] = args.threads
    for key, value in args.param or []:
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    executed = Path(args.executed)
    executed.mkdir(parents=True, exist_ok=True)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    kernel = jupyter_kernel(args.kernel)
    from emerdiff.notebook.profiles import plan_table, profile_params

    print(plan_table([str(nb) for nb in notebooks], args.profile, args.model, args.device), end="", file=sys.stderr)
    for i, nb in enumerate(notebooks, 1):
        print(f"[{i}/{len(notebooks)}] running {nb.name} ...", file=sys.stderr)
        # the kernel's log level: silences ipykernel's per-kernel "running over TCP" warning
        nb_params = {**profile_params(args.profile, nb.stem), **params}  # -p wins over the profile
        papermill.execute_notebook(str(nb), str(executed / nb.name), parameters=nb_params, kernel_name=kernel,
                                   log_output=False, progress_bar=False,
                                   extra_arguments=["--IPKernelApp.log_level=ERROR"])
    print(f"{len(notebooks)} notebook(s) ran; {len(list(out.glob('*.png')))} figure(s) (PNG + PDF, JSON numbers) in {out}; "
          f"executed notebooks in {executed.resolve()}", file=sys.stderr)
    return 0


def jupyter_kernel(preferred: str = "emerdiff") -> str:
    """``preferred`` if that Jupyter kernel is registered, else python3 (a venv without `make setup`)."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager
    except ImportError as e:  # comes with the notebooks extra (papermill, ipykernel)
        raise ImportError("finding the Jupyter kernel needs jupyter_client: pip install 'emerdiff[notebooks]'") from e
    return preferred if preferred in KernelSpecManager().find_kernel_specs() else "python3"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emerdiff",
        description="Training-free pixel-level segmentation from a frozen Stable Diffusion (EmerDiff, ICLR 2024).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # read by main() wherever it stands (pop_debug_flag); declared here for --help
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help=f"show the full trace of an unexpected error instead of one line (also {DEBUG_ENV}=1; "
                        "may also follow the command) (default: off)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("segment", help="segment images: label PNG, overlay PNG and .npz per image",
                       description="Segment each IMAGE and write IMAGE_labels.png (indexed palette), "
                       "IMAGE_overlay.png and IMAGE.npz into --out (with --save-maps also IMAGE_maps.npz and "
                       "IMAGE_maps.png). A bad image is reported and skipped; the exit code is 1 if any image failed.")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files (PNG, JPEG, ...; greyscale, RGBA, 16-bit and EXIF-rotated are handled)")
    _add_output_args(p)
    add_labeller_args(p)
    _add_model_args(p)
    add_config_args(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("refine", help="pixel-level labels for your own segments (a label PNG from any source)",
                       description="Read IMAGE's segments from --masks (a label map at any resolution: SAM, "
                       "DINO k-means, a drawing, segment's own low-res labels ...), put them on the modulation "
                       "grid by majority vote and read them out at pixel level like `segment` (same outputs, "
                       "same settings; given segment's own low-res labels it reproduces segment).")
    p.add_argument("image", metavar="IMAGE", help="the image file")
    p.add_argument("--masks", required=True, metavar="LABELS.png",
                   help="required: label map of IMAGE at any resolution with its aspect ratio (or square): an "
                   "indexed or 8/16-bit greyscale PNG (value = segment) or an RGB PNG (one flat colour per "
                   "segment)")
    _add_output_args(p)
    add_labeller_args(p)
    _add_model_args(p)
    add_config_args(p, kmeans=False)
    p.set_defaults(func=cmd_refine)

    p = sub.add_parser("layers", help="list every attention layer with kind, block and token grid",
                       description="List the attention layers of MODEL's UNet, to pick probe layers.")
    p.add_argument("model", help="'reference', a diffusers folder, a hub id or 'tiny'")
    p.add_argument("--resolution", type=int, default=None,
                   help="image size for the grid column (default: the UNet's sample size x the VAE factor)")
    p.add_argument("--device", default="cpu", help="where to load the model (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="weights dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--offline", action="store_true",
                   help="never contact the hub, same as HF_HUB_OFFLINE=1 (default: off)")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("figures", help="run the study notebooks (papermill) and write every figure",
                       description="Run notebooks/NN_*.ipynb top to bottom with papermill (what `make "
                       "figures` does, without the Make dependency tracking). A failing cell stops "
                       "with that cell's error.")
    p.add_argument("--model", default="reference",
                   help="model for every notebook; settings are its preset, as in `segment` (default: reference)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--out", default="figures", help="figure folder (default: figures)")
    p.add_argument("--notebooks", default="notebooks", help="folder of the study notebooks (default: notebooks)")
    p.add_argument("--executed", default="notebooks/executed",
                   help="where executed copies go (default: notebooks/executed)")
    p.add_argument("--only", nargs="*", help="notebook name prefixes to run, e.g. 00 04 (default: all)")
    p.add_argument("--kernel", default="emerdiff",
                   help="Jupyter kernel; 'emerdiff' is the one `make setup` registers and `make figures` "
                   "uses, python3 is taken if it is missing (default: emerdiff)")
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="override a notebook parameter (JSON value), repeatable (default: none)")
    p.add_argument("--profile", default="quick", choices=["quick", "full"],
                   help="quick: the same figures from fewer sweep points; full: every sweep as the notebooks "
                   "are written (emerdiff/notebook/profiles.py; the expected times are printed first) (default: quick)")
    add_threads_arg(p)  # passed to every notebook as torch_threads (their default: the same policy)
    p.set_defaults(func=cmd_figures)

    from emerdiff.cli.evaluate import add_compare_parser
    from emerdiff.cli.evaluate import add_parser as add_evaluate_parser

    add_evaluate_parser(sub)
    add_compare_parser(sub)
    from emerdiff.cli.table2 import add_parser as add_table2_parser  # issue 26: the paper's Table 2

    add_table2_parser(sub)
    return parser


def _inputs(args: argparse.Namespace) -> str:
    """What a command worked on, for its one-line error: the images, the model, the data folder ..."""
    command = args.command
    if command == "segment":
        images = list(args.images)
        return ", ".join(images[:3]) + (f" and {len(images) - 3} more" if len(images) > 3 else "")
    if command == "refine":
        return f"{args.image} with --masks {args.masks}"
    if command == "layers":
        return f"model {args.model}"
    if command == "figures":
        return f"the notebooks in {args.notebooks}"
    if command == "evaluate":
        return f"--data {args.data}"
    if command == "compare":
        return f"{args.run_a} and {args.run_b}"
    if command == "table2":
        return f"--from-run {args.from_run}" if args.from_run else f"DATA {args.data}"
    return "its arguments"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `emerdiff` command; returns the exit code.

    No traceback reaches a user (:func:`emerdiff.cli.options.run_guarded`): a refusal is one ``error:``
    line and exit 2, any other failure one line naming the command, its input, the exception and how to
    see the trace (``--debug`` anywhere on the line, or ``EMERDIFF_DEBUG=1``, which re-raise), exit 1;
    Ctrl-C exits 130.
    """
    argv, debug = pop_debug_flag(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    return run_guarded(args.command, _inputs(args), lambda: args.func(args), debug)


if __name__ == "__main__":
    sys.exit(main())
