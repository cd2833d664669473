"""SDXL: a tiny random SDXL-shaped pipeline saved with save_pretrained and loaded through the real path.

Random weights say nothing about segment quality, so these tests check mechanics:
loading and its errors, the added conditioning reaching the UNet, the default
layers, an end-to-end segmentation, determinism and the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from builders import build_tiny_sdxl_pipeline, meta_unet

from emerdiff import EmerDiff, EmerDiffConfig, ModelLoadError, load_pipeline
from emerdiff.method.attention import AttentionController, controlled_attention
from emerdiff.method.modulation import unet_forward
from emerdiff.sd.loading import (
    Float32VAE,
    check_architecture,
    default_layers,
    family_defaults,
    feature_resolution,
    layer_table,
    low_resolution_block,
)

# the tiny SDXL's up_blocks.0 has 3 attentions x 3 transformer blocks; SDXL base's has 3 x 10
TINY_QUERY = "up_blocks.0.attentions.0.transformer_blocks.0.attn2"
TINY_MODULATION = "up_blocks.0.attentions.2.transformer_blocks.2.attn2"
SDXL_QUERY = "up_blocks.0.attentions.0.transformer_blocks.0.attn2"
SDXL_MODULATION = "up_blocks.0.attentions.2.transformer_blocks.9.attn2"


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe", seed=0)


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    return load_pipeline(sdxl_dir, device="cpu")


@pytest.fixture
def small_config(sdxl):
    """SDXL's own defaults, sized to run in seconds (128 px: a 4x4 query grid)."""
    return EmerDiffConfig.for_model(sdxl, resolution=128, num_clusters=4, num_inference_steps=10,
                                    modulation_timestep=201, kmeans_n_init=2, max_batch=9, blur_sigma=1.0)


def _copy(src, dst, drop=None):
    shutil.copytree(src, dst)
    if drop:
        shutil.rmtree(dst / drop)
    return dst


# ------------------------------------------------------------------ loading
def test_loads_as_sdxl(sdxl):
    assert sdxl.family == "sdxl"
    assert sdxl.text_encoder_2 is not None and sdxl.tokenizer_2 is not None
    # both encoders' widths (32 + 48) concatenated; the pooled projection of encoder 2 (24)
    assert sdxl.empty_embedding.shape == (1, 77, 80) == (1, 77, sdxl.unet.config.cross_attention_dim)
    assert sdxl.empty_pooled.shape == (1, 24)
    # model_index.json says force_zeros_for_empty_prompt, as SDXL base's does
    assert sdxl.empty_prompt_zeros
    assert not sdxl.empty_embedding.any() and not sdxl.empty_pooled.any()
    assert sdxl.native_resolution == 256
    # SDXL's Euler scheduler config is read into DDIM with its own betas and offset
    assert type(sdxl.scheduler).__name__ == "DDIMScheduler"
    assert sdxl.scheduler.config.steps_offset == 1 and not sdxl.scheduler.config.set_alpha_to_one
    for module in (sdxl.unet, sdxl.vae, sdxl.text_encoder, sdxl.text_encoder_2):
        assert not any(p.requires_grad for p in module.parameters())


def test_empty_prompt_is_encoded_when_not_forced_to_zeros(sdxl_dir, tmp_path):
    """force_zeros_for_empty_prompt false: the conditioning of "" as diffusers' SDXL pipeline computes it."""
    folder = _copy(sdxl_dir, tmp_path / "pipe")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, force_zeros_for_empty_prompt=False)))
    model = load_pipeline(folder, device="cpu")
    assert not model.empty_prompt_zeros
    hidden, pooled = [], None
    for tok, enc in ((model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)):
        ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        out = enc(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # SDXL reads the penultimate layer of both encoders
        pooled = out[0]  # encoder 2's projected EOS state (CLIPTextModelWithProjection.text_embeds)
    assert torch.allclose(model.empty_embedding, torch.cat(hidden, -1))
    assert torch.allclose(model.empty_pooled, pooled)
    assert model.empty_embedding.abs().sum() > 0


@pytest.mark.parametrize("part", ["text_encoder_2", "tokenizer_2"])
def test_incomplete_sdxl_folder(sdxl_dir, tmp_path, part):
    broken = _copy(sdxl_dir, tmp_path / "broken", drop=part)
    with pytest.raises(ModelLoadError, match=f"component '{part}' is missing.*SDXL-shaped"):
        load_pipeline(broken)


def test_refiner_style_folder_is_refused_clearly(sdxl_dir, tmp_path):
    broken = _copy(sdxl_dir, tmp_path / "refiner", drop="text_encoder")
    with pytest.raises(ModelLoadError, match="component 'text_encoder' is missing.*refiner"):
        load_pipeline(broken)


def test_pickle_only_second_encoder(sdxl_dir, tmp_path):
    broken = _copy(sdxl_dir, tmp_path / "pickle")
    for f in (broken / "text_encoder_2").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match="text_encoder_2.*safetensors"):
        load_pipeline(broken)


