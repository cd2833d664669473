"""Test helpers: the tiny SDXL pipeline with random weights, and UNets of real configs by name.

The SD/SDXL configs, the offline tokenizer and the tiny SD pipeline that
``load_pipeline("tiny")`` builds are runtime pieces: they live in :mod:`emerdiff.sd.components`
(imported here), so no runtime module depends on this one.

The tiny SDXL pipeline (:func:`build_tiny_sdxl_pipeline`) has SDXL base's block
types (no attention at full latent size, ``up_blocks.0`` with cross-attention at
1/4), several transformer blocks per attention at that level, two text encoders
of different widths (the second with a projection, for the pooled conditioning),
the ``text_time`` added embedding and SDXL's Euler scheduler config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from emerdiff.sd.components import (
    SD15_UNET_CONFIG,
    SD21_BASE_UNET_CONFIG,
    SD_SCHEDULER_CONFIG,
    SDXL_UNET_CONFIG,
    TINY_TEXT_CONFIG,
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
    byte_unicode,
    write_tokenizer,
)

# SDXL's second encoder is wider than the first and projects its pooled state to another
# width; the tiny one keeps three different numbers so a mix-up of widths cannot pass.
TINY_TEXT_2_CONFIG: dict[str, Any] = dict(TINY_TEXT_CONFIG, hidden_size=48, intermediate_size=96, projection_dim=24)
TINY_SDXL_UNET_CONFIG: dict[str, Any] = dict(
    SDXL_UNET_CONFIG, sample_size=32, block_out_channels=(32, 32, 64), transformer_layers_per_block=(1, 2, 3),
    attention_head_dim=(2, 2, 4), norm_num_groups=8,
    cross_attention_dim=TINY_TEXT_CONFIG["hidden_size"] + TINY_TEXT_2_CONFIG["hidden_size"],
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + TINY_TEXT_2_CONFIG["projection_dim"],
)


def unet_config(name: str) -> dict[str, Any]:
    """UNet config by name: 'sd15', 'sd21-base', 'sdxl', 'tiny' or 'tiny-sdxl'."""
    table = {"sd15": SD15_UNET_CONFIG, "sd21-base": SD21_BASE_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG,
             "tiny": TINY_UNET_CONFIG, "tiny-sdxl": TINY_SDXL_UNET_CONFIG}
    if name not in table:
        raise ValueError(f"unknown UNet config {name!r}; choose from {sorted(table)}")
    return dict(table[name])


def meta_unet(name: str = "sd15") -> Any:
    """A UNet with the given config on the meta device: names and shapes, no weights."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**unet_config(name))


def random_unet(name: str = "sd15", seed: int = 0) -> Any:
    """A UNet with the given config and random weights (speed/shape checks at real size)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config(name)).eval().requires_grad_(False)


def _text_config(config: dict[str, Any]) -> Any:
    """A CLIP text config whose special ids match :func:`write_tokenizer`'s vocabulary."""
    from transformers import CLIPTextConfig

    n = len(byte_unicode()) * 2
    return CLIPTextConfig(**config, bos_token_id=n, eos_token_id=n + 1, pad_token_id=n + 1)


