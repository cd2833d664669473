"""Load Stable Diffusion components from a hub id or a local diffusers folder.

The same code loads real SD weights and the tiny random pipelines of
`emerdiff.sd.components` and `builders` (written with ``save_pretrained``), so tests exercise the
real path. Only safetensors weights are accepted.

Four model families are accepted: two UNet families, told apart by the UNet config,

* ``sd`` (SD 1.x / 2.x and the project's reference model): one CLIP text
  encoder, the UNet conditioned on its hidden states only.
* ``sdxl`` (``addition_embed_type == "text_time"``): two text encoders whose
  penultimate hidden states are concatenated, plus SDXL's added conditioning
  (the pooled projection of ``text_encoder_2`` and the size/crop micro-conditioning
  ``time_ids``) that every UNet call needs: :meth:`SDPipeline.unet_kwargs`.

and two MMDiT families told apart by ``model_index.json`` (issue 28, :mod:`emerdiff.sd.mmdit`):
``sd3`` (``SD3Transformer2DModel``; CLIP-L, CLIP-G, T5) and ``flux`` (``FluxTransformer2DModel``; CLIP,
T5), loaded into the same :class:`SDPipeline` with the transformer in the ``unet`` slot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from emerdiff.sd.layers import (  # noqa: F401  (re-exported: the loader's public names)
    ModelLoadError,
    _looks_like_hub_id,
    attention_layers,
    check_architecture,
    check_component_configs,
    check_model_configs,
    component_configs,
    default_layers,
    family_defaults,
    feature_resolution,
    layer_table,
    low_resolution_block,
    model_geometry,
    self_attention_layers,
    unet_downsampling,
    unet_family,
)

COMPONENTS = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
SDXL_COMPONENTS = COMPONENTS + ("text_encoder_2", "tokenizer_2")
SPECIAL_MODELS = ("tiny", "reference")
FAMILIES = ("sd", "sdxl", "sd3", "flux")
# SDXL's micro-conditioning: original_size (h, w) + crops_coords_top_left (top, left) + target_size (h, w)
SDXL_TIME_IDS = 6


@dataclass
class SDPipeline:
    """The Stable Diffusion parts EmerDiff needs, frozen and in eval mode.

    ``family`` is ``"sd"``, ``"sdxl"``, ``"sd3"`` or ``"flux"`` (see the module docstring). Every UNet
    call passes ``encoder_hidden_states=empty_embedding`` (batch-expanded) plus
    :meth:`unet_kwargs` (empty for SD, SDXL's added conditioning otherwise). For ``sd3``/``flux``
    ``unet`` holds the MMDiT transformer and :func:`emerdiff.sd.mmdit.mmdit_forward` makes the call.
    """

    unet: Any
    vae: Any
    scheduler: Any
    tokenizer: Any
    text_encoder: Any
    empty_embedding: torch.Tensor  # (1, tokens, dim): text conditioning of "" (SDXL: both encoders concatenated)
    source: str  # what was loaded (hub id, folder, "tiny", "reference")
    family: str = "sd"
    tokenizer_2: Any = None  # SDXL only
    text_encoder_2: Any = None  # SDXL only: CLIPTextModelWithProjection
    empty_pooled: torch.Tensor | None = None  # SDXL only: (1, projection_dim) pooled conditioning of ""
    empty_prompt_zeros: bool = False  # SDXL: the unconditional input is all zeros (force_zeros_for_empty_prompt)
    # SDXL micro-conditioning override (original h, w, crop top, left, target h, w);
    # None: (H, W, 0, 0, H, W) of the image size each latent stands for, as diffusers' default
    time_ids: tuple[float, ...] | None = None
    tokenizer_3: Any = None  # SD3 only: T5 tokenizer
    text_encoder_3: Any = None  # SD3 only: T5 encoder
    guidance: float | None = None  # FLUX with guidance_embeds (FLUX.1-dev): the guidance embedding's value
    t5_max_length: int | None = None  # SD3/FLUX: T5 tokens of the conditioning (None: the pipeline's 256 / 512)

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
    def native_resolution(self) -> int:
        """Image side the UNet was built for: sample_size x the VAE factor (1024 for SDXL, 512 for SD 1.5;
        SD3/FLUX: :func:`emerdiff.sd.mmdit.native_latent`, 1024)."""
        if self.family in ("sd3", "flux"):
            from emerdiff.sd.mmdit import native_latent

            return native_latent(self.unet) * self.vae_scale_factor
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def name(self) -> str:
        return self.source

    def _hidden_states(self, tokenizer: Any, encoder: Any, prompts: list[str]) -> Any:
        tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
        with torch.no_grad():
            return encoder(tokens.input_ids.to(encoder.device), output_hidden_states=self.family == "sdxl")

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Text conditioning (batch, tokens, cross_attention_dim) for prompts, padded to the max length.

        SD: the last hidden state of the text encoder. SDXL (as diffusers'
        ``StableDiffusionXLPipeline.encode_prompt``): the penultimate hidden
        states of both encoders, concatenated on the channel axis.
        """
        if self.family == "sd":
            return self._hidden_states(self.tokenizer, self.text_encoder, prompts)[0].to(self.dtype)
        if self.family in ("sd3", "flux"):
            from emerdiff.sd.mmdit import encode_prompts

            return encode_prompts(self, prompts)[0]
        parts = [self._hidden_states(tok, enc, prompts).hidden_states[-2]
                 for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))]
        return torch.cat(parts, dim=-1).to(self.dtype)

    def encode_pooled(self, prompts: list[str]) -> torch.Tensor:
        """SDXL's pooled text conditioning (batch, projection_dim): ``text_encoder_2``'s projected EOS state."""
        if self.family in ("sd3", "flux"):
            from emerdiff.sd.mmdit import encode_prompts

            return encode_prompts(self, prompts)[1]
        if self.family != "sdxl":
            raise ValueError(f"pooled text conditioning exists for SDXL, SD3 and FLUX models only; {self.source} "
                             f"is {self.family}")
        return self._hidden_states(self.tokenizer_2, self.text_encoder_2, prompts)[0].to(self.dtype)

    def micro_conditioning(self, image_size: tuple[int, int] | None = None) -> tuple[float, ...]:
        """SDXL's time_ids for an image of ``image_size`` (h, w) pixels (default the native size):
        original size + crop top-left (0, 0) + target size, unless :attr:`time_ids` fixes them."""
        if self.time_ids is not None:
            return tuple(self.time_ids)
        h, w = image_size or (self.native_resolution, self.native_resolution)
        return (h, w, 0, 0, h, w)

    def unet_kwargs(self, batch: int, latent_size: tuple[int, int] | None = None) -> dict[str, Any]:
        """Extra keyword arguments of a UNet call on ``batch`` latents of ``latent_size`` (h, w).

        ``{}`` for SD. For SDXL ``added_cond_kwargs`` with the pooled empty-prompt
        conditioning (``text_embeds``) and the micro-conditioning (``time_ids``) of the
        image size the latent stands for (latent x the VAE factor; default the native size).
        """
        if self.family == "sd":
            return {}
        assert self.empty_pooled is not None
        size = None if latent_size is None else (latent_size[0] * self.vae_scale_factor,
                                                 latent_size[1] * self.vae_scale_factor)
        ids = torch.tensor([self.micro_conditioning(size)], dtype=self.dtype, device=self.device)
        return {"added_cond_kwargs": {"text_embeds": self.empty_pooled.expand(batch, -1),
                                      "time_ids": ids.expand(batch, -1)}}


