"""Command-line options shared by the commands (`segment`, `refine`, `evaluate`): the method
settings and their one path to an :class:`EmerDiffConfig`, and the open-vocabulary labeller.

Kept apart from ``cli.py`` so that ``evaluate.py`` (the `evaluate` command, which ``cli``
registers) needs nothing from ``cli``.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from emerdiff.config import PRESETS, EmerDiffConfig, field_type_rule, model_kind, preset

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


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _set_value(key: str, raw: str) -> Any:
    """One ``--set`` value, read for the field's type: a bool field takes true/false, yes/no, on/off,
    1/0 (stored as a bool, never the truthy string 'no'); a str field keeps the text as given; other
    fields read JSON (numbers, null, objects) or keep a bare string. A value of the wrong type is refused
    here, naming the item; unknown field names are refused when the config is built."""
    annotation = {f.name: str(f.type) for f in dataclasses.fields(EmerDiffConfig)}.get(key)
    if annotation is None:
        return _json_or_text(raw)
    kinds = {part.strip() for part in annotation.split("|")}
    text = raw.strip()
    if "None" in kinds and text.lower() in ("null", "none"):
        return None
    if "bool" in kinds and text.lower() in (*_TRUE, *_FALSE):
        return text.lower() in _TRUE
    value = _json_or_text(raw)
    if "str" in kinds and not isinstance(value, str):
        value = raw  # a str field keeps its text as given (a layer named 123); a JSON string is unquoted
    rule = field_type_rule(annotation)
    if rule is not None and not rule[0](value):
        accepted = " (true/false, yes/no, on/off or 1/0)" if "bool" in kinds else ""
        raise ValueError(f"--set {key}={raw}: {key} must be {rule[1]}{accepted}, got {value!r} "
                         f"(type {type(value).__name__}); e.g. --set {key}={_example(key)}")
    return value


def _example(key: str) -> str:
    """The field's default as a --set value."""
    default = getattr(EmerDiffConfig(), key)
    return default if isinstance(default, str) else json.dumps(default)


def _json_or_text(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``--set FIELD=VALUE`` items -> {field: value}, each value read for its field's type and refused
    (ValueError naming the item) if it does not fit it (:func:`_set_value`). Field names are checked
    when the config is built (the error lists the valid ones)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r} (e.g. --set blur_sigma=2)")
        key, value = item.split("=", 1)
        out[key.strip()] = _set_value(key.strip(), value)
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
    config = EmerDiffConfig.for_model(args.model, **user_changes(args))
    config.check_types()  # every field's type, before any model load or output (ranges: check_values)
    return config


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """--threads, one definition for every command that computes (emerdiff.threads: the one policy)."""
    from emerdiff.threads import MIN_CORES, THREADS_ENV

    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help=f"torch CPU threads; 0: torch's own (one per core) (default: {THREADS_ENV} if set, else 1 "
                   f"on a machine with fewer than {MIN_CORES} cores, else the cores the load average leaves free; "
                   "the settings line shows the choice)")


def use_threads(args: argparse.Namespace, quiet: bool = False) -> Any:
    """Choose (``--threads``, ``EMERDIFF_THREADS`` or the automatic policy), print ``threads N (why)`` to
    stderr unless ``quiet``, and set torch's thread count; returns the :class:`emerdiff.threads.ThreadChoice`.
    For the commands without a settings line of their own (`evaluate`, `table2`)."""
    from emerdiff.threads import apply_threads, choose_threads

    choice = choose_threads(getattr(args, "threads", None))
    if not quiet:
        print(choice.describe(), file=sys.stderr)
    return apply_threads(choice)


def settings_line(args: argparse.Namespace, config: Any, threads: Any = None) -> str:
    """One line naming the settings that apply: the model's preset fields and every field the user
    changed, each with its value in ``config``, marked ``(given)`` where the user set it; then the
    thread count and why (``threads``: an :class:`emerdiff.threads.ThreadChoice`), if given."""
    given, own = user_changes(args), preset(args.model)
    names = [*own, *(name for name in given if name not in own)]
    parts = []
    for name in names:
        if name == "num_clusters" and getattr(args, "masks", None):  # refine: K is the number of segments in --masks
            continue
        parts.append(f"{name}={getattr(config, name)}" + (" (given)" if name in given else ""))
    line = f"settings for model {args.model!r} ({model_kind(args.model)} preset): " + ", ".join(parts)
    return line + (f"; {threads.describe()}" if threads is not None else "")


# --------------------------------------------------------------------------- no traceback reaches a user
DEBUG_ENV = "EMERDIFF_DEBUG"
DEBUG_FLAG = "--debug"


def debug_requested(flag: bool = False) -> bool:
    """True with ``--debug`` or ``EMERDIFF_DEBUG`` set to anything but empty/0/false/no: errors re-raise."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def pop_debug_flag(argv: Sequence[str] | None) -> tuple[list[str], bool]:
    """``argv`` (default: ``sys.argv[1:]``) without ``--debug``, wherever it stands before ``--``; and
    whether it was there. So ``emerdiff --debug segment ...`` and ``emerdiff segment ... --debug`` both work."""
    args = list(sys.argv[1:] if argv is None else argv)
    end = args.index("--") if "--" in args else len(args)
    found = DEBUG_FLAG in args[:end]
    return [a for i, a in enumerate(args) if not (i < end and a == DEBUG_FLAG)], found


def error_hint(err: BaseException) -> str:
    """The fix for the OSErrors a user can cause (full disk, permissions, a read-only disk)."""
    if isinstance(err, OSError):
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return "; the disk is full: free space or pass an --out on another disk"
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return "; fix the permissions or pass another --out"
    return ""


def one_line(text: object) -> str:
    """``text`` on one line (newlines and runs of spaces become one space)."""
    return " ".join(str(text).split())


def quiet_libraries() -> None:
    """Silence transformers' and diffusers' progress bars ("Loading weights") and info logs (--quiet).
    Called where a model is loaded, not at start-up: importing them costs seconds (issue 25)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (transformers_logging, diffusers_logging):
        lib.disable_progress_bar()
        lib.set_verbosity_error()


def _is_refusal(err: BaseException) -> bool:
    """A ValueError (ImageError is one) or a ModelLoadError. Checked without importing the model modules
    (torch): a ModelLoadError can only have been raised once its module is loaded (issue 25)."""
    if isinstance(err, ValueError):
        return True
    layers = sys.modules.get("emerdiff.sd.layers")
    return layers is not None and isinstance(err, layers.ModelLoadError)


def run_guarded(command: str, inputs: str, func: Callable[[], int | None], debug: bool = False) -> int:
    """Run one command's body so that no traceback reaches a user; returns the exit code.

    A refusal (ValueError, ImageError, ModelLoadError: the message names the input and the fix) prints
    ``error: MESSAGE`` and gives 2, as argparse does for bad arguments; any other exception prints one
    line with the command, its input, the exception's type and message and how to get the full trace
    (``--debug`` or ``EMERDIFF_DEBUG=1``, which re-raise instead) and gives 1; Ctrl-C prints one line
    and gives 130.
    """
    debug = debug_requested(debug)
    try:
        return int(func() or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"emerdiff {command}: interrupted (Ctrl-C) during {inputs}; outputs written before are complete, "
              "the one being written was not kept", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        if _is_refusal(err):
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"error: emerdiff {command} failed on {inputs}: {type(err).__name__}: {one_line(err)}{error_hint(err)} "
              f"(full trace: rerun with {DEBUG_FLAG} or {DEBUG_ENV}=1)", file=sys.stderr)
        return 1
