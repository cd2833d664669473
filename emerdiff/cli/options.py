"""Command-line options shared by the commands (`segment`, `refine`, `evaluate`): the method
settings and their one path to an :class:`EmerDiffConfig`, and the open-vocabulary labeller.

Kept apart from ``cli.py`` so that ``evaluate.py`` (the `evaluate` command, which ``cli``
registers) needs nothing from ``cli``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Sequence
from typing import Any

from emerdiff.config import PRESETS, EmerDiffConfig, model_kind, preset

# One default for `segment` and `evaluate`: the labeller that needs no extra model and works offline.
DEFAULT_LABELLER = "unet"


def add_labeller_args(p: argparse.ArgumentParser, when: str = "") -> None:
    """--labeller and --clip-model, one definition (and one default) for `segment` and `evaluate`."""
    p.add_argument("--labeller", choices=["clip", "unet"], default=DEFAULT_LABELLER,
                   help=f"{when}unet: the diffusion model's own cross-attention (no extra model, works offline); "
                   f"clip: MaskCLIP features pooled in masks (needs --clip-model) (default: {DEFAULT_LABELLER})")
    p.add_argument("--clip-model", default="openai/clip-vit-base-patch16",
                   help="with --labeller clip: CLIP hub id or folder (default: openai/clip-vit-base-patch16)")


def _preset_default(field: str) -> str:
    """Help text for a setting that follows the model (its value in each preset)."""
    values = {kind: PRESETS[kind].get(field, getattr(EmerDiffConfig, field)) for kind in ("reference", "tiny", "paper")}
    return (f"(default: the model's preset: {values['reference']} for reference or a <=128 px folder, "
            f"{values['tiny']} for tiny, {values['paper']} otherwise)")


class _DeprecatedAlias(argparse.Action):
    """An old flag name kept for a while: stores into the new flag's dest and warns with the new name."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        warnings.warn(f"{option_string} is deprecated, use {self.new} (the EmerDiffConfig field name)",
                      FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, values)


def _flag(g: Any, name: str, *aliases: str, **kwargs: Any) -> None:
    """One setting's flag (named as its EmerDiffConfig field) plus hidden deprecated aliases."""
    g.add_argument(name, **kwargs)
    if aliases:
        g.add_argument(*aliases, dest=kwargs.get("dest", name.lstrip("-").replace("-", "_")), type=kwargs.get("type"),
                       metavar=kwargs.get("metavar"), action=_DeprecatedAlias, new=name, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)


