"""Tiny Stable-Diffusion-shaped pipelines with random weights, and SD/SDXL configs.

The tiny pipeline has SD 1.x's block types (so ``up_blocks.1.attentions.{0,1,2}``
exist at 1/4 of the latent size), a VAE with factor 8, a tiny CLIP text encoder
and a byte-level tokenizer that works offline. It is written with
``save_pretrained`` and loaded back through :func:`emerdiff.load_pipeline`.

The tiny SDXL pipeline (:func:`build_tiny_sdxl_pipeline`) has SDXL base's block
types (no attention at full latent size, ``up_blocks.0`` with cross-attention at
1/4), several transformer blocks per attention at that level, two text encoders
of different widths (the second with a projection, for the pooled conditioning),
the ``text_time`` added embedding and SDXL's Euler scheduler config.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

# Exact UNet configs of SD 1.5 and SD 2.1-base (diffusers layout).
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    center_input_sample=False, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
    downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5,
)
SD21_BASE_UNET_CONFIG: dict[str, Any] = dict(
    SD15_UNET_CONFIG, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)
SD_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
# The scheduler config SD 1.x / 2.1-base ship (betas, offset, prediction type).
SD_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    timestep_spacing="leading",
)

# The UNet config of SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json).
SDXL_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP ViT-bigG) hidden states, concatenated
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + the 1280-wide pooled text embedding
    norm_num_groups=32, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
    downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5,
)

TINY_UNET_CONFIG: dict[str, Any] = dict(
    SD15_UNET_CONFIG, sample_size=32, block_out_channels=(32, 32, 64, 64),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, layers_per_block=2,
)
TINY_VAE_CONFIG: dict[str, Any] = dict(
    SD_VAE_CONFIG, block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
    sample_size=256,
)
TINY_TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=1000, hidden_size=32, intermediate_size=64, num_attention_heads=4,
    num_hidden_layers=2, max_position_embeddings=77, projection_dim=32,
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


# ------------------------------------------------------------- tokenizer
def _byte_unicode() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table (the characters byte-level BPE uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: str | os.PathLike, words: list[str] | tuple[str, ...] = ()) -> None:
    """Write a CLIP tokenizer (vocab.json + merges.txt) that needs no download.

    The vocabulary holds every byte character (alone and word-final) and, for
    each word in ``words``, the merges that make it a single token, so captions
    of the reference world tokenize to one token per word.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_unicode()
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in words:
        word = word.lower()
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            a, b = symbols[0], symbols[1]
            merge = f"{a} {b}"
            if merge not in merges:
                merges.append(merge)
            if a + b not in vocab:
                vocab.append(a + b)
            symbols = [a + b] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + ("\n" if merges else ""))
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(str(folder))


def build_tiny_pipeline(folder: str | os.PathLike, seed: int = 0, words: tuple[str, ...] = ()) -> Path:
    """Build a tiny random SD-shaped pipeline and save it in diffusers layout."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    UNet2DConditionModel(**TINY_UNET_CONFIG).save_pretrained(folder / "unet", safe_serialization=True)
    AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(folder / "vae", safe_serialization=True)
    DDIMScheduler(**SD_SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    write_tokenizer(folder / "tokenizer", words)
    text_config = CLIPTextConfig(**TINY_TEXT_CONFIG, eos_token_id=len(_byte_unicode()) * 2 + 1,
                                 bos_token_id=len(_byte_unicode()) * 2, pad_token_id=len(_byte_unicode()) * 2 + 1)
    CLIPTextModel(text_config).save_pretrained(folder / "text_encoder", safe_serialization=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }, indent=2))
    return folder


def _text_config(config: dict[str, Any]) -> Any:
    """A CLIP text config whose special ids match :func:`write_tokenizer`'s vocabulary."""
    from transformers import CLIPTextConfig

    n = len(_byte_unicode()) * 2
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


def cache_dir() -> Path:
    root = os.environ.get("EMERDIFF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "emerdiff")
    return Path(root)


def tiny_pipeline_dir(seed: int = 0) -> Path:
    """Folder of the cached tiny pipeline, built on first use (atomically)."""
    key = hashlib.sha1(json.dumps([TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_CONFIG, seed],
                                  sort_keys=True, default=str).encode()).hexdigest()[:10]
    target = cache_dir() / f"tiny-{key}"
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    import tempfile

    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-"))
    build_tiny_pipeline(tmp, seed=seed)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target
