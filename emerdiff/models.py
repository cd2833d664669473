"""Load Stable Diffusion components from a hub id or a local diffusers folder.

The same code loads real SD weights and the tiny random pipelines of
`emerdiff.testing` (written with ``save_pretrained``), so tests exercise the
real path. Only safetensors weights are accepted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

COMPONENTS = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
SPECIAL_MODELS = ("tiny", "reference")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


@dataclass
class SDModel:
    """The Stable Diffusion parts EmerDiff needs, frozen and in eval mode."""

    unet: Any
    vae: Any
    scheduler: Any
    tokenizer: Any
    text_encoder: Any
    empty_embedding: torch.Tensor  # (1, tokens, dim): text embedding of ""
    source: str  # what was loaded (hub id, folder, "tiny", "reference")

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def name(self) -> str:
        return self.source

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states for prompts, padded to the max length."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            out = self.text_encoder(tokens.input_ids.to(self.text_encoder.device))
        return out[0].to(self.dtype)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
    if device.type == "cpu" and table[dtype] == torch.float16:
        raise ValueError("float16 is not supported on CPU; use float32 (or bfloat16)")
    return table[dtype]


def _offline(local_files_only: bool | None) -> bool:
    if local_files_only is not None:
        return local_files_only
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise ModelLoadError(
            f"model folder {folder} does not exist. Pass a folder in diffusers layout "
            f"(with {', '.join(COMPONENTS)} subfolders), a hub id such as "
            "'stable-diffusion-v1-5/stable-diffusion-v1-5', 'tiny' or 'reference'."
        )
    if not folder.is_dir():
        raise ModelLoadError(f"model path {folder} is a file; pass the pipeline folder that holds it")
    for part in COMPONENTS:
        sub = folder / part
        if not sub.is_dir():
            raise ModelLoadError(
                f"model folder {folder} is incomplete: component '{part}' is missing "
                f"(expected {sub}/). Download the full pipeline (e.g. `hf download REPO "
                f"--local-dir {folder}`) or save it with `pipe.save_pretrained`."
            )
        if part in ("unet", "vae", "text_encoder"):
            if not any(sub.glob("*.safetensors")):
                bins = list(sub.glob("*.bin")) + list(sub.glob("*.ckpt"))
                hint = (" It holds only pickle weights (.bin); convert them to safetensors"
                        " (emerdiff loads safetensors only)." if bins else "")
                raise ModelLoadError(
                    f"component '{part}' in {folder} has no .safetensors weights.{hint}"
                )


def _looks_like_hub_id(name: str) -> bool:
    """'org/name' with no path-like prefix; anything else is treated as a folder."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _hub_error(model: str, err: Exception, offline: bool) -> ModelLoadError:
    how = (
        "Download it on a machine with hub access (`hf download "
        f"{model} --local-dir ./sd`) and pass the folder: load_pipeline('./sd') "
        "or `emerdiff segment IMG --model ./sd`. Set HF_HUB_OFFLINE=1 to never touch the network."
    )
    state = "is not in the local cache (offline mode)" if offline else "could not be fetched from the hub"
    return ModelLoadError(f"model {model!r} {state}: {type(err).__name__}: {err}\n{how}")


