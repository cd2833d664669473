"""Command-line options shared by the commands (`segment`, `refine`, `evaluate`): the method
settings and their one path to an :class:`EmerDiffConfig`, and the open-vocabulary labeller.

Kept apart from ``cli.py`` so that ``evaluate.py`` (the `evaluate` command, which ``cli``
registers) needs nothing from ``cli``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from emerdiff.config import FIGURE_SIZES, EmerDiffConfig, config_sizes

# One default for `segment` and `evaluate`: the labeller that needs no extra model and works offline.
DEFAULT_LABELLER = "unet"


def add_labeller_args(p: argparse.ArgumentParser, when: str = "") -> None:
    """--labeller and --clip-model, one definition (and one default) for `segment` and `evaluate`."""
    p.add_argument("--labeller", choices=["clip", "unet"], default=DEFAULT_LABELLER,
                   help=f"{when}unet: the diffusion model's own cross-attention (no extra model, works offline); "
                   f"clip: MaskCLIP features pooled in masks (needs --clip-model) (default: {DEFAULT_LABELLER})")
    p.add_argument("--clip-model", default="openai/clip-vit-base-patch16",
                   help="with --labeller clip: CLIP hub id or folder (default: openai/clip-vit-base-patch16)")


def _sized_default(param: str) -> str:
    """Help text for a setting that follows the model (the values of the size rule)."""
    t, r, d = (FIGURE_SIZES[k][param] for k in ("tiny", "reference", "default"))
    return f"(default: from the model: {r} for reference or a <=128 px folder, {t} for tiny, {d} otherwise)"


def add_config_args(p: argparse.ArgumentParser, kmeans: bool = True) -> None:
    d = EmerDiffConfig()
    g = p.add_argument_group("method settings (sized for the model unless given; the rest: the paper's)")
    if kmeans:
        g.add_argument("--k", type=int, default=None, help=f"number of k-means segments K {_sized_default('K')}")
    else:  # refine: the segments come from --masks
        p.set_defaults(k=None)
    g.add_argument("--resolution", type=int, default=None,
                   help=f"model input size in pixels {_sized_default('resolution')}")
    g.add_argument("--query-layer", default=None,
                   help=f"attention layer whose queries are clustered (default: from the model: {d.query_layer} "
                   "for SD, its own for SDXL; see `emerdiff layers MODEL`)")
    g.add_argument("--feature-timestep", type=int, default=d.feature_timestep,
                   help=f"timestep of the noised image whose queries are clustered (default: {d.feature_timestep})")
    g.add_argument("--modulation-layer", default=None,
                   help=f"attention layer that is perturbed (default: from the model: {d.modulation_layer} "
                   "for SD, its own for SDXL)")
    g.add_argument("--modulation-timestep", type=int, default=None,
                   help=f"timestep t_m of the perturbation, on the schedule {_sized_default('modulation_timestep')}")
    g.add_argument("--strength", type=float, default=d.modulation_strength,
                   help=f"lambda, the perturbation strength (default: {d.modulation_strength:g})")
    g.add_argument("--no-injection", action="store_true",
                   help="do not share attention with the reference run (default: shared, as in the paper)")
    g.add_argument("--steps", type=int, default=None,
                   help=f"denoising schedule length {_sized_default('num_inference_steps')}")
    g.add_argument("--readout-steps", type=int, default=None, metavar="N",
                   help="denoise with N steps from t_m to 0 instead of the full schedule with the stored "
                   "inversion noise (an integer >= 1; default: off, the paper's full readout)")
    g.add_argument("--blur-sigma", type=float, default=None,
                   help=f"Gaussian blur of the difference maps in pixels {_sized_default('blur_sigma')}")
    g.add_argument("--seed", type=int, default=d.seed, help=f"k-means and noise seed (default: {d.seed})")
    g.add_argument("--max-batch", type=int, default=None,
                   help=f"UNet batch of the modulated runs (lower it if memory runs out) {_sized_default('max_batch')}")
    g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any EmerDiffConfig field, value as JSON or a bare string, repeatable, applied last "
                   "(e.g. --set lowres=diffseg --set diffseg_kl_threshold=0.03 --set kmeans_n_init=2); "
                   "the fields: python -c 'import emerdiff; help(emerdiff.EmerDiffConfig)' (default: none)")


# The sized command-line flags and the EmerDiffConfig fields they set.
_SIZED_FLAGS = {"resolution": "resolution", "k": "num_clusters", "steps": "num_inference_steps",
                "modulation_timestep": "modulation_timestep", "blur_sigma": "blur_sigma", "max_batch": "max_batch"}


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``--set FIELD=VALUE`` items -> {field: value}; values are JSON (numbers, true, null) or bare strings
    (layer names). Field names are checked when the config is built (the error lists the valid ones)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r} (e.g. --set blur_sigma=2)")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def config_from_args(args: argparse.Namespace) -> EmerDiffConfig:
    """The EmerDiffConfig of the flags, the one command line -> config path (`segment`, `refine`,
    `evaluate`): the model's sizes (:func:`emerdiff.config.config_sizes`), then the flags given, then
    every ``--set FIELD=VALUE``."""
    sizes = config_sizes(args.model)
    sized = {field: sizes[field] if getattr(args, flag) is None else getattr(args, flag)
             for flag, field in _SIZED_FLAGS.items()}
    d = EmerDiffConfig()
    fields = dict(
        query_layer=args.query_layer or sizes.get("query_layer", d.query_layer), feature_timestep=args.feature_timestep,
        modulation_layer=args.modulation_layer or sizes.get("modulation_layer", d.modulation_layer),
        modulation_strength=args.strength,
        attention_injection=not args.no_injection, readout_steps=args.readout_steps, seed=args.seed, **sized,
    )
    sets = parse_sets(getattr(args, "set", None) or [])
    return EmerDiffConfig.from_dict({**d.to_dict(), **fields, **sets})  # --set last: it names fields outright


def settings_line(args: argparse.Namespace, config: Any) -> str:
    """One line naming the sized settings and where each came from (the model, or a flag)."""
    parts = []
    for flag, field in _SIZED_FLAGS.items():
        if flag == "k" and getattr(args, "masks", None):  # refine: K is the number of segments in --masks
            continue
        given = getattr(args, flag) is not None
        parts.append(f"{field}={getattr(config, field)}" + (" (given)" if given else ""))
    return f"settings for model {args.model!r}: " + ", ".join(parts)