class Float32VAE(torch.nn.Module):
    """A VAE kept in float32 behind a half-precision model: inputs are cast up, latents and
    images come back in ``dtype``.

    SDXL's VAE overflows in float16 (its config says ``force_upcast``; diffusers'
    SDXL pipeline upcasts it for the same reason), so a half-precision SDXL model
    runs its VAE this way; the UNet stays in half precision.
    """

    def __init__(self, vae: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.vae = vae.to(torch.float32)
        self.out_dtype = dtype

    @property
    def config(self) -> Any:
        return self.vae.config

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Any:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        dist = self.vae.encode(x.float()).latent_dist
        dist = DiagonalGaussianDistribution(dist.parameters.to(self.out_dtype))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> Any:
        from diffusers.models.autoencoders.vae import DecoderOutput

        image = self.vae.decode(z.float()).sample.to(self.out_dtype)
        return DecoderOutput(sample=image) if return_dict else (image,)


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


def _folder_family(folder: Path) -> str:
    """Family of a local folder from ``unet/config.json`` ("sd" when it cannot be read: the
    component check then names what is missing)."""
    import json

    try:
        return unet_family(json.loads((folder / "unet" / "config.json").read_text()))
    except (OSError, ValueError):
        return "sd"


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise ModelLoadError(
            f"model folder {folder} does not exist. Pass a folder in diffusers layout "
            f"(with {', '.join(COMPONENTS)} subfolders; SDXL also text_encoder_2, tokenizer_2), a hub id "
            "such as 'stable-diffusion-v1-5/stable-diffusion-v1-5', 'tiny' or 'reference'."
        )
    if not folder.is_dir():
        raise ModelLoadError(f"model path {folder} is a file; pass the pipeline folder that holds it")
    family = _folder_family(folder)
    for part in SDXL_COMPONENTS if family == "sdxl" else COMPONENTS:
        sub = folder / part
        if not sub.is_dir():
            why = ""
            if family == "sdxl":
                why = (" Its UNet is SDXL-shaped (addition_embed_type 'text_time'), which needs both text "
                       "encoders and tokenizers (text_encoder, tokenizer, text_encoder_2, tokenizer_2).")
                if part == "text_encoder" and (folder / "text_encoder_2").is_dir():
                    why += " Folders with text_encoder_2 only (the SDXL refiner) are not supported."
            raise ModelLoadError(
                f"model folder {folder} is incomplete: component '{part}' is missing "
                f"(expected {sub}/).{why} Download the full pipeline (e.g. `hf download REPO "
                f"--local-dir {folder}`) or save it with `pipe.save_pretrained`."
            )
        if part in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if not any(sub.glob("*.safetensors")):
                bins = list(sub.glob("*.bin")) + list(sub.glob("*.ckpt"))
                hint = (" It holds only pickle weights (.bin); convert them to safetensors"
                        " (emerdiff loads safetensors only)." if bins else "")
                raise ModelLoadError(
                    f"component '{part}' in {folder} has no .safetensors weights.{hint}"
                )


def _hub_error(model: str, err: Exception, offline: bool) -> ModelLoadError:
    how = (
        "Download it on a machine with hub access (`hf download "
        f"{model} --local-dir ./sd`) and pass the folder: load_pipeline('./sd') "
        "or `emerdiff segment IMG --model ./sd`. Set HF_HUB_OFFLINE=1 to never touch the network."
    )
    state = "is not in the local cache (offline mode)" if offline else "could not be fetched from the hub"
    return ModelLoadError(f"model {model!r} {state}: {type(err).__name__}: {err}\n{how}")


def _force_zeros_for_empty_prompt(path: str, local: bool, offline: bool) -> bool:
    """The SDXL pipeline flag ``force_zeros_for_empty_prompt`` of ``model_index.json``.

    True (diffusers' default for SDXL, and what SDXL base ships) means the
    unconditional input is all-zero text conditioning, not the encoding of "".
    """
    import json

    try:
        if local:
            file: Any = Path(path) / "model_index.json"
        else:
            from huggingface_hub import hf_hub_download

            file = hf_hub_download(path, "model_index.json", local_files_only=offline)
        return bool(json.loads(Path(file).read_text()).get("force_zeros_for_empty_prompt", True))
    except (OSError, ValueError):  # no model_index.json, or the hub unreachable: the pipeline's default
        return True


def _check_sdxl_conditioning(unet: Any, text_encoder: Any, text_encoder_2: Any, source: str) -> None:
    """The two encoders' widths must match the UNet's cross-attention and added-embedding inputs."""
    width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    if width != unet.config.cross_attention_dim:
        raise ModelLoadError(
            f"{source}: the text encoders' hidden sizes ({text_encoder.config.hidden_size} + "
            f"{text_encoder_2.config.hidden_size} = {width}) do not match the UNet's cross_attention_dim "
            f"{unet.config.cross_attention_dim}; text_encoder and text_encoder_2 must come from the same SDXL model"
        )
    expected = unet.add_embedding.linear_1.in_features
    passed = unet.config.addition_time_embed_dim * SDXL_TIME_IDS + text_encoder_2.config.projection_dim
    if expected != passed:
        raise ModelLoadError(
            f"{source}: the UNet's added embedding takes {expected} inputs but {SDXL_TIME_IDS} time ids x "
            f"{unet.config.addition_time_embed_dim} + the pooled width {text_encoder_2.config.projection_dim} "
            f"= {passed}; only SDXL base-style size/crop conditioning is supported (the refiner's aesthetic "
            "score is not)"
        )


def load_pipeline(
    model: str | os.PathLike = "tiny",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    local_files_only: bool | None = None,
) -> SDPipeline:
    """Load UNet, VAE, scheduler, text encoder(s) and the empty-prompt conditioning.

    SD 1.x/2.x and SDXL layouts are both accepted (the UNet config tells them
    apart; an SDXL folder also needs ``text_encoder_2`` and ``tokenizer_2``).

    Args:
        model: a local folder in diffusers layout, a hub id, ``"tiny"`` (a tiny
            random SD-shaped pipeline, built and cached on first use) or
            ``"reference"`` (the project's own trained model, shipped in the package).
        device: "cpu", "cuda", ... (default: cuda if available).
        dtype: "float32", "float16", "bfloat16" (default: fp16 on CUDA, fp32 on CPU).
            A half-precision SDXL model keeps its VAE in float32 (:class:`Float32VAE`).
        local_files_only: never touch the network; default follows HF_HUB_OFFLINE.

    Returns:
        An :class:`SDPipeline` with frozen modules on ``device``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors import SafetensorError
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    offline = _offline(local_files_only)
    name = str(model)
    if name == "tiny":
        from emerdiff.sd.components import tiny_pipeline_dir

        path: str = str(tiny_pipeline_dir())
    elif name == "reference":
        from emerdiff.assets import weights_dir

        try:
            path = str(weights_dir())
        except FileNotFoundError as err:
            raise ModelLoadError(str(err)) from None
    else:
        path = name
    local = Path(path).expanduser()
    looks_local = local.exists() or not _looks_like_hub_id(path)
    from emerdiff.sd.mmdit import check_folder, folder_family, hub_family

    mmdit = folder_family(local) if looks_local else hub_family(path, offline)
    if mmdit is not None:  # SD3 / FLUX (issue 28): the MMDiT loader
        if looks_local:
            check_folder(local, mmdit)
            path, offline = str(local), True
        return load_mmdit(path, mmdit, dev, dt, offline, name, looks_local)
    if looks_local:
        _check_folder(local)
        check_model_configs(local)  # mismatched components refused before any weights are read
        path = str(local)
        offline = True
    kw: dict[str, Any] = dict(local_files_only=offline)
    extra: dict[str, Any] = {}
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True, torch_dtype=dt, **kw)
        family = unet_family(unet.config)
        upcast_vae = family == "sdxl" and dt != torch.float32
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True,
                                            torch_dtype=torch.float32 if upcast_vae else dt, **kw)
        # DDIM with eta=1 is the DDPM posterior step the inversion needs;
        # its config (betas, offset, prediction type) comes from the model.
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", use_safetensors=True, **kw)
        if family == "sdxl":
            extra["tokenizer_2"] = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw)
            extra["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder_2", use_safetensors=True, **kw)
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
    # the loaded configs again: a hub model's were not on disk before the download
    check_component_configs(unet.config, vae.config, text_encoder.config,
                            extra["text_encoder_2"].config if family == "sdxl" else None, name)
    check_architecture(unet, name)
    if family == "sdxl":
        _check_sdxl_conditioning(unet, text_encoder, extra["text_encoder_2"], name)
        if upcast_vae and getattr(vae.config, "force_upcast", True):
            vae = Float32VAE(vae, dt)
        elif upcast_vae:  # a VAE fixed for half precision (force_upcast false) runs like the UNet
            vae = vae.to(dt)
    encoders = [text_encoder] + ([extra["text_encoder_2"]] if family == "sdxl" else [])
    for module in (unet, vae, *encoders):
        module.requires_grad_(False)
        module.eval()
        module.to(dev)
    sd = SDPipeline(unet, vae, scheduler, tokenizer, text_encoder, torch.empty(0), name, family=family, **extra)
    sd.empty_embedding = sd.encode_text([""])
    if family == "sdxl":
        sd.empty_pooled = sd.encode_pooled([""])
        sd.empty_prompt_zeros = _force_zeros_for_empty_prompt(path, looks_local, offline)
        if sd.empty_prompt_zeros:
            sd.empty_embedding = torch.zeros_like(sd.empty_embedding)
            sd.empty_pooled = torch.zeros_like(sd.empty_pooled)
    return sd


# ------------------------------------------------------------- SD3 / FLUX
def load_mmdit(path: str, family: str, device: torch.device, dtype: torch.dtype, offline: bool, name: str,
               looks_local: bool) -> SDPipeline:
    """Load an SD3 or FLUX pipeline folder / hub id into an :class:`SDPipeline` (``unet`` = the transformer)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
    from safetensors import SafetensorError
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    from emerdiff.sd.mmdit import FLUX_GUIDANCE, FLUX_PACK, check_conditioning, encode_prompts

    kw: dict[str, Any] = dict(local_files_only=offline)
    weights: dict[str, Any] = dict(use_safetensors=True, **kw)
    parts: dict[str, Any] = {}
    try:
        cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
        transformer = cls.from_pretrained(path, subfolder="transformer", torch_dtype=dtype, **weights)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **weights)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        if family == "sd3":
            for i, sub in ((1, ""), (2, "_2")):
                parts[f"text_encoder{sub}"] = CLIPTextModelWithProjection.from_pretrained(
                    path, subfolder=f"text_encoder{sub}", **weights)
                parts[f"tokenizer{sub}"] = AutoTokenizer.from_pretrained(path, subfolder=f"tokenizer{sub}", **kw)
            parts["text_encoder_3"] = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", **weights)
            parts["tokenizer_3"] = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_3", **kw)
        else:
            parts["text_encoder"] = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights)
            parts["tokenizer"] = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
            parts["text_encoder_2"] = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", **weights)
            parts["tokenizer_2"] = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw)
    except SafetensorError as err:
        raise ModelLoadError(f"could not load the model in {path}: a .safetensors weights file is corrupt or "
                             f"empty ({err}); re-download or re-save that component") from err
    except (OSError, ValueError) as err:
        if looks_local:
            raise ModelLoadError(f"could not load the {family} model in {path}: {err}") from err
        raise _hub_error(name, err, offline) from err
    check_conditioning(transformer, parts, family, name)
    if vae.config.latent_channels * (FLUX_PACK**2 if family == "flux" else 1) != transformer.config.in_channels:
        raise ModelLoadError(f"{name}: the VAE's latent_channels {vae.config.latent_channels} do not feed the "
                             f"transformer's in_channels {transformer.config.in_channels}")
    encoders = [v for k, v in parts.items() if k.startswith("text_encoder")]
    for module in (transformer, vae, *encoders):
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    sd = SDPipeline(transformer, vae, scheduler, parts["tokenizer"], parts["text_encoder"], torch.empty(0), name,
                    family=family, tokenizer_2=parts["tokenizer_2"], text_encoder_2=parts["text_encoder_2"],
                    tokenizer_3=parts.get("tokenizer_3"), text_encoder_3=parts.get("text_encoder_3"))
    sd.empty_embedding, sd.empty_pooled = encode_prompts(sd, [""])
    if family == "flux" and transformer.config.guidance_embeds:
        sd.guidance = FLUX_GUIDANCE
    return sd


# ---------------------------------------------------------------- layers
