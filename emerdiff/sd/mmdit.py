"""MMDiT denoisers (SD3, FLUX): folder recognition, loading, empty-prompt conditioning, the denoiser
call, the token grid and the flow-matching timesteps (issue 28; docs/PORTING.md).

An MMDiT model is loaded (``emerdiff.sd.loading.load_mmdit``) into the same :class:`~emerdiff.sd.loading.SDPipeline` as SD/SDXL, with
``family`` ``"sd3"`` or ``"flux"`` and the transformer in the ``unet`` slot (the pipeline's one name
for "the denoiser"; :func:`is_mmdit` tells the kinds apart). Everything that differs from a UNet
lives here (model side) and in :mod:`emerdiff.method.mmdit` (processors, flow schedule):

* **Family**: from ``model_index.json`` (the pipeline's ``_class_name`` or the ``transformer``
  entry's class), else ``transformer/config.json``'s ``_class_name``.
* **Conditioning of ""**, written after diffusers' pipelines (``encode_prompt``), not copied:
  SD3 (``StableDiffusion3Pipeline``): CLIP-L and CLIP-G penultimate hidden states concatenated,
  zero-padded to T5's width, followed by T5's last hidden state (256 tokens); pooled = the two
  CLIP projected EOS states concatenated. The unconditional input is the encoding of "" (SD3 has
  no ``force_zeros_for_empty_prompt``). FLUX (``FluxPipeline``): T5 tokens (512), CLIP's
  ``pooler_output`` as pooled, text position ids all zero, and, for guidance-distilled
  transformers (``guidance_embeds``: FLUX.1-dev), the pipeline's default guidance 3.5.
* **The call**: SD3 takes ``(B, 16, h, w)`` latents and ``timestep = 1000 sigma``; FLUX takes
  2x2-packed latents ``(B, h/2 * w/2, 64)``, image position ids (row, column) and ``timestep = sigma``.
  :func:`mmdit_forward` packs and unpacks, so the rest of EmerDiff sees ``(B, 16, h, w)`` latents.
* **Timesteps**: integers ``t = round(1000 sigma)`` of the scheduler's (shifted) sigmas, and the
  sampler uses ``sigma = t / 1000`` exactly, so configs, probes and the inversion speak one scale
  and the model is told the same t the latent was noised at.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from emerdiff.sd.loading import SDPipeline

MMDIT_FAMILIES = ("sd3", "flux")
TRANSFORMER_CLASSES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
PIPELINE_CLASSES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
SD3_COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                  "text_encoder_3", "tokenizer_3")
FLUX_COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
COMPONENTS = {"sd3": SD3_COMPONENTS, "flux": FLUX_COMPONENTS}
WEIGHTED = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
T5_MAX_LENGTH = {"sd3": 256, "flux": 512}  # the pipelines' default max_sequence_length
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale (the guidance embedding of FLUX.1-dev)
FLUX_PACK = 2  # FLUX packs 2x2 latents into one token (64 channels from 16)


# The transformer configs of the released models (diffusers layout), for shapes and FLOP counts without weights.
SD3_MEDIUM_TRANSFORMER_CONFIG: dict[str, Any] = dict(  # stabilityai/stable-diffusion-3-medium-diffusers
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
FLUX_DEV_TRANSFORMER_CONFIG: dict[str, Any] = dict(  # black-forest-labs/FLUX.1-dev (schnell: guidance_embeds False)
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)


# ----------------------------------------------------------------- recognition
def family_of_index(index: dict[str, Any]) -> str | None:
    """"sd3" / "flux" from a ``model_index.json`` dict, None for anything else (SD, SDXL)."""
    name = index.get("_class_name")
    if name in PIPELINE_CLASSES:
        return PIPELINE_CLASSES[name]
    entry = index.get("transformer")
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] in TRANSFORMER_CLASSES:
        return TRANSFORMER_CLASSES[entry[1]]
    return None


def local_folder(model: str | os.PathLike) -> Path:
    """The folder a name stands for: itself, or for a hub id cached on disk its snapshot folder (so presets of a
    cached SD3/FLUX hub id are read like a folder's); a name that is neither comes back as a Path."""
    folder = Path(str(model)).expanduser()
    if folder.exists():
        return folder
    parts = str(model).split("/")
    if len(parts) == 2 and all(parts) and not str(model).startswith((".", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(model), "model_index.json")
            if isinstance(cached, str):
                return Path(cached).parent
        except Exception:  # noqa: BLE001  no cache / a malformed id: not a cached hub model
            pass
    return folder


def folder_family(folder: str | os.PathLike) -> str | None:
    """"sd3" / "flux" for a local MMDiT folder or cached hub id (model_index.json, else transformer/config.json),
    else None."""
    folder = local_folder(folder)
    try:
        family = family_of_index(json.loads((folder / "model_index.json").read_text()))
        if family is not None:
            return family
    except (OSError, ValueError, AttributeError):
        pass
    try:
        config = json.loads((folder / "transformer" / "config.json").read_text())
        return TRANSFORMER_CLASSES.get(config.get("_class_name"))
    except (OSError, ValueError, AttributeError):
        return None


def hub_family(model: str, offline: bool) -> str | None:
    """"sd3" / "flux" for a hub id whose model_index.json can be read (cache, or the hub when online)."""
    try:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(model, "model_index.json", local_files_only=offline)
        return family_of_index(json.loads(Path(file).read_text()))
    except Exception:  # noqa: BLE001  unreachable / not cached / no index: the UNet path reports it
        return None


def check_folder(folder: Path, family: str) -> None:
    """Every component the family needs is there, with safetensors weights; ModelLoadError naming the part."""
    from emerdiff.sd.errors import ModelLoadError

    what = {"sd3": "SD3 (SD3Transformer2DModel; CLIP-L, CLIP-G and T5 encoders)",
            "flux": "FLUX (FluxTransformer2DModel; CLIP and T5 encoders)"}[family]
    for part in COMPONENTS[family]:
        sub = folder / part
        if not sub.is_dir():
            raise ModelLoadError(
                f"model folder {folder} is incomplete: component '{part}' is missing (expected {sub}/). "
                f"It is a {what} folder, which needs {', '.join(COMPONENTS[family])}. Download the full "
                f"pipeline (e.g. `hf download REPO --local-dir {folder}`) or save it with `pipe.save_pretrained`."
            )
        if part in WEIGHTED and not any(sub.glob("*.safetensors")) and not any(sub.glob("*.safetensors.index.json")):
            raise ModelLoadError(f"component '{part}' in {folder} has no .safetensors weights "
                                 "(emerdiff loads safetensors only)")


def is_mmdit(module: Any) -> bool:
    """True for an SD3/FLUX transformer (or its config): the denoiser has a patch size and no UNet blocks."""
    config = getattr(module, "config", module)
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    return get("patch_size") is not None and get("down_block_types") is None and (
        get("joint_attention_dim") is not None)


def transformer_family(module: Any) -> str:
    """"sd3" or "flux" of a transformer or its config (the class name, else FLUX's single-stream blocks)."""
    config = getattr(module, "config", module)
    name = config.get("_class_name") if isinstance(config, dict) else type(module).__name__
    if name in TRANSFORMER_CLASSES:
        return TRANSFORMER_CLASSES[name]
    single = config.get("num_single_layers") if isinstance(config, dict) else getattr(config, "num_single_layers", None)
    return "flux" if single is not None else "sd3"


# ----------------------------------------------------------------- geometry
def token_patch(module: Any) -> int:
    """Latent pixels per token side: SD3's ``patch_size`` (2); FLUX packs 2x2 latents (patch_size 1 x 2)."""
    config = getattr(module, "config", module)
    patch = int(config["patch_size"] if isinstance(config, dict) else config.patch_size)
    return patch * FLUX_PACK if transformer_family(module) == "flux" else patch


def token_grid(module: Any, latent_size: int | tuple[int, int]) -> tuple[int, int]:
    """(h, w) image-token grid of every block for a latent of ``latent_size``: the grid follows the patch size."""
    h, w = (latent_size, latent_size) if isinstance(latent_size, int) else latent_size
    p = token_patch(module)
    return h // p, w // p


def native_latent(module: Any) -> int:
    """Native latent side: SD3's ``sample_size`` (128 = 1024 px); FLUX has none in its config, its
    pipeline's default is 1024 px (latent 128)."""
    size = getattr(module.config, "sample_size", None)
    return int(size) if size is not None else 128


def block_names(module: Any) -> list[str]:
    """Attention module paths in forward order (``transformer_blocks.i.attn`` [``.attn2``], then FLUX's
    ``single_transformer_blocks.i.attn``)."""
    return [k[: -len(".processor")] for k in module.attn_processors]


def attention_kind(module: Any, name: str) -> str:
    """"joint" (SD3 / FLUX double-stream: image and text streams meet), "single" (FLUX single-stream:
    one joint sequence, text first), "image" (SD3.5's image-only ``attn2``)."""
    if name.startswith("single_transformer_blocks."):
        return "single"
    if name.endswith(".attn2"):
        return "image"
    return "joint"


def _get(module: Any, key: str, default: Any = None) -> Any:
    config = getattr(module, "config", module)
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def default_blocks(module: Any) -> tuple[str, str]:
    """Placeholder (query, modulation) block of an MMDiT (a transformer or its config), chosen without real
    weights (docs/PORTING.md): SD3: the joint attention of the middle block, ``transformer_blocks.{n // 2}.attn``,
    for both (the middle of the depth, where Seg4Diff reports semantically grouped queries in SD3); FLUX: the
    last double-stream block's joint attention (ConceptAttention reads FLUX's later double-stream blocks).
    The probes (notebooks 01-02, ``emerdiff.studies.probes``) sweep every block to replace it."""
    n = int(_get(module, "num_layers", 0))
    if n < 1:
        from emerdiff.sd.errors import ModelLoadError

        raise ModelLoadError("this transformer has no joint-attention block (num_layers 0)")
    block = f"transformer_blocks.{n - 1 if transformer_family(module) == 'flux' else n // 2}.attn"
    return block, block


MMDIT_MAX_RESOLUTION = 512  # placeholder preset side: 32x32 tokens (SD's 16x16 grid at 1/32 would be 256 px)


def mmdit_defaults(model: Any, resolution: int | None = None, num_inference_steps: int = 50) -> dict[str, Any] | None:
    """The model-read part of the ``sd3`` / ``flux`` presets, or None when ``model`` is not an MMDiT.

    ``resolution`` = min(native, 512) unless given; the placeholder blocks of :func:`default_blocks`;
    ``modulation_timestep`` = the schedule timestep matching SD's t = 281 in signal-to-noise ratio
    (:func:`snr_matched_timestep`) and ``feature_timestep`` = the schedule's last (smallest) timestep, as SD's
    t = 1: both on the schedule of ``num_inference_steps`` steps at ``resolution`` (FLUX's shift depends on
    it). ``model``: a loaded SDPipeline or a local folder (configs read without weights); a hub id gives None.
    """
    from types import SimpleNamespace

    if hasattr(model, "unet"):
        if getattr(model, "family", "sd") not in MMDIT_FAMILIES:
            return None
        family, transformer, scheduler = model.family, model.unet, model.scheduler
        vae_factor, native = model.vae_scale_factor, model.native_resolution
    else:
        folder = local_folder(model)
        family = folder_family(folder) if folder.is_dir() else None
        if family is None:
            return None
        try:
            transformer = json.loads((folder / "transformer" / "config.json").read_text())
            vae = json.loads((folder / "vae" / "config.json").read_text())
            scheduler = SimpleNamespace(config=json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
            vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        except (OSError, ValueError, KeyError, TypeError):
            return {}  # load_pipeline names what is missing
        native = int(transformer.get("sample_size") or 128) * vae_factor
    side = resolution or min(native, MMDIT_MAX_RESOLUTION)
    fields: dict[str, Any] = dict(resolution=side)
    try:
        fields["query_layer"], fields["modulation_layer"] = default_blocks(transformer)
        steps = flow_timesteps(scheduler, num_inference_steps, (side // vae_factor,) * 2, family)
    except (ValueError, KeyError, TypeError):
        return fields  # validate reports a bad step count / config
    fields.update(modulation_timestep=snr_matched_timestep(steps), feature_timestep=steps[-1])
    return fields


def layer_rows(module: Any, latent_size: int | None = None) -> list[dict[str, Any]]:
    """:func:`emerdiff.sd.layers.layer_table`'s rows for a transformer: every attention, its kind, its block."""
    h, w = token_grid(module, native_latent(module) if latent_size is None else latent_size)
    modules = dict(module.named_modules())
    rows = []
    for name in block_names(module):
        attn = modules[name]
        rows.append(dict(layer=name, kind=attention_kind(module, name), block=".".join(name.split(".")[:2]),
                         resolution=f"{h}x{w}", tokens=h * w, channels=attn.to_q.out_features, heads=attn.heads))
    return rows


# ---------------------------------------------------------------- timesteps
def flow_timesteps(scheduler: Any, num_inference_steps: int, latent_size: tuple[int, int] | None,
                   family: str) -> list[int]:
    """Descending integer timesteps round(1000 sigma) of the flow scheduler's sigmas, as the family's pipeline
    sets them: SD3 ``set_timesteps(n)`` (static shift); FLUX ``sigmas = linspace(1, 1/n, n)`` with the dynamic
    shift ``mu`` of the image-token count (``calculate_shift``; needs ``latent_size``). ValueError when two
    sigmas round to one integer (very many steps)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)  # set_timesteps mutates: a copy
    if sched.config.get("use_dynamic_shifting", False):
        if latent_size is None:
            raise ValueError("a dynamically shifted flow schedule (FLUX) depends on the image size; pass latent_size")
        c = sched.config
        seq = (latent_size[0] // FLUX_PACK) * (latent_size[1] // FLUX_PACK)
        base, top = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        lo, hi = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
        mu = seq * (hi - lo) / (top - base) + lo - (hi - lo) / (top - base) * base
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if family == "flux" else None
        sched.set_timesteps(num_inference_steps, sigmas=sigmas, mu=mu)
    else:
        sched.set_timesteps(num_inference_steps)
    steps = [int(round(float(s) * 1000)) for s in sched.sigmas[:-1]]
    if len(set(steps)) != len(steps) or min(steps) < 1:
        raise ValueError(f"{num_inference_steps} flow steps do not give distinct integer timesteps "
                         f"round(1000 sigma); use fewer steps")
    return steps


def snr_matched_timestep(timesteps: list[int], sd_timestep: int = 281) -> int:
    """The flow timestep whose signal-to-noise ratio ((1 - s) / s)^2 is nearest (in log) SD's at ``sd_timestep``
    (alphas_cumprod / (1 - alphas_cumprod) of SD's scaled-linear betas): how the paper's t_m carries over."""
    import math

    betas = [(0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * i / 999) ** 2 for i in range(1000)]
    a = 1.0
    for b in betas[: sd_timestep + 1]:
        a *= 1 - b
    target = math.log(a / (1 - a))
    return min(timesteps, key=lambda t: abs(2 * math.log(max(1000 - t, 1e-6) / t) - target))  # t = 1000: SNR 0


# -------------------------------------------------------------- conditioning
def _tokens(tokenizer: Any, prompts: list[str], length: int) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompts(model: SDPipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token conditioning (B, L, joint_attention_dim), pooled (B, pooled_projection_dim)) of ``prompts``,
    as the family's diffusers pipeline encodes them (module docstring)."""
    length = model.t5_max_length or T5_MAX_LENGTH[model.family]
    with torch.no_grad():
        if model.family == "sd3":
            states, pooled = [], []
            for tok, enc in ((model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)):
                out = enc(_tokens(tok, prompts, tok.model_max_length).to(enc.device), output_hidden_states=True)
                states.append(out.hidden_states[-2])
                pooled.append(out[0])
            clip = torch.cat(states, dim=-1)
            t5 = model.text_encoder_3(_tokens(model.tokenizer_3, prompts, length).to(model.text_encoder_3.device))[0]
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            return torch.cat([clip, t5.to(clip.dtype)], dim=-2).to(model.dtype), torch.cat(pooled, -1).to(model.dtype)
        clip_tok = model.tokenizer
        pooled_out = model.text_encoder(_tokens(clip_tok, prompts, clip_tok.model_max_length).to(model.text_encoder.device),
                                        output_hidden_states=False).pooler_output
        t5 = model.text_encoder_2(_tokens(model.tokenizer_2, prompts, length).to(model.text_encoder_2.device))[0]
        return t5.to(model.dtype), pooled_out.to(model.dtype)


def check_conditioning(transformer: Any, encoders: dict[str, Any], family: str, source: str) -> None:
    """The encoders' widths must be the transformer's inputs (ModelLoadError naming both numbers)."""
    from emerdiff.sd.errors import ModelLoadError

    c = transformer.config
    if family == "sd3":
        t5 = encoders["text_encoder_3"].config.d_model
        clip = encoders["text_encoder"].config.hidden_size + encoders["text_encoder_2"].config.hidden_size
        pooled = encoders["text_encoder"].config.projection_dim + encoders["text_encoder_2"].config.projection_dim
        if clip > t5:
            raise ModelLoadError(f"{source}: the CLIP widths ({clip}) exceed T5's d_model {t5}; SD3 pads CLIP to T5's width")
    else:
        t5 = encoders["text_encoder_2"].config.d_model
        pooled = encoders["text_encoder"].config.hidden_size
    if t5 != c.joint_attention_dim:
        raise ModelLoadError(f"{source}: the T5 encoder's d_model {t5} is not the transformer's joint_attention_dim "
                             f"{c.joint_attention_dim}; the encoders must come from the same {family} model")
    if pooled != c.pooled_projection_dim:
        raise ModelLoadError(f"{source}: the pooled CLIP width {pooled} is not the transformer's pooled_projection_dim "
                             f"{c.pooled_projection_dim}; the encoders must come from the same {family} model")


# --------------------------------------------------------------------- the call
def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> FLUX tokens (B, h/2 * w/2, 4C), row-major, as FluxPipeline._pack_latents."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pack`: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, d = tokens.shape
    h, w = size
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """FLUX's image position ids (h*w, 3): (0, row, column)."""
    h, w = grid
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device, dtype)


def mmdit_forward(model: SDPipeline, x: torch.Tensor, t: int) -> torch.Tensor:
    """One transformer call on (B, C, h, w) latents at integer timestep ``t`` (sigma = t / 1000) with the
    empty-prompt conditioning; returns the velocity (B, C, h, w)."""
    batch = x.shape[0]
    emb = model.empty_embedding.expand(batch, -1, -1)
    pooled = model.empty_pooled.expand(batch, -1)  # type: ignore[union-attr]
    if model.family == "sd3":
        timestep = torch.full((batch,), float(t), device=x.device, dtype=x.dtype)
        return model.unet(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled,
                          timestep=timestep, return_dict=False)[0]
    h, w = x.shape[-2:]
    timestep = torch.full((batch,), t / 1000, device=x.device, dtype=x.dtype)
    guidance = (torch.full((batch,), model.guidance, device=x.device, dtype=torch.float32)
                if model.unet.config.guidance_embeds else None)
    out = model.unet(hidden_states=pack(x), encoder_hidden_states=emb, pooled_projections=pooled, timestep=timestep,
                     img_ids=image_ids((h // 2, w // 2), x.device, x.dtype),
                     txt_ids=torch.zeros(emb.shape[1], 3, device=x.device, dtype=x.dtype),
                     guidance=guidance, return_dict=False)[0]
    return unpack(out, (h, w))
