"""Stable Diffusion component configs and the offline pieces that build a pipeline folder from them.

What the runtime needs without a download: the exact UNet/VAE/scheduler configs of SD 1.5,
SD 2.1-base and SDXL base (diffusers layout), the byte-level CLIP tokenizer writer (the
reference model's tokenizer and every tiny model's), and the built-in ``tiny`` model that
:func:`emerdiff.load_pipeline` loads by name (random weights, SD 1.x block types, built once
into the cache). Test-only builders (the tiny SDXL pipeline, meta/random UNets by name) live in
:mod:`builders`, which imports from here; this module imports nothing of the package.
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


# ------------------------------------------------------------- tokenizer
def byte_unicode() -> list[str]:
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
    chars = byte_unicode()
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
    text_config = CLIPTextConfig(**TINY_TEXT_CONFIG, eos_token_id=len(byte_unicode()) * 2 + 1,
                                 bos_token_id=len(byte_unicode()) * 2, pad_token_id=len(byte_unicode()) * 2 + 1)
    CLIPTextModel(text_config).save_pretrained(folder / "text_encoder", safe_serialization=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }, indent=2))
    return folder


def cache_dir() -> Path:
    """emerdiff's cache folder: $EMERDIFF_CACHE, else $XDG_CACHE_HOME/emerdiff (default ~/.cache/emerdiff)."""
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
