"""The reference model: a small latent diffusion model with Stable Diffusion's architecture.

Same component classes and block types as SD 1.x (``AutoencoderKL``,
``UNet2DConditionModel`` with CrossAttnDown/UpBlock2D, a CLIP text encoder
and BPE tokenizer, the SD scaled-linear DDPM schedule), scaled down so it
trains on 2 CPU cores in hours or on one GPU in minutes:

- images are 128x128 (the scene world's native size);
- the VAE has 3 resolution levels, so its scale factor is 4 and the latent is
  32x32x4 (SD: 512 -> 64x64x4 with factor 8);
- the UNet has 3 levels (32, 16, 8) instead of SD's 4 (64, 32, 16, 8). Block
  types follow SD from the bottom up, so ``up_blocks.0`` is the attention-free
  ``UpBlock2D`` at the lowest resolution and ``up_blocks.1`` is the first
  cross-attention decoder block with ``attentions.{0,1,2}`` at **16x16**
  tokens, exactly the grid SD's ``up_blocks.1`` has. The price is that this
  block sits at 1/2 of the latent size, not 1/4 as in SD.
- preset "small" (CPU) drops the transformer blocks of the 32x32 level
  (plain DownBlock2D/UpBlock2D there); preset "base" keeps SD's pattern.

Why not factor 8 at 256 px or a 4-level UNet: a 64x64 latent puts
self-attention over 4096 tokens in ``down_blocks.0`` (measured: ~8x slower
per step), and a 256-px VAE costs 4x more per image than a 128-px one.

The tokenizer is the offline CLIP BPE of :func:`emerdiff.sd.components.write_tokenizer`
with every caption word of the scene world as one token.
"""

from __future__ import annotations

import json
import os
import tempfile
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch

from emerdiff.assets.scenes import CAPTION_WORDS
from emerdiff.sd.components import SD_SCHEDULER_CONFIG, write_tokenizer

# Model sizes. "small" is the CPU-trainable reference model, "base" keeps SD's
# attention at every level but the lowest (for the GPU machine), "tiny" is for tests.
_VAE_SMALL: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(32, 64, 128),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=32, sample_size=128, scaling_factor=1.0,  # set from data after VAE training
)
_UNET_COMMON: dict[str, Any] = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
    center_input_sample=False, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
    downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5,
)
_TEXT_SMALL: dict[str, Any] = dict(hidden_size=128, intermediate_size=512, num_attention_heads=4,
                                   num_hidden_layers=3, max_position_embeddings=77, projection_dim=128)
PRESETS: dict[str, dict[str, Any]] = {
    # Transformer blocks only at 16x16 (down_blocks.1, up_blocks.1) and in the 8x8 mid block:
    # self-attention over the 32x32 level's 1024 tokens tripled the CPU step time
    # (measured: 5.9 s -> 1.8 s per step at batch 16, 1 thread).
    "small": dict(
        image_size=128,
        vae=_VAE_SMALL,
        unet=dict(
            _UNET_COMMON, block_out_channels=(32, 64, 128),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=128, attention_head_dim=4, norm_num_groups=32,
        ),
        text=_TEXT_SMALL,
    ),
    # SD's pattern: cross-attention blocks at every level but the lowest.
    "base": dict(
        image_size=128,
        vae=_VAE_SMALL,
        unet=dict(
            _UNET_COMMON, block_out_channels=(64, 128, 256),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=128, attention_head_dim=4, norm_num_groups=32,
        ),
        text=_TEXT_SMALL,
    ),
    "tiny": dict(
        image_size=32,
        vae=dict(
            _VAE_SMALL, layers_per_block=1, block_out_channels=(8, 16, 16), norm_num_groups=8,
            sample_size=32,
        ),
        unet=dict(
            _UNET_COMMON, sample_size=8, block_out_channels=(16, 16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8,
        ),
        text=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                  max_position_embeddings=77, projection_dim=16),
    ),
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
}


def preset(name: str) -> dict[str, Any]:
    """A copy of a size preset ('small' or 'tiny')."""
    if name not in PRESETS:
        raise ValueError(f"unknown reference model preset {name!r}; choose from {sorted(PRESETS)}")
    return json.loads(json.dumps(PRESETS[name]))  # deep copy (tuples become lists; diffusers accepts both)


def build_tokenizer(folder: str | os.PathLike | None = None, words: tuple[str, ...] = CAPTION_WORDS) -> Any:
    """The CLIP tokenizer of the scene world (each caption word one token)."""
    from transformers import CLIPTokenizer

    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            write_tokenizer(tmp, list(words))
            return CLIPTokenizer.from_pretrained(tmp)
    write_tokenizer(folder, list(words))
    return CLIPTokenizer.from_pretrained(str(folder))


def build_vae(cfg: dict[str, Any], seed: int = 0) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**cfg["vae"])


def build_unet(cfg: dict[str, Any], seed: int = 0) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**cfg["unet"])


def build_text_encoder(cfg: dict[str, Any], tokenizer: Any, seed: int = 0) -> Any:
    """A small CLIP text encoder whose vocabulary and special ids match ``tokenizer``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **cfg["text"],
    )
    return CLIPTextModel(text_cfg)


def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: list[str]) -> torch.Tensor:
    """Last hidden states of the text encoder (with gradients), as SD conditions its UNet."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_reference(
    folder: str | os.PathLike,
    unet: Any,
    vae: Any,
    text_encoder: Any,
    words: tuple[str, ...] = CAPTION_WORDS,
    scheduler_config: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a pipeline folder in diffusers layout (safetensors), loadable by ``load_pipeline``.

    Args:
        folder: target folder (created; existing component folders are overwritten).
        unet, vae, text_encoder: the trained modules (any device; saved from CPU copies).
        words: caption words the tokenizer makes single tokens (must match training).
        scheduler_config: DDPM schedule; default SD 1.x's, so ``DDIMScheduler.from_pretrained`` works.
        dtype: save weights in this dtype (e.g. float16 to halve the size); default as is.
        extra: JSON-able notes written to ``reference.json`` (training settings, steps, ...).
    """
    from diffusers import DDIMScheduler

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def _save(module: Any, sub: str) -> None:
        # A CPU copy, so the caller's module keeps its device/dtype (training may go on).
        copy = deepcopy(module).to("cpu", dtype=dtype) if dtype else deepcopy(module).to("cpu")
        copy.save_pretrained(str(folder / sub), safe_serialization=True)

    _save(unet, "unet")
    _save(vae, "vae")
    _save(text_encoder, "text_encoder")
    # Saved as DDIM (what load_pipeline builds) with SD's full config, so keys such as
    # set_alpha_to_one=False survive; the betas are the DDPM schedule the UNet was trained on.
    DDIMScheduler(**(scheduler_config or SD_SCHEDULER_CONFIG)).save_pretrained(str(folder / "scheduler"))
    write_tokenizer(folder / "tokenizer", list(words))
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    if extra is not None:
        (folder / "reference.json").write_text(json.dumps(extra, indent=2, default=str))
    return folder


def folder_size_mb(folder: str | os.PathLike) -> float:
    """Total size of the files under a folder, in MB."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 1e6
