"""SD3 and FLUX (issue 28): tiny random MMDiT pipelines written by plain diffusers
(StableDiffusion3Pipeline / FluxPipeline.save_pretrained) and loaded through the real path.

Random weights say nothing about segment quality; these tests check the mechanics the issue asks for:
loading and its refusals, the empty-prompt conditioning, the exact flow inversion, the processors
(equal to diffusers' own when nothing is perturbed; capture, modulation, sharing), lambda = 0, the
batched path against the per-mask loop, and the CLI.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from builders import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

from emerdiff import EmerDiff, EmerDiffConfig, ModelLoadError, load_pipeline
from emerdiff.config import model_kind
from emerdiff.method.attention import AttentionController, controlled_attention
from emerdiff.method.inversion import invert, replay
from emerdiff.method.mmdit import FlowSchedule
from emerdiff.method.modulation import decode, unet_forward
from emerdiff.sd.loading import default_layers, feature_resolution, layer_table
from emerdiff.sd.mmdit import flow_timesteps, pack, snr_matched_timestep, unpack

FAMILIES = ("sd3", "flux")
BUILDERS = {"sd3": build_tiny_sd3_pipeline, "flux": build_tiny_flux_pipeline}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmdit")
    return {fam: BUILDERS[fam](root / fam) for fam in FAMILIES}


@pytest.fixture(scope="module")
def models(folders):
    return {fam: load_pipeline(folders[fam], device="cpu") for fam in FAMILIES}


def small_config(model, **changes):
    return EmerDiffConfig.for_model(model, **{**dict(resolution=128, num_clusters=4, num_inference_steps=10,
                                                     kmeans_n_init=2, max_batch=9, blur_sigma=1.0), **changes})


# ------------------------------------------------------------------ loading
@pytest.mark.parametrize("family", FAMILIES)
def test_loads_family_from_model_index(models, folders, family):
    m = models[family]
    assert m.family == family and model_kind(m) == family and model_kind(str(folders[family])) == family
    assert type(m.unet).__name__ == {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}[family]
    for module in (m.unet, m.vae, m.text_encoder, m.text_encoder_2):
        assert not any(p.requires_grad for p in module.parameters())


def test_sd3_empty_conditioning_follows_the_pipeline(models):
    m = models["sd3"]
    # CLIP-L (32) + CLIP-G (48) penultimate states, zero-padded to T5's 96, then 256 T5 tokens
    assert m.empty_embedding.shape == (1, 77 + 256, 96)
    assert not m.empty_embedding[0, :77, 80:].any() and m.empty_embedding[0, :77, :80].abs().sum() > 0
    assert m.empty_pooled.shape == (1, 16 + 24)  # both projected EOS states
    # the encoding of "" (SD3 has no force_zeros_for_empty_prompt), equal to diffusers' own encode_prompt
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(transformer=m.unet, vae=m.vae, scheduler=m.scheduler, text_encoder=m.text_encoder,
                                    tokenizer=m.tokenizer, text_encoder_2=m.text_encoder_2, tokenizer_2=m.tokenizer_2,
                                    text_encoder_3=m.text_encoder_3, tokenizer_3=m.tokenizer_3)
    emb, _, pooled, _ = pipe.encode_prompt("", "", "", do_classifier_free_guidance=False, device="cpu")
    assert torch.allclose(emb, m.empty_embedding, atol=1e-6) and torch.allclose(pooled, m.empty_pooled, atol=1e-6)


def test_flux_empty_conditioning_follows_the_pipeline(models):
    m = models["flux"]
    assert m.empty_embedding.shape == (1, 512, 96) and m.empty_pooled.shape == (1, 32)
    assert m.guidance == 3.5  # guidance_embeds: FluxPipeline's default guidance_scale
    from diffusers import FluxPipeline

    pipe = FluxPipeline(transformer=m.unet, vae=m.vae, scheduler=m.scheduler, text_encoder=m.text_encoder,
                        tokenizer=m.tokenizer, text_encoder_2=m.text_encoder_2, tokenizer_2=m.tokenizer_2)
    emb, pooled, _ = pipe.encode_prompt("", "", device="cpu")
    assert torch.allclose(emb, m.empty_embedding, atol=1e-6) and torch.allclose(pooled, m.empty_pooled, atol=1e-6)


@pytest.mark.parametrize("family,part", [("sd3", "text_encoder_3"), ("sd3", "transformer"), ("flux", "tokenizer_2"),
                                         ("flux", "vae")])
def test_missing_part_is_named(folders, tmp_path, family, part):
    broken = tmp_path / "broken"
    shutil.copytree(folders[family], broken)
    shutil.rmtree(broken / part)
    with pytest.raises(ModelLoadError, match=f"component '{part}' is missing") as err:
        load_pipeline(broken, device="cpu")
    assert {"sd3": "SD3", "flux": "FLUX"}[family] in str(err.value)


def test_mismatched_encoder_refused(folders, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folders["sd3"], broken)
    shutil.rmtree(broken / "text_encoder_3")
    shutil.copytree(folders["flux"] / "text_encoder", broken / "text_encoder_3")  # a CLIP where T5 belongs
    with pytest.raises(ModelLoadError):
        load_pipeline(broken, device="cpu")


# ------------------------------------------------------------------ geometry
@pytest.mark.parametrize("family", FAMILIES)
def test_token_grid_follows_patch_size(models, family):
    m = models[family]
    rows = layer_table(m.unet, 16)
    names = [r["layer"] for r in rows]
    assert all(r["resolution"] == "8x8" for r in rows)  # latent 16 / 2 (SD3 patch 2; FLUX packs 2x2)
    assert feature_resolution(m.unet, names[0], (16, 24)) == (8, 12)
    if family == "sd3":
        assert names == ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn",
                         "transformer_blocks.2.attn"]
        assert [r["kind"] for r in rows] == ["joint", "image", "joint", "joint"]
        assert default_layers(m.unet) == ("transformer_blocks.1.attn",) * 2
    else:
        assert [r["kind"] for r in rows] == ["joint", "joint", "single", "single"]
        assert default_layers(m.unet) == ("transformer_blocks.1.attn",) * 2
    with pytest.raises(ValueError, match="not an attention"):
        feature_resolution(m.unet, "up_blocks.1.attentions.0.transformer_blocks.0.attn2", 16)


def test_pack_roundtrip():
    x = torch.randn(2, 16, 6, 8)
    assert pack(x).shape == (2, 12, 64) and torch.equal(unpack(pack(x), (6, 8)), x)


def test_flow_timesteps(models):
    sd3 = flow_timesteps(models["sd3"].scheduler, 10, None, "sd3")
    assert sd3[0] == 1000 and sd3 == sorted(sd3, reverse=True) and len(set(sd3)) == 10
    # FLUX's dynamic shift depends on the token count: more tokens, noisier timesteps
    small = flow_timesteps(models["flux"].scheduler, 10, (16, 16), "flux")
    large = flow_timesteps(models["flux"].scheduler, 10, (128, 128), "flux")
    assert small[0] == large[0] == 1000 and all(a < b for a, b in zip(small[1:], large[1:]))
    assert snr_matched_timestep(list(range(1, 1001))) in range(430, 480)  # SD's t=281: alpha_bar ~0.61


# ---------------------------------------------------------------- inversion
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_flow_inversion_replays_exactly(models, family, eta):
    m = models[family]
    schedule = FlowSchedule.from_model(m, 10, 128, eta=eta)
    fn = lambda x, t: unet_forward(m, x, t)  # noqa: E731
    x0 = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    inv = invert(fn, schedule, x0, torch.Generator().manual_seed(0))
    out, visited = replay(fn, inv, schedule.timesteps[0], keep=True)
    assert (out - x0).abs().max() < 1e-4
    for t, x in visited.items():
        if t >= 0:  # every visited latent is the forward-noised one (1 - s) x0 + s e_t
            assert (x - inv.noisy[t]).abs().max() < 1e-4, t
    # the stored maps are what makes it exact: without them the sampler does not land on x0
    inv.noise_maps = {t: torch.zeros_like(z) for t, z in inv.noise_maps.items()}
    assert (replay(fn, inv, schedule.timesteps[0]) - x0).abs().max() > 1e-2


def test_euler_step_is_the_schedulers(models):
    """eta = 0 is FlowMatchEulerDiscreteScheduler's step x + (s_next - s) v."""
    schedule = FlowSchedule([1000, 600, 200], eta=0.0)
    x, v = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    mu, noise = schedule.posterior(x, v, 600)
    assert noise == 0 and torch.allclose(mu, x + (0.2 - 0.6) * v, atol=1e-6)
    mu, noise = FlowSchedule([1000, 600, 200], eta=1.0).posterior(x, v, 600)
    assert noise > 0 and not torch.allclose(mu, x + (0.2 - 0.6) * v)


