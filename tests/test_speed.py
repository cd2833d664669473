"""Speed levers of issue 25 (emerdiff/sd/speed.py): channels_last, torch.compile of the UNet and the VAE
decoder, the SDPA kernel. Off by default; switched on they give the eager path's labels on the tiny model.
compile runs with torch.compile's "eager" backend here (dynamo traces the graphs, no C++ toolchain or
codegen: the plumbing on a CPU); the inductor build is measured on the GPU (benchmarks/gpu_issue25.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emerdiff import EmerDiff, EmerDiffConfig, load_pipeline
from emerdiff.config import EXECUTION_FIELDS, SDPA_BACKENDS
from emerdiff.sd import speed


def test_names_agree_and_defaults_are_off():
    assert speed.SDPA_BACKENDS == SDPA_BACKENDS
    cfg = EmerDiffConfig()
    assert (cfg.channels_last, cfg.compile_unet, cfg.compile_decoder, cfg.sdpa_backend) == (False, False, False, "default")
    assert {"channels_last", "compile_unet", "compile_decoder", "sdpa_backend"} <= set(EXECUTION_FIELDS)
    with pytest.raises(ValueError, match="sdpa_backend must be one of"):
        EmerDiffConfig(sdpa_backend="fastest").check_values()
    assert speed.sdpa_kernels("default") is None
    assert len(speed.sdpa_kernels("math")) == 1


def test_sdpa_context_selects_the_kernel():
    q = torch.randn(1, 2, 8, 4)
    with speed.sdpa_context("math"):
        a = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert torch.allclose(a, torch.nn.functional.scaled_dot_product_attention(q, q, q), atol=1e-6)
    if not torch.cuda.is_available():  # a kernel this machine lacks is refused, not silently replaced
        with pytest.raises(RuntimeError), speed.sdpa_context("cudnn"):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)


def test_default_config_leaves_the_model_as_loaded(tiny_dir):
    model = load_pipeline(tiny_dir, device="cpu")
    forward, decoder = model.unet.forward, model.vae.decoder
    EmerDiff(model, EmerDiffConfig(resolution=128, num_clusters=4, num_inference_steps=10, modulation_timestep=201))
    assert speed.applied_speed(model) == {}
    assert model.unet.forward == forward and model.vae.decoder is decoder


def test_levers_on_give_the_eager_labels(tiny_dir, fast_config, photo):
    eager = EmerDiff(load_pipeline(tiny_dir, device="cpu"), fast_config).segment(photo)
    model = load_pipeline(tiny_dir, device="cpu")
    cfg = fast_config.replace(channels_last=True, sdpa_backend="math", compile_unet=True, compile_decoder=True)
    applied = speed.apply_speed(model, cfg, compile_backend="eager")
    assert applied == dict(channels_last=True, sdpa_backend="math", compile_unet=True, channels_last_input=True,
                           compile_decoder=True, decoder_sdpa="math")
    assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(model.vae.decoder, torch._dynamo.eval_frame.OptimizedModule)
    fast = EmerDiff(model, cfg).segment(photo)  # apply_speed again (EmerDiff): nothing applied twice
    assert speed.applied_speed(model) == applied
    agree = float(np.mean(fast.labels == eager.labels))
    assert agree >= 0.99, agree
    np.testing.assert_array_equal(fast.lowres_labels, eager.lowres_labels)
    speed.reset_speed(model)  # back to the model as loaded: eager again, same labels as the eager run
    assert speed.applied_speed(model) == {} and "forward" not in model.unet.__dict__
    assert not isinstance(model.vae.decoder, torch._dynamo.eval_frame.OptimizedModule)
    assert "forward" not in model.vae.decoder.__dict__
    assert model.unet.conv_in.weight.is_contiguous()
    again = EmerDiff(model, fast_config).segment(photo)
    np.testing.assert_array_equal(again.labels, eager.labels)


def test_compile_mode_reaches_torch_compile(tiny_dir, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    model = load_pipeline(tiny_dir, device="cpu")
    cfg = EmerDiffConfig(compile_unet=True, compile_decoder=True, compile_mode="reduce-overhead")
    speed.apply_speed(model, cfg)
    assert [kw["mode"] for kw in seen] == ["reduce-overhead", "reduce-overhead"]
    assert all(kw["dynamic"] is False and kw["backend"] == "inductor" for kw in seen)
    speed.reset_speed(model)
    seen.clear()
    speed.apply_speed(model, cfg.replace(compile_mode="default"))
    assert [kw["mode"] for kw in seen] == [None, None]  # torch's own default
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        EmerDiffConfig(compile_mode="fastest").check_values()
