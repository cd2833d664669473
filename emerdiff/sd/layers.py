"""The UNet's attention layers and geometry, read from a loaded UNet or from its config alone.

Layer names are diffusers module paths (``up_blocks.1.attentions.0.transformer_blocks.0.attn2``);
`emerdiff layers MODEL` prints :func:`layer_table`; :func:`schedule_timesteps` lists the timesteps
that the config's timesteps must lie on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from emerdiff.sd.loading import SDPipeline


from emerdiff.sd.errors import ModelLoadError  # noqa: E402  (defined apart so sd.mmdit can raise it too)


def unet_family(config: Any) -> str:
    """``"sd"`` or ``"sdxl"`` from a UNet config (dict or diffusers config); other UNets are refused.

    SDXL's UNet is the one with ``addition_embed_type == "text_time"`` (pooled
    text + micro-conditioning added to the timestep embedding); SD 1.x/2.x have none.
    """
    kind = config.get("addition_embed_type") if isinstance(config, dict) else getattr(config, "addition_embed_type", None)
    if kind is None:
        return "sd"
    if kind == "text_time":
        return "sdxl"
    raise ModelLoadError(
        f"UNet addition_embed_type {kind!r} is not supported: emerdiff loads Stable Diffusion 1.x/2.x "
        "(no added conditioning) and SDXL ('text_time') UNets"
    )


def _looks_like_hub_id(name: str) -> bool:
    """'org/name' with no path-like prefix; anything else is treated as a folder."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def attention_layers(unet: Any) -> list[str]:
    """Module paths of every attention layer (keys of attn_processors without '.processor')."""
    return [k[: -len(".processor")] for k in unet.attn_processors]


def self_attention_layers(unet: Any) -> list[str]:
    """Module paths of the UNet's self-attention layers (``is_cross_attention`` False)."""
    modules = dict(unet.named_modules())
    return [name for name in attention_layers(unet) if not getattr(modules[name], "is_cross_attention", False)]


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
    from emerdiff.sd.mmdit import is_mmdit, token_patch

    if is_mmdit(config):  # SD3 / FLUX: the latent must be a whole number of patches (issue 28)
        return token_patch(config)
    types = config["down_block_types"] if isinstance(config, dict) else config.down_block_types
    return 2 ** (len(types) - 1)