def add_config_args(p: argparse.ArgumentParser, kmeans: bool = True) -> None:
    """The method settings, each flag named as its EmerDiffConfig field; every default is None, so that
    :func:`config_from_args` knows which the user gave (the rest come from the model's preset)."""
    d = EmerDiffConfig()
    g = p.add_argument_group("method settings (from the model's preset, emerdiff.config.PRESETS, unless given)")
    if kmeans:
        _flag(g, "--num-clusters", "--k", "-K", type=int, default=None, metavar="K",
              help=f"number of k-means segments K {_preset_default('num_clusters')}; --k and -K: deprecated")
    else:  # refine: the segments come from --masks
        p.set_defaults(num_clusters=None)
    g.add_argument("--resolution", type=int, default=None,
                   help=f"model input size in pixels {_preset_default('resolution')[:-1]}; SDXL: its native size)")
    g.add_argument("--query-layer", default=None,
                   help=f"attention layer whose queries are clustered (default: from the model: {d.query_layer} "
                   "for SD, its own for SDXL; see `emerdiff layers MODEL`)")
    g.add_argument("--feature-timestep", type=int, default=None,
                   help=f"timestep of the noised image whose queries are clustered (default: {d.feature_timestep})")
    g.add_argument("--modulation-layer", default=None,
                   help=f"attention layer that is perturbed (default: from the model: {d.modulation_layer} "
                   "for SD, its own for SDXL)")
    g.add_argument("--modulation-timestep", type=int, default=None,
                   help=f"timestep t_m of the perturbation, on the schedule {_preset_default('modulation_timestep')}")
    _flag(g, "--modulation-strength", "--strength", type=float, default=None, metavar="LAMBDA",
          help=f"lambda, the perturbation strength (default: {d.modulation_strength:g}); --strength: deprecated")
    g.add_argument("--no-injection", action="store_true",
                   help="do not share attention with the reference run (default: shared, as in the paper)")
    _flag(g, "--num-inference-steps", "--steps", type=int, default=None, metavar="N",
          help=f"denoising schedule length {_preset_default('num_inference_steps')}; --steps: deprecated")
    g.add_argument("--readout-steps", type=int, default=None, metavar="N",
                   help="denoise with N steps from t_m to 0 instead of the full schedule with the stored "
                   "inversion noise (an integer >= 1; default: off, the paper's full readout)")
    g.add_argument("--blur-sigma", type=float, default=None,
                   help=f"Gaussian blur of the difference maps in pixels {_preset_default('blur_sigma')}")
    # a real default, not None: `evaluate` also seeds its metrics with args.seed; no preset sets the seed
    g.add_argument("--seed", type=int, default=d.seed, help=f"k-means and noise seed (default: {d.seed})")
    g.add_argument("--max-batch", type=int, default=None,
                   help=f"UNet batch of the modulated runs (lower it if memory runs out) {_preset_default('max_batch')}")
    g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any EmerDiffConfig field, value as JSON or a bare string, repeatable, applied last "
                   "(e.g. --set lowres=diffseg --set diffseg_kl_threshold=0.03 --set kmeans_n_init=2); "
                   "the fields: python -c 'import emerdiff; help(emerdiff.EmerDiffConfig)' (default: none)")


# Every flag of add_config_args that sets one EmerDiffConfig field: its dest is the field's name.
CONFIG_FLAGS = ("num_clusters", "resolution", "query_layer", "feature_timestep", "modulation_layer",
                "modulation_timestep", "modulation_strength", "num_inference_steps", "readout_steps", "blur_sigma",
                "seed", "max_batch")
_FLAG_DEFAULTS = {"seed": EmerDiffConfig.seed}  # flags whose default is a value: at that value, not a change


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


def user_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The EmerDiffConfig fields the user gave on the command line: each flag given (not None),
    ``--no-injection``, then every ``--set FIELD=VALUE`` (last: it names fields outright)."""
    changes = {field: getattr(args, field) for field in CONFIG_FLAGS
               if getattr(args, field, None) not in (None, _FLAG_DEFAULTS.get(field))}
    if getattr(args, "no_injection", False):
        changes["attention_injection"] = False
    changes.update(parse_sets(getattr(args, "set", None) or []))
    return changes


def config_from_args(args: argparse.Namespace) -> EmerDiffConfig:
    """The EmerDiffConfig of the flags, the one command line -> config path (`segment`, `refine`,
    `evaluate`): ``EmerDiffConfig.for_model(args.model, **user_changes(args))``, so the flags
    override only what the user gave and the rest is the model's preset, as in the Python API."""
    return EmerDiffConfig.for_model(args.model, **user_changes(args))


def settings_line(args: argparse.Namespace, config: Any) -> str:
    """One line naming the settings that apply: the model's preset fields and every field the user
    changed, each with its value in ``config``, marked ``(given)`` where the user set it."""
    given, own = user_changes(args), preset(args.model)
    names = [*own, *(name for name in given if name not in own)]
    parts = []
    for name in names:
        if name == "num_clusters" and getattr(args, "masks", None):  # refine: K is the number of segments in --masks
            continue
        parts.append(f"{name}={getattr(config, name)}" + (" (given)" if name in given else ""))
    return f"settings for model {args.model!r} ({model_kind(args.model)} preset): " + ", ".join(parts)