# --------------------------------------------------------------- processors
@pytest.mark.parametrize("family", FAMILIES)
def test_processors_equal_diffusers_when_nothing_is_perturbed(models, family):
    m = models[family]
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2)).expand(3, -1, -1, -1).clone()
    before = dict(m.unet.attn_processors)
    ref = unet_forward(m, x, 600)
    for share in (False, True):
        for explicit in (False, True):
            ctl = AttentionController(share_attention=share, explicit_probabilities=explicit)
            with controlled_attention(m.unet, ctl):
                assert type(next(iter(m.unet.attn_processors.values()))).__name__ == "MMDiTAttnProcessor"
                out = unet_forward(m, x, 600)
            assert (out - ref).abs().max() < 1e-5, (share, explicit)
    assert {k: type(v) for k, v in m.unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_and_modulation_by_block(models, family):
    m = models[family]
    names = [r["layer"] for r in layer_table(m.unet, 16)]
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(3)).expand(3, -1, -1, -1).clone()
    ctl = AttentionController(capture_layers=set(names))
    with controlled_attention(m.unet, ctl):
        base = unet_forward(m, x, 600)
    assert all(ctl.captured[n].shape == (3, 64, 32) for n in names)  # image tokens only, on the 8x8 grid
    coeff = torch.zeros(3, 64)
    coeff[1, :8], coeff[2, :8] = 5.0, -5.0
    for name in names:
        ctl = AttentionController(modulation_layer=name, modulation=coeff, share_attention=True)
        with controlled_attention(m.unet, ctl):
            out = unet_forward(m, x, 600)
        assert (out[0] - base[0]).abs().max() < 1e-5  # the reference element is untouched
        assert (out[1] - base[1]).abs().max() > 1e-3 and (out[1] - out[2]).abs().max() > 1e-3, name


