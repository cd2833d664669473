"""The reference model's scene world, architecture and training script."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from emerdiff.assets.scenes import (
    CAPTION_WORDS,
    CLASSES,
    NUMBERS,
    PLURALS,
    STUFF,
    THINGS,
    heldout_scene_seeds,
    make_scene,
    train_scene_seed,
)

SEEDS = list(range(40))


# ------------------------------------------------------------------ scenes
def test_scene_is_deterministic_by_seed():
    a, b = make_scene(3), make_scene(3)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert a.caption == b.caption
    c = make_scene(4)
    assert not np.array_equal(a.image, c.image)
    # tuple seeds (training / held-out streams) are deterministic too
    s = train_scene_seed(0, 5, 1)
    assert np.array_equal(make_scene(s).image, make_scene(s).image)


def test_scene_shapes_and_class_list():
    scene = make_scene(0, size=96)
    assert scene.image.shape == (96, 96, 3) and scene.image.dtype == np.uint8
    assert scene.labels.shape == (96, 96)
    assert len(THINGS) >= 6 and len(STUFF) >= 4 and CLASSES == STUFF + THINGS
    assert scene.labels.min() >= 0 and scene.labels.max() < len(CLASSES)


@pytest.mark.parametrize("seed", SEEDS[:15])
def test_every_labelled_pixel_was_drawn_by_its_class(seed):
    """Re-composite the painted layers independently: image and labels must agree with them."""
    scene = make_scene(seed, return_layers=True)
    h, w = scene.labels.shape
    image = np.zeros((h, w, 3))
    top_class = np.full((h, w), -1)
    for layer in scene.layers:
        image[layer.mask] = layer.rgb[layer.mask]
        top_class[layer.mask] = layer.cls
    assert (top_class >= 0).all(), "some pixel was never painted"
    assert np.array_equal(top_class, scene.labels)
    assert np.array_equal(np.round(image * 255).astype(np.uint8), scene.image)
    # stuff layers tile the image; thing layers carry thing classes
    stuff_cover = sum(layer.mask.astype(int) for layer in scene.layers if layer.cls in range(len(STUFF)))
    assert (stuff_cover == 1).all()


def _named_classes(caption: str) -> set[str]:
    words = caption.split()
    singular = {v: k for k, v in PLURALS.items()}
    return {singular.get(wd, wd) for wd in words if singular.get(wd, wd) in CLASSES}


@pytest.mark.parametrize("seed", SEEDS)
def test_caption_names_exactly_the_classes_present(seed):
    scene = make_scene(seed)
    present = {CLASSES[c] for c in np.unique(scene.labels)}
    assert _named_classes(scene.caption) == present, scene.caption
    assert set(scene.caption.split()) <= set(CAPTION_WORDS)
    for name, n in scene.counts.items():  # counts are spelled out: "two stars", "a ball"
        word = name if n == 1 else PLURALS[name]
        assert f"{NUMBERS[n - 1]} {word}" in scene.caption


def test_scenes_vary_and_have_several_instances():
    scenes = [make_scene(s) for s in SEEDS]
    counts = [sum(s.counts.values()) for s in scenes]
    assert max(counts) >= 3
    seen = set().union(*[s.classes_present for s in scenes])
    assert seen == set(range(len(CLASSES)))


def test_heldout_seeds_never_meet_training_seeds():
    held = set(heldout_scene_seeds(100))
    train = {train_scene_seed(r, s, i) for r in range(2) for s in range(50) for i in range(4)}
    assert not held & train
    assert not np.array_equal(make_scene(heldout_scene_seeds(1)[0]).image, make_scene(train_scene_seed(0, 0, 0)).image)


def test_tokenizer_makes_each_caption_word_one_token():
    from training.model import build_tokenizer

    tok = build_tokenizer()
    for word in CAPTION_WORDS:
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, ids)  # <start> word <end>


# ------------------------------------------------------------------ architecture
def test_small_preset_has_16x16_cross_attention_decoder_block():
    from diffusers import UNet2DConditionModel

    from emerdiff.sd.loading import feature_resolution, layer_table
    from training.model import preset

    for name in ("small", "base"):
        cfg = preset(name)
        with torch.device("meta"):
            unet = UNet2DConditionModel(**cfg["unet"])
        latent = cfg["image_size"] // 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
        assert latent == cfg["unet"]["sample_size"] == 32
        rows = {r["layer"]: r for r in layer_table(unet, latent)}
        for i in range(3):
            layer = f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn2"
            assert rows[layer]["kind"] == "cross"
            assert feature_resolution(unet, layer, latent) == (16, 16)


@pytest.mark.parametrize("seed", SEEDS[:8])
def test_flat_world_is_flat_and_composites_like_the_textured_one(seed):
    """Flat world: every layer is one colour per part (no texture, pattern, shading or noise), layers
    re-composite to image and labels, and the caption names exactly the classes present."""
    scene = make_scene(seed, return_layers=True, world="flat")
    assert scene.spec.world == "flat" and 1 <= len(scene.spec.objects) <= 4
    top = np.full(scene.labels.shape, -1)
    for layer in scene.layers:
        top[layer.mask] = layer.cls
        colours = np.unique(np.round(layer.rgb[layer.mask], 6), axis=0)
        assert len(colours) <= 3, (CLASSES[layer.cls], len(colours))  # parts: primary, secondary, accent
    assert np.array_equal(top, scene.labels)
    assert _named_classes(scene.caption) == {CLASSES[c] for c in scene.classes_present}
    # the same seed in the textured world is another picture with the same class vocabulary
    textured = make_scene(seed)
    assert not np.array_equal(textured.image, scene.image)
    assert len(np.unique(textured.image.reshape(-1, 3), axis=0)) > 10 * len(np.unique(scene.image.reshape(-1, 3), axis=0))


def test_flat_world_keeps_sub_token_boundaries():
    """Object edges must cross the 8x8-pixel token cells of a 128 px scene, or upsampling loses nothing."""
    mixed = []
    for seed in heldout_scene_seeds(10):
        labels = make_scene(seed, world="flat").labels
        cells = labels.reshape(16, 8, 16, 8).transpose(0, 2, 1, 3).reshape(256, 64)
        mixed.append(np.mean([len(np.unique(c)) > 1 for c in cells]))
    assert 0.05 < np.mean(mixed) < 0.6


def test_unknown_world_is_refused():
    with pytest.raises(ValueError, match="flat"):
        make_scene(0, world="cartoon")


# ------------------------------------------------------------------ training
def _run(out: Path, *extra: str):
    from training.train import main

    return main(["--out", str(out), "--preset", "tiny", "--batch", "2", "--threads", "1",
                 "--no-progress", "--seed", "3", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A VAE (2 steps) and an uninterrupted UNet run (4 steps) on the tiny preset."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ref") / "run"
    _run(out, "--stage", "vae", "--steps", "2", "--crop", "16")
    pipe = _run(out, "--stage", "unet", "--steps", "4", "--ckpt-every", "2")
    return out, pipe


def test_training_writes_a_loadable_pipeline(trained):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    out, pipe = trained
    assert pipe == out / "pipeline"
    log = [json.loads(line) for line in (out / "unet" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [0, 1, 2, 3] and all(np.isfinite(e["loss"]) for e in log)
    vae = AutoencoderKL.from_pretrained(pipe, subfolder="vae", use_safetensors=True)
    assert vae.config.scaling_factor != 1.0  # estimated from data
    unet = UNet2DConditionModel.from_pretrained(pipe, subfolder="unet", use_safetensors=True)
    text = CLIPTextModel.from_pretrained(pipe, subfolder="text_encoder", use_safetensors=True)
    tok = CLIPTokenizer.from_pretrained(pipe, subfolder="tokenizer")
    sched = DDIMScheduler.from_pretrained(pipe, subfolder="scheduler")
    assert sched.config.set_alpha_to_one is False and sched.config.steps_offset == 1
    ids = tok(["a ball on grass", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = text(ids)[0]
        z = vae.encode(torch.zeros(2, 3, 32, 32)).latent_dist.mean
        eps = unet(z, torch.tensor([10, 500]), cond).sample
    assert eps.shape == z.shape == (2, 4, 8, 8) and torch.isfinite(eps).all()


def test_training_output_loads_through_load_pipeline(trained):
    from emerdiff.sd.loading import load_pipeline

    _, pipe = trained
    sd = load_pipeline(pipe, device="cpu")
    assert sd.vae_scale_factor == 4
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        out = sd.unet(x, torch.tensor([1]), sd.empty_embedding).sample
    assert out.shape == x.shape


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(trained, tmp_path):
    from safetensors.torch import load_file

    out, pipe = trained
    other = tmp_path / "run"
    shutil.copytree(out / "vae", other / "vae")  # the same VAE stage
    assert _run(other, "--stage", "unet", "--steps", "4", "--ckpt-every", "2", "--stop-at", "2").name == "ckpt.pt"
    assert not (other / "pipeline").exists()
    _run(other, "--stage", "unet", "--steps", "4", "--ckpt-every", "2", "--resume")
    for sub, fname in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        a, b = load_file(pipe / sub / fname), load_file(other / "pipeline" / sub / fname)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    log_a = (out / "unet" / "log.jsonl").read_text().splitlines()
    log_b = (other / "unet" / "log.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "sec"} for x in lines]  # noqa: E731
    assert strip(log_a) == strip(log_b)


def test_resume_refuses_changed_settings(trained, tmp_path):
    out, _ = trained
    other = tmp_path / "run"
    shutil.copytree(out / "vae", other / "vae")
    shutil.copytree(out / "unet", other / "unet")
    with pytest.raises(SystemExit, match="batch"):
        from training.train import main

        main(["--out", str(other), "--preset", "tiny", "--batch", "3", "--seed", "3", "--stage", "unet",
              "--steps", "6", "--resume", "--no-progress"])


def test_eval_hook_gets_a_pipeline_folder(trained, tmp_path):
    out, _ = trained
    other = tmp_path / "run"
    shutil.copytree(out / "vae", other / "vae")
    calls = []

    def eval_fn(folder, step):
        assert (Path(folder) / "model_index.json").exists()
        calls.append(step)
        return {"locality": 0.5}

    from training.train import main

    main(["--out", str(other), "--preset", "tiny", "--batch", "2", "--seed", "3", "--stage", "unet",
          "--steps", "3", "--eval-every", "2", "--no-progress"], eval_fn=eval_fn)
    assert calls == [2, 3]
    evals = [json.loads(x) for x in (other / "unet" / "log.jsonl").read_text().splitlines() if "eval" in x]
    assert [e["eval"]["locality"] for e in evals] == [0.5, 0.5]


def test_fine_tuning_on_the_flat_world_from_a_pipeline_folder(trained, tmp_path):
    """--init-from starts from a pipeline's UNet/text weights, --vae-from borrows its VAE, --world
    flat trains on flat scenes; the pipeline records its world for evaluation."""
    from training.heldout import model_world
    from training.train import main

    _, pipe = trained
    other = tmp_path / "ft"
    args = ["--out", str(other), "--preset", "tiny", "--batch", "2", "--seed", "3", "--stage", "unet",
            "--world", "flat", "--init-from", str(pipe), "--vae-from", str(pipe), "--no-progress", "--lr", "0"]
    result = main([*args, "--steps", "1", "--ema", "0"])
    from safetensors.torch import load_file

    fname = "diffusion_pytorch_model.safetensors"
    a, b = load_file(pipe / "unet" / fname), load_file(result / "unet" / fname)
    assert all(torch.equal(a[k], b[k]) for k in a)  # lr 0: the initial weights came through unchanged
    assert model_world(result) == "flat" and model_world(pipe) == "textured"
    with pytest.raises(SystemExit, match="world"):  # resuming under another world is refused
        main([*args[:-2], "--world", "textured", "--steps", "2", "--ema", "0", "--resume"])
    with pytest.raises(SystemExit, match="no diffusers pipeline"):
        main(["--out", str(tmp_path / "bad"), "--preset", "tiny", "--stage", "unet", "--vae-from", str(pipe),
              "--init-from", str(tmp_path), "--steps", "1", "--no-progress"])


def test_small_preset_fits_the_package_budget():
    from training.model import (
        build_text_encoder,
        build_tokenizer,
        build_unet,
        build_vae,
        count_parameters,
        preset,
    )

    cfg = preset("small")
    with torch.device("meta"):
        n = sum(count_parameters(m) for m in (build_unet(cfg), build_vae(cfg),
                                             build_text_encoder(cfg, build_tokenizer())))
    assert n * 4 / 1e6 < 50  # float32 safetensors


def test_shipped_reference_weights_load_and_denoise():
    from emerdiff.assets import WEIGHTS

    if not (WEIGHTS / "model_index.json").exists():
        pytest.skip("no reference weights shipped yet")
    from emerdiff.sd.loading import load_pipeline
    from training.model import folder_size_mb

    assert folder_size_mb(WEIGHTS) <= 50
    sd = load_pipeline("reference", device="cpu")
    size = sd.unet.config.sample_size
    x = torch.randn(1, sd.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = sd.unet(x, torch.tensor([500]), sd.empty_embedding).sample
    assert torch.isfinite(eps).all()


def test_pool_workers_build_the_same_latent_pool(trained, tmp_path):
    from training.model import preset
    from training.train import _latent_pool, load_stage_vae, main, parse_args

    out, _ = trained
    pools = []
    for workers in ("0", "2"):
        other = tmp_path / f"w{workers}"
        shutil.copytree(out / "vae", other / "vae")
        (other / "unet").mkdir()
        argv = ["--out", str(other), "--preset", "tiny", "--seed", "3", "--latent-pool", "20",
                "--pool-workers", workers, "--world", "flat"]
        if workers == "0":
            args = parse_args(argv)
            vae = load_stage_vae(args, torch.device("cpu"))
            pools.append(_latent_pool(args, vae, preset("tiny"), torch.device("cpu")))
        else:  # the command line a GPU session uses to share one pool between runs
            assert main([*argv, "--stage", "unet", "--pool-only"]) == other / "unet" / "latent_pool.pt"
            pools.append(torch.load(other / "unet" / "latent_pool.pt", weights_only=True))
    assert pools[0]["captions"] == pools[1]["captions"] and len(pools[0]["captions"]) == 20
    assert torch.equal(pools[0]["mean"], pools[1]["mean"]) and torch.equal(pools[0]["std"], pools[1]["std"])


def test_token_cache_gives_the_tokenizers_ids():
    from training.model import build_tokenizer
    from training.train import TokenCache

    tok = build_tokenizer()
    captions = ["a ball on grass", "", "two cars and a tree on sand", "a ball on grass", ""]
    cache = TokenCache(tok)
    want = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids
    assert torch.equal(cache(captions), want)
    assert torch.equal(cache(captions[::-1]), want.flip(0)) and len(cache.rows) == 3


def test_time_budget_plans_steps_that_a_rerun_reproduces(trained, tmp_path):
    """--time-budget times steps inside the warmup, sets --steps, logs the plan; --steps N with
    the planned N gives the same weights."""
    from safetensors.torch import load_file

    out, _ = trained
    runs = {}
    for name, extra in (("budget", ["--time-budget", "0.5"]), ("fixed", None)):
        other = tmp_path / name
        shutil.copytree(out / "vae", other / "vae")
        if extra is None:
            extra = ["--steps", str(planned)]  # noqa: F821 (set by the first run)
        runs[name] = _run(other, "--stage", "unet", "--warmup", "40", "--ckpt-every", "1000", *extra)
        if name == "budget":
            log = [json.loads(x) for x in (other / "unet" / "log.jsonl").read_text().splitlines()]
            plan = [e for e in log if "planned_steps" in e]
            assert len(plan) == 1 and plan[0]["sec_per_step"] > 0
            planned = plan[0]["planned_steps"]
            assert planned >= 40 and (planned == 40 or planned % 100 == 0)
            assert [e["step"] for e in log if "loss" in e] == list(range(planned))
            assert json.loads((other / "args_unet.json").read_text())["steps"] == planned
    fname = "diffusion_pytorch_model.safetensors"
    a, b = load_file(runs["budget"] / "unet" / fname), load_file(runs["fixed"] / "unet" / fname)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="warmup"):
        _run(tmp_path / "budget", "--stage", "unet", "--warmup", "10", "--time-budget", "1")


def test_kept_snapshots_unpack_into_a_loadable_pipeline(trained, tmp_path):
    from emerdiff.sd.loading import load_pipeline
    from training.train import keep_snapshot, unpack_snapshot

    _, pipe = trained
    work = tmp_path / "run" / "snapshot"
    shutil.copytree(pipe, work)
    keep_snapshot(work, 7)
    snap = tmp_path / "run" / "snapshots" / "step_000007.safetensors"
    assert snap.exists()
    rebuilt = unpack_snapshot(snap, pipe, tmp_path / "rebuilt")
    a, b = load_pipeline(pipe, device="cpu"), load_pipeline(rebuilt, device="cpu")
    for x, y in zip(a.unet.parameters(), b.unet.parameters()):
        assert torch.allclose(x, y, rtol=1e-3, atol=1e-4)  # float16 storage
    assert json.loads((rebuilt / "reference.json").read_text()) == json.loads((pipe / "reference.json").read_text())