def test_mismatched_text_encoder_is_refused(sdxl_dir, tmp_path):
    """text_encoder_2 from another model (here encoder 1's, 32 wide): the widths no longer add up."""
    broken = _copy(sdxl_dir, tmp_path / "mixed", drop="text_encoder_2")
    shutil.copytree(sdxl_dir / "text_encoder", broken / "text_encoder_2")
    with pytest.raises(ModelLoadError, match="cross_attention_dim"):
        load_pipeline(broken)


def test_other_added_conditioning_is_refused():
    from diffusers import UNet2DConditionModel

    from emerdiff.sd.loading import unet_family

    with torch.device("meta"):
        unet = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    norm_num_groups=8, addition_embed_type="text", encoder_hid_dim=32)
    with pytest.raises(ModelLoadError, match="addition_embed_type 'text' is not supported"):
        unet_family(unet.config)


# ------------------------------------------------------------ conditioning
def test_unet_kwargs_follow_diffusers_convention(sdxl):
    assert load_pipeline("tiny", device="cpu").unet_kwargs(3, (16, 16)) == {}
    extra = sdxl.unet_kwargs(3, (16, 24))["added_cond_kwargs"]
    assert extra["text_embeds"].shape == (3, 24)
    # original size + crop top-left + target size, in pixels of the image the latent stands for
    assert extra["time_ids"].tolist() == [[128, 192, 0, 0, 128, 192]] * 3
    native = sdxl.unet_kwargs(1)["added_cond_kwargs"]["time_ids"]
    assert native.tolist() == [[256, 256, 0, 0, 256, 256]]


