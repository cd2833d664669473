"""Loading: tiny round trip through save_pretrained/from_pretrained, loader errors, layouts."""

from __future__ import annotations

import shutil

import pytest
import torch
from builders import meta_unet

from emerdiff import ModelLoadError, load_pipeline
from emerdiff.sd.loading import attention_layers, check_architecture, feature_resolution, layer_table

QUERY = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"


def test_tiny_round_trip(tiny_dir, tiny_model, tmp_path):
    assert tiny_model.empty_embedding.shape == (1, 77, 32)
    assert tiny_model.vae_scale_factor == 8
    assert tiny_model.scheduler.config.steps_offset == 1
    # save what was loaded, load again: identical weights and outputs
    tiny_model.unet.save_pretrained(tmp_path / "copy" / "unet")
    for part in ("vae", "scheduler", "tokenizer", "text_encoder"):
        shutil.copytree(tiny_dir / part, tmp_path / "copy" / part)
    again = load_pipeline(tmp_path / "copy", device="cpu")
    for (n, a), (_, b) in zip(tiny_model.unet.state_dict().items(), again.unet.state_dict().items()):
        assert torch.equal(a, b), n
    assert torch.equal(tiny_model.empty_embedding, again.empty_embedding)
    # every module is frozen
    assert not any(p.requires_grad for p in again.unet.parameters())


def test_tiny_has_sd_layout(tiny_model):
    layers = attention_layers(tiny_model.unet)
    for i in range(3):
        assert f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn2" in layers
    assert feature_resolution(tiny_model.unet, QUERY, 64) == (16, 16)  # 1/4 of the latent


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(tmp_path / "nowhere")


@pytest.mark.parametrize("part", ["unet", "vae", "scheduler", "text_encoder", "tokenizer"])
def test_missing_component(tiny_dir, tmp_path, part):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / part)
    with pytest.raises(ModelLoadError, match=f"component '{part}' is missing"):
        load_pipeline(broken)


def test_pickle_only_weights_rejected(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    for f in (broken / "vae").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match="vae.*safetensors"):
        load_pipeline(broken)


def test_hub_unreachable_offline():
    with pytest.raises(ModelLoadError) as err:
        load_pipeline("no-such-org/no-such-model", local_files_only=True)
    msg = str(err.value)
    assert "local cache" in msg and "--local-dir" in msg and "HF_HUB_OFFLINE" in msg


def test_wrong_architecture():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        # up_blocks.1 has no attention at all
        unet = UNet2DConditionModel(
            block_out_channels=(32, 32, 64), down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * 2,
            up_block_types=("UpBlock2D",) * 2 + ("CrossAttnUpBlock2D",), cross_attention_dim=32,
            norm_num_groups=8, attention_head_dim=8)
    with pytest.raises(ModelLoadError, match="up_blocks.1"):
        check_architecture(unet)


def test_sd15_layers_at_real_size():
    unet = meta_unet("sd15")
    rows = {r["layer"]: r for r in layer_table(unet, 64)}
    assert len(rows) == 32  # 16 transformer blocks x (self, cross)
    q = rows[QUERY]
    assert (q["kind"], q["resolution"], q["channels"], q["heads"]) == ("cross", "16x16", 1280, 8)
    assert rows["up_blocks.1.attentions.2.transformer_blocks.0.attn2"]["resolution"] == "16x16"
    assert rows["down_blocks.0.attentions.0.transformer_blocks.0.attn1"]["resolution"] == "64x64"
    assert rows["mid_block.attentions.0.transformer_blocks.0.attn1"]["resolution"] == "8x8"
    assert rows["up_blocks.3.attentions.2.transformer_blocks.0.attn1"]["kind"] == "self"
    check_architecture(unet)


def test_sd21_base_layers_at_real_size():
    unet = meta_unet("sd21-base")
    rows = {r["layer"]: r for r in layer_table(unet, 64)}
    q = rows[QUERY]
    assert (q["resolution"], q["channels"], q["heads"]) == ("16x16", 1280, 20)  # head dim 64
    modules = dict(unet.named_modules())
    assert modules[QUERY].to_k.in_features == 1024  # OpenCLIP-H text width
    check_architecture(unet)


@pytest.mark.parametrize("name", ["sd15", "sd21-base", "tiny"])
def test_default_layers_are_the_papers_on_sd(name):
    """The family rule (first and last cross-attention of the lowest-resolution decoder block)
    gives exactly the paper's pair on every SD-shaped UNet."""
    from emerdiff.config import MODULATION_LAYER, QUERY_LAYER
    from emerdiff.sd.loading import default_layers, family_defaults, low_resolution_block

    unet = meta_unet(name)
    assert low_resolution_block(unet) == "up_blocks.1"
    assert default_layers(unet) == (QUERY_LAYER, MODULATION_LAYER)
    assert family_defaults(name if name == "tiny" else "nowhere/at-all") == {}


def test_default_layers_of_the_reference_model():
    from emerdiff.assets import weights_dir
    from emerdiff.config import MODULATION_LAYER, QUERY_LAYER
    from emerdiff.sd.layers import _meta_unet_from_config, component_configs, default_layers, family_defaults

    unet_config, _ = component_configs(weights_dir())
    assert default_layers(_meta_unet_from_config(unet_config)) == (QUERY_LAYER, MODULATION_LAYER)
    assert family_defaults("reference") == {}


def test_model_family_from_the_unet_config(tiny_model):
    from emerdiff.sd.loading import unet_family

    assert tiny_model.family == "sd" and unet_family(tiny_model.unet.config) == "sd"
    assert unet_family({"addition_embed_type": "text_time"}) == "sdxl"
    assert tiny_model.unet_kwargs(4, (8, 8)) == {}
    with pytest.raises(ValueError, match="SDXL, SD3 and FLUX models only"):
        tiny_model.encode_pooled([""])


def test_model_geometry_reads_the_configs_without_weights(tiny_dir, tmp_path):
    """(VAE factor, UNet downsampling) from the config files of a name or folder; None when unreadable."""
    import json

    from emerdiff.sd.loading import model_geometry

    assert model_geometry("tiny") == model_geometry(tiny_dir) == (8, 8)
    assert model_geometry("reference") == (4, 4)  # 3 VAE levels, 3 UNet levels
    assert model_geometry(tmp_path / "nowhere") is None
    shutil.copytree(tiny_dir / "unet", tmp_path / "odd" / "unet", ignore=shutil.ignore_patterns("*.safetensors"))
    (tmp_path / "odd" / "vae").mkdir()
    (tmp_path / "odd" / "vae" / "config.json").write_text(json.dumps({"latent_channels": 4}))
    assert model_geometry(tmp_path / "odd") is None  # a config without block_out_channels