def build_tiny_sdxl_pipeline(folder: str | os.PathLike, seed: int = 0, force_zeros_for_empty_prompt: bool = True,
                             components: tuple[str, ...] | None = None) -> Path:
    """Build a tiny random SDXL-shaped pipeline and save it in diffusers layout.

    Args:
        force_zeros_for_empty_prompt: written to ``model_index.json`` as SDXL base does
            (True: the unconditional input is all zeros, not the encoding of "").
        components: write only these subfolders (default all), to make incomplete folders.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    wanted = set(components) if components is not None else None

    def write(part: str) -> bool:
        return wanted is None or part in wanted

    torch.manual_seed(seed)
    if write("unet"):
        UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG).save_pretrained(folder / "unet", safe_serialization=True)
    if write("vae"):
        # SDXL's VAE: SD's layout with its own scaling factor, and force_upcast (it overflows in fp16)
        AutoencoderKL(**dict(TINY_VAE_CONFIG, scaling_factor=0.13025, force_upcast=True)).save_pretrained(
            folder / "vae", safe_serialization=True)
    if write("scheduler"):
        # SDXL ships an Euler config (SD's betas); load_pipeline reads it into DDIM
        EulerDiscreteScheduler.from_config(dict(SD_SCHEDULER_CONFIG)).save_pretrained(folder / "scheduler")
    for part in ("tokenizer", "tokenizer_2"):
        if write(part):
            write_tokenizer(folder / part)
    if write("text_encoder"):
        CLIPTextModel(_text_config(TINY_TEXT_CONFIG)).save_pretrained(folder / "text_encoder", safe_serialization=True)
    if write("text_encoder_2"):
        CLIPTextModelWithProjection(_text_config(TINY_TEXT_2_CONFIG)).save_pretrained(
            folder / "text_encoder_2", safe_serialization=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.30.0",
        "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
    }, indent=2))
    return folder


def build_tiny_clip(folder: str | os.PathLike, seed: int = 0, image_size: int = 64, patch_size: int = 8) -> Path:
    """A tiny random CLIP (vision + text) saved with save_pretrained, for offline tests."""
    from transformers import CLIPConfig, CLIPModel

    from emerdiff.sd.components import byte_unicode, write_tokenizer

    folder = Path(folder)
    n = len(byte_unicode()) * 2
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=n + 200, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, bos_token_id=n, eos_token_id=n + 1,
                         pad_token_id=n + 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                           image_size=image_size, patch_size=patch_size),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder)
    return folder


# ----------------------------------------------------------- SD3 / FLUX (issue 28)
# Tiny MMDiT pipelines with random weights, written by plain diffusers (StableDiffusion3Pipeline /
# FluxPipeline(...).save_pretrained), not by the project's own layout code. Widths differ on purpose so a
# mix-up cannot pass: CLIP-L 32 (proj 16), CLIP-G 48 (proj 24), T5 96; SD3 has 3 joint blocks (the first an
# SD3.5-style dual-attention block with qk RMS-norm), FLUX 2 double- and 2 single-stream blocks.
TINY_T5_CONFIG: dict[str, Any] = dict(d_model=96, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
                                      relative_attention_num_buckets=8, relative_attention_max_distance=16)
TINY_SD3_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=16 + 24,
    pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
)
TINY_FLUX_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=4,
    joint_attention_dim=96, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
)
TINY_T5_MAX_LENGTH = 24  # the tiny tokenizers' length; the real pipelines use 256 (SD3) and 512 (FLUX)


def write_t5_tokenizer(folder: str | os.PathLike, max_length: int = TINY_T5_MAX_LENGTH) -> Any:
    """A T5 tokenizer (unigram over single characters + </s>) built offline with `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789▁.,"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                         model_max_length=max_length)
    if folder is not None:
        t5.save_pretrained(str(folder))
    return t5


def _clip_tokenizer(tmp: Path) -> Any:
    from transformers import CLIPTokenizer

    write_tokenizer(tmp)
    return CLIPTokenizer.from_pretrained(str(tmp))


def _t5_encoder() -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=64, pad_token_id=0, eos_token_id=1, **TINY_T5_CONFIG))


def build_tiny_sd3_pipeline(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random SD3 pipeline (SD3Transformer2DModel; CLIP-L, CLIP-G, T5) saved by StableDiffusion3Pipeline."""
    import tempfile

    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**TINY_SD3_TRANSFORMER_CONFIG),
            # SD3's VAE: 16 latent channels, a shift as well as a scale, no quant convs
            vae=AutoencoderKL(**dict(TINY_VAE_CONFIG, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                                     use_quant_conv=False, use_post_quant_conv=False)),
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            text_encoder=CLIPTextModelWithProjection(_text_config(dict(TINY_TEXT_CONFIG, projection_dim=16))),
            tokenizer=_clip_tokenizer(Path(tmp) / "t1"),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(TINY_TEXT_2_CONFIG)),
            tokenizer_2=_clip_tokenizer(Path(tmp) / "t2"),
            text_encoder_3=_t5_encoder(), tokenizer_3=write_t5_tokenizer(None),
        )
        pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def build_tiny_flux_pipeline(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random FLUX pipeline (FluxTransformer2DModel with the guidance embedding; CLIP, T5) saved by FluxPipeline."""
    import tempfile

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = FluxPipeline(
            transformer=FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER_CONFIG),
            vae=AutoencoderKL(**dict(TINY_VAE_CONFIG, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                                     use_quant_conv=False, use_post_quant_conv=False)),
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                      base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                      max_image_seq_len=4096),
            text_encoder=CLIPTextModel(_text_config(TINY_TEXT_CONFIG)),
            tokenizer=_clip_tokenizer(Path(tmp) / "t1"),
            text_encoder_2=_t5_encoder(), tokenizer_2=write_t5_tokenizer(None),
        )
        pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