def test_added_conditioning_reaches_the_unet(sdxl):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    base = unet_forward(sdxl, x, 281)
    assert torch.equal(base, unet_forward(sdxl, x, 281))  # deterministic
    # the same call written out by hand, as StableDiffusionXLPipeline passes it
    by_hand = sdxl.unet(x, torch.tensor(281), encoder_hidden_states=sdxl.empty_embedding.expand(2, -1, -1),
                        added_cond_kwargs={"text_embeds": sdxl.empty_pooled.expand(2, -1),
                                           "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2)}).sample
    assert torch.allclose(base, by_hand)
    # other micro-conditioning or pooled text changes the prediction
    other_size = unet_forward(dataclasses.replace(sdxl, time_ids=(1024, 1024, 0, 0, 1024, 1024)), x, 281)
    assert (other_size - base).abs().max() > 1e-4
    other_text = unet_forward(dataclasses.replace(sdxl, empty_pooled=torch.ones(1, 24)), x, 281)
    assert (other_text - base).abs().max() > 1e-4
    # and the UNet refuses to run without it; a model view without unet_kwargs gets a clear error
    with pytest.raises((ValueError, TypeError)):
        sdxl.unet(x, torch.tensor(281), encoder_hidden_states=sdxl.empty_embedding.expand(2, -1, -1))
    view = SimpleNamespace(unet=sdxl.unet, empty_embedding=sdxl.empty_embedding)
    with pytest.raises(ValueError, match="no unet_kwargs.*added conditioning"):
        unet_forward(view, x, 281)


def test_half_precision_keeps_the_vae_in_float32(sdxl_dir, tmp_path):
    model = load_pipeline(sdxl_dir, device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert isinstance(model.vae, Float32VAE) and next(model.vae.vae.parameters()).dtype == torch.float32
    assert model.vae_scale_factor == 8 and model.vae.config.scaling_factor == 0.13025
    image = torch.rand(1, 3, 64, 64, dtype=torch.bfloat16) * 2 - 1
    latent = model.vae.encode(image).latent_dist.mean
    assert latent.dtype == torch.bfloat16 and latent.shape == (1, 4, 8, 8)
    assert model.vae.decode(latent, return_dict=False)[0].dtype == torch.bfloat16
    assert model.vae.decode(latent).sample.shape == (1, 3, 64, 64)
    assert unet_forward(model, latent, 281).dtype == torch.bfloat16
    # a VAE fixed for half precision (force_upcast false) runs in the model's dtype
    fixed = _copy(sdxl_dir, tmp_path / "fixed")
    cfg = json.loads((fixed / "vae" / "config.json").read_text())
    (fixed / "vae" / "config.json").write_text(json.dumps(dict(cfg, force_upcast=False)))
    plain = load_pipeline(fixed, device="cpu", dtype="bfloat16")
    assert not isinstance(plain.vae, Float32VAE) and next(plain.vae.parameters()).dtype == torch.bfloat16


# ------------------------------------------------------------------ layers
def test_sdxl_base_layers_at_real_size():
    """SDXL base (meta device): the block that plays SD's 16x16 up_blocks.1 is up_blocks.0."""
    unet = meta_unet("sdxl")
    rows = {r["layer"]: r for r in layer_table(unet, 128)}  # 1024 px
    assert len(rows) == 140  # 70 transformer blocks x (self, cross)
    # no attention at the full latent size (SD 1.x has cross-attention at 64x64 there)
    assert not any(r["resolution"] == "128x128" for r in rows.values())
    assert {r["resolution"] for r in rows.values()} == {"64x64", "32x32"}
    assert low_resolution_block(unet) == "up_blocks.0"
    assert default_layers(unet) == (SDXL_QUERY, SDXL_MODULATION)
    for name in (SDXL_QUERY, SDXL_MODULATION):
        assert (rows[name]["kind"], rows[name]["resolution"], rows[name]["channels"], rows[name]["heads"]) == (
            "cross", "32x32", 1280, 20)
    # 1/32 of the image side, as SD's up_blocks.1: 16x16 at 512 px
    assert feature_resolution(unet, SDXL_QUERY, 64) == (16, 16)
    modules = dict(unet.named_modules())
    assert modules[SDXL_QUERY].to_k.in_features == 2048  # CLIP ViT-L 768 + OpenCLIP bigG 1280
    check_architecture(unet)


def test_family_defaults_from_the_folder(sdxl, sdxl_dir):
    from emerdiff.config import PRESETS

    expected = dict(resolution=256, query_layer=TINY_QUERY, modulation_layer=TINY_MODULATION)
    assert family_defaults(str(sdxl_dir)) == expected  # read from the configs, no weights
    assert family_defaults(sdxl) == expected
    assert default_layers(sdxl.unet) == (TINY_QUERY, TINY_MODULATION)
    config = EmerDiffConfig.for_model(sdxl_dir, num_clusters=5)
    assert (config.resolution, config.query_layer, config.modulation_layer, config.num_clusters) == (
        256, TINY_QUERY, TINY_MODULATION, 5)
    assert family_defaults("tiny") == {} and EmerDiffConfig.for_model("tiny") == EmerDiffConfig(**PRESETS["tiny"])


def test_sd_default_layers_are_refused_on_sdxl(sdxl):
    with pytest.raises(ValueError, match="SD's defaults.*for_model"):
        EmerDiff(sdxl, EmerDiffConfig(resolution=128, num_clusters=4, num_inference_steps=10,
                                      modulation_timestep=201))


def test_query_capture_finds_the_chosen_layers(sdxl, small_config):
    ctl = AttentionController(capture_layers={small_config.query_layer, small_config.modulation_layer})
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with controlled_attention(sdxl.unet, ctl):
        unet_forward(sdxl, x, 1)
    assert set(ctl.captured) == {TINY_QUERY, TINY_MODULATION}
    for q in ctl.captured.values():
        assert q.shape == (2, 16, 64)  # 4x4 tokens at 1/4 of a 16x16 latent, 64 channels


# -------------------------------------------------------------- end to end
def test_segment_end_to_end_and_deterministic(sdxl, small_config, photo):
    segmenter = EmerDiff(sdxl, small_config)
    seg = segmenter.segment(photo)
    assert seg.labels.shape == photo.shape[:2]
    assert seg.lowres_labels.shape == (4, 4)
    assert seg.query_features.shape == (16, 64)
    assert 2 <= seg.num_segments <= 4
    assert set(np.unique(seg.labels)) <= set(range(seg.num_segments))
    assert np.isfinite(seg.locality).all()
    steps_after = len([t for t in segmenter.schedule.timesteps if t <= small_config.modulation_timestep])
    assert seg.unet_calls["inversion"] == steps_after
    again = EmerDiff(sdxl, small_config).segment(photo)
    assert np.array_equal(seg.labels, again.labels)
    assert np.array_equal(seg.lowres_labels, again.lowres_labels)


# --------------------------------------------------------------------- CLI
def test_layers_command_lists_sdxl(sdxl_dir, capsys):
    from emerdiff.cli.app import main

    assert main(["layers", str(sdxl_dir)]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith(TINY_QUERY + " "))
    assert "cross" in line and "8x8" in line  # native 256 px: a 32x32 latent, 1/4 of it
    assert not any(l.startswith("down_blocks.0.") for l in out.splitlines())  # no attention at full size
    assert "sdxl defaults" in out and TINY_QUERY in out.splitlines()[-1] and TINY_MODULATION in out.splitlines()[-1]


def test_cli_settings_follow_the_sdxl_folder(sdxl_dir):
    from emerdiff.cli.app import build_parser, config_from_args

    parser = build_parser()
    assert EmerDiffConfig.for_model(str(sdxl_dir)).resolution == 256
    seg = config_from_args(parser.parse_args(["segment", "x.png", "--model", str(sdxl_dir)]))
    ev = config_from_args(parser.parse_args(["evaluate", "--data", "d", "--out", "o", "--model", str(sdxl_dir)]))
    for config in (seg, ev):
        assert (config.resolution, config.query_layer, config.modulation_layer) == (256, TINY_QUERY, TINY_MODULATION)
    given = config_from_args(parser.parse_args(["segment", "x.png", "--model", str(sdxl_dir),
                                                "--query-layer", "mid_block.attentions.0.transformer_blocks.0.attn2"]))
    assert given.query_layer == "mid_block.attentions.0.transformer_blocks.0.attn2"
    assert given.modulation_layer == TINY_MODULATION


def test_emerdiff_without_a_config_takes_the_family_defaults(sdxl):
    ed = EmerDiff(sdxl)
    assert (ed.config.resolution, ed.config.query_layer, ed.config.modulation_layer) == (
        256, TINY_QUERY, TINY_MODULATION)
