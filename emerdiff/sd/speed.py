"""Speed levers of a loaded model (issue 25): channels_last, torch.compile of the UNet and of the VAE
decoder, the scaled-dot-product-attention kernel. Each is one EmerDiffConfig field
(``channels_last``, ``compile_unet``, ``compile_decoder``, ``sdpa_backend``), off / torch's choice by
default until a GPU measurement shows it pays (``benchmarks/gpu_issue25.py``).

:func:`apply_speed` changes the model in place, once per lever (``EmerDiff`` calls it with its config):
a model shared by several pipelines keeps the levers the first one asked for, and a later config that
asks for less does not undo them; :func:`reset_speed` does (the model as loaded: eager, contiguous,
torch's attention kernels). What was applied is in ``applied_speed(model)``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

# EmerDiffConfig.sdpa_backend's values (config.SDPA_BACKENDS: the config checks them without torch, this floor
# may not import the config; tests/test_speed.py checks both agree)
SDPA_BACKENDS = ("default", "flash", "efficient", "cudnn", "math")
_STATE = "_emerdiff_speed"  # attribute on the UNet: {lever: value} already applied


def sdpa_kernels(name: str) -> list[Any] | None:
    """torch's SDPBackend list for ``name`` (``"default"``: None, torch picks per call)."""
    if name not in SDPA_BACKENDS:
        raise ValueError(f"sdpa_backend must be one of {list(SDPA_BACKENDS)}, got {name!r}")
    if name == "default":
        return None
    from torch.nn.attention import SDPBackend

    return [{"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]]


@contextlib.contextmanager
def sdpa_context(name: str) -> Iterator[None]:
    """Within: every ``F.scaled_dot_product_attention`` uses the ``name`` kernel (an error if it cannot)."""
    kernels = sdpa_kernels(name)
    if kernels is None:
        yield
        return
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(kernels):
        yield


def _wrap(fn: Callable[..., Any], sdpa: str, channels_last_input: bool) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if channels_last_input and sample.dim() == 4:
            sample = sample.contiguous(memory_format=torch.channels_last)
        with sdpa_context(sdpa):
            return fn(sample, *args, **kwargs)

    return run


def applied_speed(model: Any) -> dict[str, Any]:
    """The levers applied to ``model`` so far (empty: eager, as loaded)."""
    return dict(getattr(model.unet, _STATE, {}))


def apply_speed(model: Any, config: Any, compile_backend: str = "inductor",
                compile_mode: str | None = None) -> dict[str, Any]:
    """Apply ``config``'s speed levers to ``model`` (an SDPipeline: ``.unet``, ``.vae``) in place.

    - ``channels_last``: UNet and VAE weights in channels_last; the UNet's input is made channels_last.
    - ``sdpa_backend``: the UNet's and the VAE decoder's attention run inside ``sdpa_kernel`` of that kernel.
    - ``compile_unet`` / ``compile_decoder``: ``torch.compile(..., dynamic=False)`` of the UNet's forward /
      the VAE decoder (``compile_backend``, ``compile_mode``: torch.compile's; tests use ``"eager"`` or
      ``"aot_eager"`` to check the plumbing without a C++ toolchain; ``compile_mode`` None: the config's
      ``compile_mode``, "default" being torch's own; "reduce-overhead" replays CUDA graphs). Static shapes:
      each chunk size compiles once.

    Returns the levers now applied. Nothing is done for a config with every lever off.
    """
    unet, vae = model.unet, model.vae
    state: dict[str, Any] = getattr(unet, _STATE, {})
    want = dict(channels_last=bool(config.channels_last), sdpa_backend=str(config.sdpa_backend),
                compile_unet=bool(config.compile_unet), compile_decoder=bool(config.compile_decoder))
    sdpa_kernels(want["sdpa_backend"])  # a bad name: ValueError before anything changes
    if compile_mode is None:
        mode = str(getattr(config, "compile_mode", "default"))
        compile_mode = None if mode == "default" else mode
    if not any(v for k, v in want.items() if k != "sdpa_backend") and want["sdpa_backend"] == "default":
        return dict(state)
    if want["channels_last"] and not state.get("channels_last"):
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
        state["channels_last"] = True
    wrap_unet = (want["sdpa_backend"] != "default" and "sdpa_backend" not in state) or \
        (want["compile_unet"] and not state.get("compile_unet")) or \
        (want["channels_last"] and not state.get("channels_last_input"))
    if wrap_unet:
        base = getattr(unet, "_emerdiff_eager_forward", unet.forward)
        unet._emerdiff_eager_forward = base
        sdpa = want["sdpa_backend"] if "sdpa_backend" not in state else state["sdpa_backend"]
        compiled = want["compile_unet"] or state.get("compile_unet", False)
        fn = torch.compile(base, backend=compile_backend, mode=compile_mode, dynamic=False) if compiled else base
        unet.forward = _wrap(fn, sdpa, want["channels_last"] or state.get("channels_last", False))
        state.update(sdpa_backend=sdpa, compile_unet=compiled,
                     channels_last_input=want["channels_last"] or state.get("channels_last", False))
    if want["compile_decoder"] and not state.get("compile_decoder"):
        vae.decoder = torch.compile(vae.decoder, backend=compile_backend, mode=compile_mode, dynamic=False)
        state["compile_decoder"] = True
    if want["sdpa_backend"] != "default" and not state.get("decoder_sdpa"):
        decoder = vae.decoder
        decoder.forward = _wrap(decoder.forward, want["sdpa_backend"], False)
        state["decoder_sdpa"] = want["sdpa_backend"]
    setattr(unet, _STATE, state)
    return dict(state)


def reset_speed(model: Any) -> None:
    """Undo :func:`apply_speed`: the class's own forwards, the uncompiled decoder, contiguous weights, and
    torch.compile's caches cleared (a benchmark compares levers on one model without reloading it)."""
    unet, vae = model.unet, model.vae
    state = getattr(unet, _STATE, None)
    if not state:
        return
    unet.__dict__.pop("forward", None)
    unet.__dict__.pop("_emerdiff_eager_forward", None)
    decoder = vae.decoder
    decoder.__dict__.pop("forward", None)
    original = getattr(decoder, "_orig_mod", None)
    if original is not None:
        original.__dict__.pop("forward", None)
        vae.decoder = original
    if state.get("channels_last"):
        unet.to(memory_format=torch.contiguous_format)
        vae.to(memory_format=torch.contiguous_format)
    if state.get("compile_unet") or state.get("compile_decoder"):
        torch._dynamo.reset()
    delattr(unet, _STATE)