def load_pipeline(
    model: str | os.PathLike = "tiny",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    local_files_only: bool | None = None,
) -> SDModel:
    """Load UNet, VAE, scheduler and the empty-prompt embedding.

    Args:
        model: a local folder in diffusers layout, a hub id, ``"tiny"`` (a tiny
            random SD-shaped pipeline, built and cached on first use) or
            ``"reference"`` (the project's own trained model, shipped in the package).
        device: "cpu", "cuda", ... (default: cuda if available).
        dtype: "float32", "float16", "bfloat16" (default: fp16 on CUDA, fp32 on CPU).
        local_files_only: never touch the network; default follows HF_HUB_OFFLINE.

    Returns:
        An :class:`SDModel` with frozen modules on ``device``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors import SafetensorError
    from transformers import CLIPTextModel, CLIPTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    offline = _offline(local_files_only)
    name = str(model)
    if name == "tiny":
        from .testing import tiny_pipeline_dir

        path: str = str(tiny_pipeline_dir())
    elif name == "reference":
        from .reference import weights_dir

        path = str(weights_dir())
    else:
        path = name
    local = Path(path).expanduser()
    looks_local = local.exists() or not _looks_like_hub_id(path)
    if looks_local:
        _check_folder(local)
        path = str(local)
        offline = True
    kw: dict[str, Any] = dict(local_files_only=offline)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True, torch_dtype=dt, **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True, torch_dtype=dt, **kw)
        # DDIM with eta=1 is the DDPM posterior step the inversion needs;
        # its config (betas, offset, prediction type) comes from the model.
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", use_safetensors=True, **kw)
    except ModelLoadError:
        raise
    except SafetensorError as err:  # transformers lets a corrupt/empty weights file through unwrapped
        raise ModelLoadError(
            f"could not load the model in {path}: a .safetensors weights file is corrupt or empty "
            f"({err}); re-download or re-save that component"
        ) from err
    except (OSError, ValueError) as err:
        if looks_local:
            raise ModelLoadError(f"could not load the model in {path}: {err}") from err
        raise _hub_error(name, err, offline) from err
    check_architecture(unet, name)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
    unet.to(dev)
    vae.to(dev)
    text_encoder.to(dev)
    sd = SDModel(unet, vae, scheduler, tokenizer, text_encoder, torch.empty(0), name)
    sd.empty_embedding = sd.encode_text([""])
    return sd


# ---------------------------------------------------------------- layers
def attention_layers(unet: Any) -> list[str]:
    """Module paths of every attention layer (keys of attn_processors without '.processor')."""
    return [k[: -len(".processor")] for k in unet.attn_processors]


def _block_scales(config: Any) -> dict[str, int]:
    """Downsampling factor (relative to the latent) of each UNet block prefix."""
    scales: dict[str, int] = {}
    factor = 1
    n_down = len(config.down_block_types)
    for i in range(n_down):
        scales[f"down_blocks.{i}"] = factor
        if i < n_down - 1:  # every down block but the last ends with a downsampler
            factor *= 2
    scales["mid_block"] = factor
    for i in range(len(config.up_block_types)):
        scales[f"up_blocks.{i}"] = factor
        if i < len(config.up_block_types) - 1:
            factor //= 2
    return scales


def unet_downsampling(config: Any) -> int:
    """Total downsampling of a UNet config, 2 ** (down blocks - 1): the latent must be a multiple of it."""
    types = config["down_block_types"] if isinstance(config, dict) else config.down_block_types
    return 2 ** (len(types) - 1)


def component_configs(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """The UNet and VAE ``config.json`` of a diffusers folder, read without loading weights
    (OSError / ValueError when missing or unreadable)."""
    import json

    folder = Path(folder).expanduser()
    return (json.loads((folder / "unet" / "config.json").read_text()),
            json.loads((folder / "vae" / "config.json").read_text()))


def model_geometry(model: str | os.PathLike) -> tuple[int, int] | None:
    """(VAE downsampling, UNet downsampling) of a model, read from its config files without loading
    any weights, so a bad resolution can be refused before the (slow) load; None when the configs
    are not on disk (a hub id not cached yet): then :meth:`EmerDiffConfig.validate` checks after loading."""

    name = str(model)
    try:
        if name == "tiny":  # known without building it
            from .testing import TINY_UNET_CONFIG, TINY_VAE_CONFIG

            return (2 ** (len(TINY_VAE_CONFIG["block_out_channels"]) - 1),
                    unet_downsampling(dict(TINY_UNET_CONFIG)))
        if name == "reference":
            from .reference import weights_dir

            folder = Path(weights_dir())
        else:
            folder = Path(name)
        unet, vae = component_configs(folder)
        return 2 ** (len(vae["block_out_channels"]) - 1), unet_downsampling(unet)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def feature_resolution(unet: Any, layer: str, latent_size: int | tuple[int, int]) -> tuple[int, int]:
    """Token grid (h, w) of an attention layer for a latent of the given size."""
    h, w = (latent_size, latent_size) if isinstance(latent_size, int) else latent_size
    scales = _block_scales(unet.config)
    for prefix, factor in scales.items():
        if layer == prefix or layer.startswith(prefix + "."):
            return h // factor, w // factor
    raise ValueError(f"cannot place layer {layer!r} in a UNet block")


def layer_table(unet: Any, latent_size: int | None = None) -> list[dict[str, Any]]:
    """One row per attention layer: name, kind (self/cross), block, token grid."""
    if latent_size is None:
        latent_size = int(unet.config.sample_size)
    modules = dict(unet.named_modules())
    rows = []
    for name in attention_layers(unet):
        attn = modules[name]
        h, w = feature_resolution(unet, name, latent_size)
        block = ".".join(name.split(".")[:2]) if not name.startswith("mid_block") else "mid_block"
        rows.append(dict(
            layer=name,
            kind="cross" if getattr(attn, "is_cross_attention", False) else "self",
            block=block,
            resolution=f"{h}x{w}",
            tokens=h * w,
            channels=attn.to_q.out_features,
            heads=attn.heads,
        ))
    return rows


def check_architecture(unet: Any, source: str = "model") -> None:
    """EmerDiff needs an SD-style UNet whose decoder block `up_blocks.1` has cross-attention.

    In SD 1.x/2.x that block runs at 1/4 of the latent (16x16 for a 64x64
    latent); the project's reference model has three levels and runs it at 1/2
    of a 32x32 latent, which is also 16x16. Both are accepted.
    """
    layers = set(attention_layers(unet))
    needed = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    ok = needed in layers
    if ok:
        modules = dict(unet.named_modules())
        ok = getattr(modules[needed], "is_cross_attention", False)
        ok = ok and _block_scales(unet.config).get("up_blocks.1") in (2, 4)
    if not ok:
        raise ModelLoadError(
            f"{source} does not have the Stable Diffusion UNet layout EmerDiff needs: "
            "a cross-attention decoder block `up_blocks.1` (16x16 tokens for SD's 64x64 "
            "latent). SD v1.x and v2.x have it; SDXL and DiT models do not."
        )