def component_configs(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """The UNet and VAE ``config.json`` of a diffusers folder, read without loading weights
    (OSError / ValueError when missing or unreadable)."""

    folder = Path(folder).expanduser()
    return (json.loads((folder / "unet" / "config.json").read_text()),
            json.loads((folder / "vae" / "config.json").read_text()))


def model_geometry(model: str | os.PathLike) -> tuple[int, int] | None:
    """(VAE downsampling, UNet downsampling) of a model, read from its config files without loading
    any weights, so a bad resolution can be refused before the (slow) load; None when the configs
    are not on disk (a hub id not cached yet): then :meth:`EmerDiffConfig.validate` checks after loading."""
    configs = _unet_config_of(model)
    if configs is None:
        return _mmdit_geometry(model)
    unet, vae = configs
    try:
        return 2 ** (len(vae["block_out_channels"]) - 1), unet_downsampling(unet)
    except (KeyError, TypeError):  # a foreign config: load_pipeline reports it
        return None


def _mmdit_geometry(model: str | os.PathLike) -> tuple[int, int] | None:
    """(VAE downsampling, latent pixels per token) of a local SD3/FLUX folder from its configs, else None."""
    from emerdiff.sd.mmdit import folder_family, token_patch

    try:
        folder = Path(str(model)).expanduser()
        if not folder.is_dir() or folder_family(folder) is None:
            return None
        transformer = json.loads((folder / "transformer" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return 2 ** (len(vae["block_out_channels"]) - 1), token_patch(transformer)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def feature_resolution(unet: Any, layer: str, latent_size: int | tuple[int, int]) -> tuple[int, int]:
    """Token grid (h, w) of an attention layer for a latent of the given size (an MMDiT's: the patch grid,
    the same in every block)."""
    from emerdiff.sd.mmdit import is_mmdit, token_grid

    if is_mmdit(unet):
        if layer not in attention_layers(unet):
            raise ValueError(f"cannot place layer {layer!r}: not an attention of this transformer")
        return token_grid(unet, latent_size)
    h, w = (latent_size, latent_size) if isinstance(latent_size, int) else latent_size
    scales = _block_scales(unet.config)
    for prefix, factor in scales.items():
        if layer == prefix or layer.startswith(prefix + "."):
            return h // factor, w // factor
    raise ValueError(f"cannot place layer {layer!r} in a UNet block")


def layer_table(unet: Any, latent_size: int | None = None) -> list[dict[str, Any]]:
    """One row per attention layer: name, kind (self/cross; MMDiT: joint/single/image), block, token grid."""
    from emerdiff.sd.mmdit import is_mmdit, layer_rows

    if is_mmdit(unet):
        return layer_rows(unet, latent_size)
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


def _is_cross_attention(module: Any) -> bool:
    return bool(getattr(module, "is_cross_attention", False))


def low_resolution_block(unet: Any) -> str:
    """The decoder block EmerDiff reads and perturbs: the lowest-resolution up block with cross-attention.

    SD 1.x/2.x: ``up_blocks.1`` (its ``up_blocks.0`` has no attention), 1/4 of the
    latent, 16x16 for a 512 px image. SDXL: ``up_blocks.0``, also 1/4 of the latent,
    32x32 for its native 1024 px (16x16 at 512 px): SDXL dropped SD's 1/8 level and
    the attention at full latent size, so its first decoder block is the one at
    1/32 of the image side, where SD's ``up_blocks.1`` sits. The reference model:
    ``up_blocks.1`` at 1/2 of its 32x32 latent.
    """
    modules = dict(unet.named_modules())
    scales = _block_scales(unet.config)
    blocks = []
    for name in attention_layers(unet):
        if name.startswith("up_blocks.") and _is_cross_attention(modules[name]):
            block = ".".join(name.split(".")[:2])
            if block not in blocks:
                blocks.append(block)
    if not blocks:
        raise ModelLoadError("this UNet has no cross-attention layer in its decoder (up_blocks); EmerDiff "
                             "needs one to read segments from and perturb")
    return max(blocks, key=lambda b: (scales[b], -blocks.index(b)))  # lowest resolution, then first


def default_layers(unet: Any) -> tuple[str, str]:
    """(query_layer, modulation_layer) for a UNet: the first and the last cross-attention
    layer of :func:`low_resolution_block`.

    On SD 1.x/2.x this is exactly the paper's pair (``up_blocks.1.attentions.0`` and
    ``.2``, one transformer block each). On SDXL it is
    ``up_blocks.0.attentions.0.transformer_blocks.0.attn2`` (the first cross-attention
    the decoder sees, as in SD) and ``up_blocks.0.attentions.2.transformer_blocks.9.attn2``
    (the last one before the block's upsampler, as SD's ``.attentions.2`` is): SDXL
    stacks 10 transformer blocks in each of the three attentions of that block.
    SD3/FLUX: the placeholder blocks of :func:`emerdiff.sd.mmdit.default_blocks`.
    """
    from emerdiff.sd.mmdit import default_blocks, is_mmdit

    if is_mmdit(unet):
        return default_blocks(unet)
    modules = dict(unet.named_modules())
    block = low_resolution_block(unet)
    cross = [n for n in attention_layers(unet) if n.startswith(block + ".") and _is_cross_attention(modules[n])]
    return cross[0], cross[-1]


def _meta_unet_from_config(config: dict[str, Any]) -> Any:
    """A UNet on the meta device (module names and shapes, no memory, about a second for SDXL)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _unet_config_of(model: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(UNet, VAE) configs of a model name, folder or cached hub id, without weights; None if not on disk."""
    name = str(model)
    try:
        if name == "tiny":
            from emerdiff.sd.components import TINY_UNET_CONFIG, TINY_VAE_CONFIG

            return dict(TINY_UNET_CONFIG), dict(TINY_VAE_CONFIG)
        if name == "reference":
            from emerdiff.assets import weights_dir

            return component_configs(weights_dir())
        if Path(name).expanduser().exists() or not _looks_like_hub_id(name):
            return component_configs(name)
        import json

        from huggingface_hub import try_to_load_from_cache

        files = [try_to_load_from_cache(name, f"{part}/config.json") for part in ("unet", "vae")]
        if not all(isinstance(f, str) for f in files):
            return None
        return json.loads(Path(files[0]).read_text()), json.loads(Path(files[1]).read_text())
    except (OSError, ValueError):
        return None


def family_defaults(model: SDPipeline | str | os.PathLike, resolution: int | None = None,
                    num_inference_steps: int = 50) -> dict[str, Any]:
    """:class:`~emerdiff.EmerDiffConfig` fields that depend on the model family: the model-read part of
    the ``"sdxl"`` preset (:data:`emerdiff.config.PRESETS`, applied by ``EmerDiffConfig.for_model``).

    ``{}`` for SD (its presets hold every value). For SDXL:
    ``resolution`` = the native image size (UNet sample_size x VAE factor, 1024 for
    SDXL base) and the :func:`default_layers` pair. ``model`` is a loaded
    :class:`SDPipeline` or anything :func:`load_pipeline` takes; a name whose configs
    are not on disk (an uncached hub id) gives ``{}``. SD3/FLUX (issue 28):
    :func:`emerdiff.sd.mmdit.mmdit_defaults` (blocks and timesteps, on the schedule of
    ``num_inference_steps`` at ``resolution``).
    """
    from emerdiff.sd.mmdit import mmdit_defaults

    mmdit = mmdit_defaults(model, resolution, num_inference_steps)
    if mmdit is not None:
        return mmdit
    if hasattr(model, "unet"):  # a loaded model (or a stand-in for one: those without a family are SD)
        if getattr(model, "family", "sd") == "sd":
            return {}
        query, modulation = default_layers(model.unet)
        return dict(resolution=model.native_resolution, query_layer=query, modulation_layer=modulation)
    configs = _unet_config_of(model)
    if configs is None:
        return {}
    unet_config, vae_config = configs
    try:
        if unet_family(unet_config) == "sd":
            return {}
        query, modulation = default_layers(_meta_unet_from_config(unet_config))
        native = int(unet_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)
    except (ModelLoadError, KeyError, TypeError, ValueError):
        return {}  # an unreadable or foreign config: load_pipeline reports it
    return dict(resolution=native, query_layer=query, modulation_layer=modulation)


def check_architecture(unet: Any, source: str = "model") -> None:
    """EmerDiff needs an SD-style UNet with a low-resolution cross-attention decoder block.

    SD family: the block is `up_blocks.1` (the config defaults' layers). In SD
    1.x/2.x it runs at 1/4 of the latent (16x16 for a 64x64 latent); the project's
    reference model has three levels and runs it at 1/2 of a 32x32 latent, which
    is also 16x16. Both are accepted. SDXL: :func:`low_resolution_block` must run
    at 1/2 of the latent or coarser (``up_blocks.0`` at 1/4 in SDXL base).
    """
    family = unet_family(unet.config)
    scales = _block_scales(unet.config)
    if family == "sdxl":
        try:
            block = low_resolution_block(unet)
        except ModelLoadError as err:
            raise ModelLoadError(f"{source}: {err}") from err
        if scales[block] < 2:
            raise ModelLoadError(
                f"{source} is SDXL-shaped but its lowest-resolution decoder cross-attention block {block} runs "
                "at the latent's full size; EmerDiff needs one at 1/2 of the latent or coarser "
                "(SDXL base: up_blocks.0 at 1/4)"
            )
        return
    layers = set(attention_layers(unet))
    needed = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    ok = needed in layers
    if ok:
        modules = dict(unet.named_modules())
        ok = _is_cross_attention(modules[needed]) and scales.get("up_blocks.1") in (2, 4)
    if not ok:
        raise ModelLoadError(
            f"{source} does not have the Stable Diffusion UNet layout EmerDiff needs: "
            "a cross-attention decoder block `up_blocks.1` (16x16 tokens for SD's 64x64 "
            "latent). SD v1.x and v2.x have it, and SDXL-shaped UNets (addition_embed_type "
            "'text_time') are read at their own block; DiT/MMDiT models (SD3, FLUX) are not "
            "supported (docs/PORTING.md)."
        )


# diffusers' / transformers' defaults of the config keys below, for a config.json that leaves one out
_CONFIG_DEFAULTS = {"unet": {"in_channels": 4, "out_channels": 4, "cross_attention_dim": 1280},
                    "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 4},
                    "text_encoder": {"hidden_size": 512}, "text_encoder_2": {"hidden_size": 512}}


def _config_value(config: Any, part: str, key: str) -> Any:
    value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    return _CONFIG_DEFAULTS[part][key] if value is None else value


def check_component_configs(unet: Any, vae: Any, text_encoder: Any, text_encoder_2: Any = None,
                            source: str = "model") -> None:
    """Refuse components that cannot work together, from their configs alone (dicts or config objects).

    Each check is one a UNet call would otherwise fail later with a shape traceback:
    the UNet's ``cross_attention_dim`` must equal the text encoder's ``hidden_size`` (SDXL: the sum of
    both encoders'); the VAE's ``latent_channels`` must equal the UNet's ``in_channels`` and
    ``out_channels`` (the UNet denoises the VAE's latents and predicts noise of their shape; an
    inpainting UNet's extra mask channels are refused here); the VAE must take and give 3-channel RGB.
    Raises :class:`ModelLoadError` naming both numbers and ``source`` (the folder or name).
    """
    sdxl = unet_family(unet) == "sdxl"
    width = int(_config_value(text_encoder, "text_encoder", "hidden_size"))
    what = f"the text encoder's hidden_size {width}"
    if sdxl and text_encoder_2 is not None:
        second = int(_config_value(text_encoder_2, "text_encoder_2", "hidden_size"))
        what = f"the text encoders' hidden sizes ({width} + {second} = {width + second})"
        width += second
    cross = _config_value(unet, "unet", "cross_attention_dim")
    dims = [int(d) for d in cross] if isinstance(cross, (list, tuple)) else [int(cross)]
    if any(d != width for d in dims):
        same = ("text_encoder and text_encoder_2 must come from the same SDXL model as the UNet" if sdxl
                else "the UNet and text_encoder must come from the same model")
        raise ModelLoadError(
            f"{source}: the UNet's cross_attention_dim {cross} does not match {what}: the UNet attends to the "
            f"text encoder's hidden states, so they must be equal; {same} (replace the mismatched component "
            "folder with the one the UNet was trained with)")
    latent = int(_config_value(vae, "vae", "latent_channels"))
    for key in ("in_channels", "out_channels"):
        channels = int(_config_value(unet, "unet", key))
        if channels != latent:
            extra = (" (an inpainting or other image-conditioned UNet, which EmerDiff does not support)"
                     if key == "in_channels" and channels > latent else "")
            raise ModelLoadError(
                f"{source}: the UNet's {key} {channels} does not match the VAE's latent_channels {latent}{extra}; "
                "the UNet denoises the VAE's latents, so both must be equal: use the UNet and VAE of one "
                "text-to-image model")
    for key in ("in_channels", "out_channels"):
        channels = int(_config_value(vae, "vae", key))
        if channels != 3:
            raise ModelLoadError(f"{source}: the VAE's {key} is {channels}, but EmerDiff encodes and decodes RGB "
                                 "images (3 channels); use the VAE of a Stable Diffusion model")


def check_model_configs(model: str | os.PathLike) -> None:
    """:func:`check_component_configs` of a model folder (or ``'reference'``) from its config.json files,
    before any weights are read; nothing is checked when the configs are not on disk or not readable
    JSON (the loader then reports what is wrong), nor for the built-in ``'tiny'``."""
    name = str(model)
    if name == "tiny":
        return
    try:
        if name == "reference":
            from emerdiff.assets import weights_dir

            folder = Path(weights_dir())
        else:
            folder = Path(name).expanduser()
        if not folder.is_dir():
            return
        configs = {part: json.loads((folder / part / "config.json").read_text())
                   for part in ("unet", "vae", "text_encoder")}
        second = folder / "text_encoder_2" / "config.json"
        configs["text_encoder_2"] = json.loads(second.read_text()) if second.is_file() else None
    except (OSError, ValueError):
        return
    if not all(isinstance(c, dict) for c in (configs["unet"], configs["vae"], configs["text_encoder"])):
        return
    try:
        check_component_configs(configs["unet"], configs["vae"], configs["text_encoder"],
                                configs["text_encoder_2"], str(folder))
    except (TypeError, ValueError):  # a value of a foreign type: the loader reports the config
        return


def model_timesteps(model: Any, num_inference_steps: int, resolution: int | None = None) -> list[int]:
    """The schedule's timesteps for any loaded model: SD/SDXL :func:`schedule_timesteps`, SD3/FLUX
    :func:`emerdiff.sd.mmdit.flow_timesteps` (FLUX's depend on ``resolution``)."""
    from emerdiff.sd.mmdit import MMDIT_FAMILIES, flow_timesteps

    family = getattr(model, "family", "sd")
    if family not in MMDIT_FAMILIES:
        return schedule_timesteps(model.scheduler, num_inference_steps)
    latent = None if resolution is None else (resolution // model.vae_scale_factor,) * 2
    return flow_timesteps(model.scheduler, num_inference_steps, latent, family)


def schedule_timesteps(scheduler: Any, num_inference_steps: int) -> list[int]:
    """Descending timesteps of the schedule (981, 961, ..., 1 for SD at 50 steps)."""
    scheduler.set_timesteps(num_inference_steps)
    return [int(t) for t in scheduler.timesteps]
