"""EmerDiffConfig: validation against a model, dict round trip, the preset table."""

from __future__ import annotations

import json

import pytest

from emerdiff import EmerDiffConfig


def test_defaults_are_the_papers():
    c = EmerDiffConfig()
    assert (c.num_clusters, c.modulation_timestep, c.modulation_strength, c.feature_timestep) == (25, 281, 10.0, 1)
    assert c.query_layer == "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert c.modulation_layer == "up_blocks.1.attentions.2.transformer_blocks.0.attn2"
    assert c.attention_injection and c.num_inference_steps == 50


def test_dict_round_trip():
    c = EmerDiffConfig(num_clusters=7, modulation_strength=-3.5, readout_steps=2, lowres="diffseg")
    d = json.loads(json.dumps(c.to_dict()))
    assert EmerDiffConfig.from_dict(d) == c


def test_unknown_field():
    with pytest.raises(ValueError, match="unknown EmerDiffConfig field.*'kk'"):
        EmerDiffConfig.from_dict({"kk": 3})


def test_valid_config_passes(tiny_model):
    EmerDiffConfig(resolution=256, num_clusters=25).validate(tiny_model)


def test_unknown_layer_lists_valid_names(tiny_model):
    c = EmerDiffConfig(resolution=256, modulation_layer="up_blocks.9.attn")
    with pytest.raises(ValueError) as err:
        c.validate(tiny_model)
    msg = str(err.value)
    assert "unknown modulation_layer 'up_blocks.9.attn'" in msg
    assert "up_blocks.1.attentions.2.transformer_blocks.0.attn2" in msg


def test_timestep_off_schedule_names_nearest(tiny_model):
    with pytest.raises(ValueError, match=r"not on the 50-step schedule; nearest valid timesteps: \[281, 301\]"):
        EmerDiffConfig(resolution=256, modulation_timestep=290).validate(tiny_model)


def test_k_larger_than_tokens(tiny_model):
    # tiny at 128 px: latent 16, query grid 4x4 = 16 tokens
    with pytest.raises(ValueError, match="larger than the 16 tokens"):
        EmerDiffConfig(resolution=128, num_clusters=17).validate(tiny_model)


@pytest.mark.parametrize("field,value", [("resolution", 100), ("num_clusters", 1), ("max_batch", 1),
                                         ("readout_steps", 0), ("blur_sigma", -1)])
def test_bad_values(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        EmerDiffConfig(**{field: value}).check_values()


def test_diffseg_threshold_is_a_preset_field():
    """DiffSeg's tau follows the model's preset (the reference model's own 0.1) and a change wins over it."""
    from emerdiff.config import PRESETS

    assert EmerDiffConfig.for_model("reference").diffseg_kl_threshold == PRESETS["reference"]["diffseg_kl_threshold"]
    assert PRESETS["reference"]["diffseg_kl_threshold"] != EmerDiffConfig().diffseg_kl_threshold
    assert EmerDiffConfig.for_model("runwayml/stable-diffusion-v1-5").diffseg_kl_threshold == \
        EmerDiffConfig().diffseg_kl_threshold
    assert EmerDiffConfig.for_model("reference", diffseg_kl_threshold=0.9).diffseg_kl_threshold == 0.9


def test_paper_preset_is_the_dataclass_defaults():
    """The 'paper' row of the table states the defaults: a model of that kind gets exactly EmerDiffConfig()."""
    from emerdiff.config import PRESETS

    assert EmerDiffConfig(**PRESETS["paper"]) == EmerDiffConfig()
    assert EmerDiffConfig.for_model("runwayml/stable-diffusion-v1-5") == EmerDiffConfig()


def test_for_model_refuses_an_unknown_change():
    with pytest.raises(ValueError, match="unknown EmerDiffConfig field.*'K'"):
        EmerDiffConfig.for_model("tiny", K=3)