@pytest.mark.parametrize("family", FAMILIES)
def test_sharing_fixes_every_joint_map_to_the_reference(models, family):
    m = models[family]
    names = [r["layer"] for r in layer_table(m.unet, 16)]
    x = torch.randn(3, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    ctl = AttentionController(share_attention=True, probability_layers=set(names))
    with controlled_attention(m.unet, ctl):
        unet_forward(m, x, 600)
    for n in names:
        p = ctl.probabilities[n][0]
        assert p.shape[0] == 1  # one map (element 0's) for the whole batch
        joint = p.shape[-1]  # text tokens included in the joint maps (not for SD3.5's image-only attn2)
        assert joint == (64 if n.endswith("attn2") else 64 + m.empty_embedding.shape[1]), n


# ----------------------------------------------------------------- pipeline
@pytest.mark.parametrize("family", FAMILIES)
def test_lambda_zero_leaves_the_image_unchanged(models, family):
    m = models[family]
    ed = EmerDiff(m, small_config(m))
    prepared = ed.prepare(np.random.RandomState(0).rand(64, 64, 3))
    latents, unmodulated = ed.modulate(prepared, modulation_strength=0.0)
    assert (unmodulated - prepared.x0).abs().max() < 1e-4
    assert (latents - prepared.x0).abs().max() < 1e-4
    assert (decode(m, latents[:2]) - decode(m, prepared.x0)).abs().max() < 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_path_equals_per_mask_loop(models, family):
    m = models[family]
    ed = EmerDiff(m, small_config(m))
    prepared = ed.prepare(np.random.RandomState(1).rand(64, 64, 3))
    k = prepared.segments.num_segments
    batched, _ = ed.modulate(prepared, max_batch=2 * k + 1)  # every run in one batch
    looped = torch.cat([ed.modulate(prepared, [i], max_batch=3)[0] for i in range(k)])
    assert (batched - looped).abs().max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_segment_end_to_end(models, family):
    m = models[family]
    cfg = small_config(m)
    assert cfg.modulation_timestep in ed_timesteps(m, cfg)
    seg = EmerDiff(m, cfg).segment(np.random.RandomState(2).rand(64, 96, 3), progress=False)
    assert seg.labels.shape == (64, 96) and seg.lowres_labels.shape == (8, 8)
    assert seg.unet_calls["inversion"] == len([t for t in ed_timesteps(m, cfg) if t <= cfg.modulation_timestep])


def ed_timesteps(m, cfg):
    return FlowSchedule.from_model(m, cfg.num_inference_steps, cfg.resolution).timesteps


@pytest.mark.parametrize("family", FAMILIES)
def test_refusals_are_clear(models, family):
    m = models[family]
    with pytest.raises(ValueError, match="not on the 10-step schedule"):
        small_config(m, modulation_timestep=281).validate(m)
    with pytest.raises(ValueError, match="diffseg"):
        small_config(m, lowres="diffseg").validate(m)
    with pytest.raises(ValueError, match="unknown query_layer"):
        small_config(m, query_layer="transformer_blocks.99.attn").validate(m)
    with pytest.raises(ValueError, match="multiple of 16"):
        small_config(m, resolution=136).validate(m)


def test_folder_preset_matches_loaded(models, folders):
    for fam in FAMILIES:
        a = EmerDiffConfig.for_model(str(folders[fam]), resolution=128, num_inference_steps=10)
        b = EmerDiffConfig.for_model(models[fam], resolution=128, num_inference_steps=10)
        assert a == b and a.modulation_timestep != 281


# ---------------------------------------------------------------------- CLI
def test_cli_segment_and_layers(folders, tmp_path, capsys):
    from PIL import Image

    from emerdiff.cli.app import main

    image = tmp_path / "img.png"
    Image.fromarray((np.random.RandomState(0).rand(64, 72, 3) * 255).astype(np.uint8)).save(image)
    for fam in FAMILIES:
        out = tmp_path / fam
        code = main(["segment", str(image), "--model", str(folders[fam]), "--out", str(out), "--resolution", "128",
                     "--num-clusters", "4", "--num-inference-steps", "10", "--device", "cpu"])
        assert code == 0
        labels = np.asarray(Image.open(out / "img_labels.png"))
        assert labels.shape[:2] == (64, 72)
        assert main(["layers", str(folders[fam]), "--device", "cpu"]) == 0
        text = capsys.readouterr().out
        assert "transformer_blocks.1.attn" in text and "joint" in text and "placeholder" in text


# ------------------------------------------------------- refine, labeller, inspector
@pytest.mark.parametrize("family", FAMILIES)
def test_refine_reproduces_its_own_segments(models, family):
    m = models[family]
    ed = EmerDiff(m, small_config(m))
    image = np.random.RandomState(3).rand(64, 64, 3)
    seg = ed.segment(image, progress=False)
    again = ed.refine(image, seg.lowres_labels, progress=False)
    assert np.array_equal(again.lowres_labels, seg.lowres_labels) and np.array_equal(again.labels, seg.labels)


def test_unet_labeller_refuses_mmdit(models):
    from emerdiff.method.vocabulary import CrossAttentionLabeller

    with pytest.raises(ValueError, match="clip"):
        CrossAttentionLabeller(models["sd3"])


@pytest.mark.parametrize("family", FAMILIES)
def test_inspector_runs_on_mmdit(models, family):
    pytest.importorskip("ipywidgets")
    import matplotlib

    matplotlib.use("agg")
    from emerdiff.notebook.inspector import Inspector

    m = models[family]
    ed = EmerDiff(m, small_config(m))
    ins = Inspector(ed, {"noise": (np.random.RandomState(4).rand(64, 64, 3) * 255).astype(np.uint8)})
    assert ins.errors == []
    assert ins.displayed["difference"].shape == (128, 128) and ins.displayed["difference"].max() > 0
    assert ed.config.modulation_layer in ins.layers and all("transformer_blocks" in n for n in ins.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluate_runs_on_mmdit(folders, tmp_path, family):
    from test_evaluate import _args, make_folder

    from emerdiff.cli.evaluate import run

    data = make_folder(tmp_path / "data", n=1)
    out = tmp_path / "out"
    args = _args(data, out, "--model", str(folders[family]), "--resolution", "64", "--num-clusters", "3",
                 "--num-inference-steps", "10", "--protocol", "per_image_hungarian", "--device", "cpu")
    assert run(args) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["segmentation_config"]["query_layer"] == "transformer_blocks.1.attn"


def test_cached_hub_id_gets_the_family_preset(folders, tmp_path, monkeypatch):
    """A cached SD3 hub id is recognised from its snapshot's model_index.json before any load (the CLI builds
    its config from the name first)."""
    import huggingface_hub.constants as hub

    snapshot = tmp_path / "hub" / "models--someone--tiny-sd3" / "snapshots" / "abc123"
    shutil.copytree(folders["sd3"], snapshot)
    (tmp_path / "hub" / "models--someone--tiny-sd3" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-sd3" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_kind("someone/tiny-sd3") == "sd3"
    by_name = EmerDiffConfig.for_model("someone/tiny-sd3", resolution=128, num_inference_steps=10)
    assert by_name == EmerDiffConfig.for_model(str(folders["sd3"]), resolution=128, num_inference_steps=10)
    assert model_kind("someone/not-cached") == "paper"
