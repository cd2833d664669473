"""The EmerDiff attention processor: faithful when idle, exact modulation, shared attention."""

from __future__ import annotations

import pytest
import torch

from emerdiff.method.attention import AttentionController, EmerDiffAttnProcessor, controlled_attention
from emerdiff.method.modulation import unet_forward

MOD = "up_blocks.1.attentions.2.transformer_blocks.0.attn2"
QUERY = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"


def _attn(cross: bool, heads: int = 4, dim: int = 32):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(dim, cross_attention_dim=24 if cross else None, heads=heads, dim_head=dim // heads).eval()


def _inputs(batch=3, tokens=16, dim=32, cross=True):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(batch, tokens, dim, generator=g)
    ctx = torch.randn(1, 7, 24, generator=g).expand(batch, -1, -1) if cross else None
    return h, ctx


@pytest.mark.parametrize("cross", [True, False])
def test_idle_processor_matches_diffusers(cross):
    attn = _attn(cross)
    h, ctx = _inputs(cross=cross)
    with torch.no_grad():
        expected = attn(h, encoder_hidden_states=ctx)
        attn.set_processor(EmerDiffAttnProcessor("x", AttentionController()))
        got = attn(h, encoder_hidden_states=ctx)
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("share", [False, True])
def test_modulation_adds_exactly_c_times_mask(share):
    attn = _attn(True)
    h, ctx = _inputs(batch=3, tokens=16)
    coeff = torch.zeros(3, 16)
    coeff[1, :5] = 10.0
    coeff[2, 3:9] = -2.5
    ctl = AttentionController(share_attention=share)
    attn.set_processor(EmerDiffAttnProcessor("layer", ctl))
    with torch.no_grad():
        base = attn(h, encoder_hidden_states=ctx)
        ctl.modulation_layer, ctl.modulation = "layer", coeff
        mod = attn(h, encoder_hidden_states=ctx)
    diff = mod - base
    assert torch.allclose(diff, coeff[:, :, None].expand_as(diff), atol=1e-5)
    assert torch.equal(diff[0], torch.zeros_like(diff[0]))  # the reference row is untouched
    assert torch.equal(diff[1, 5:], torch.zeros_like(diff[1, 5:]))  # nothing outside the mask


@pytest.mark.parametrize("cross", [True, False])
def test_shared_sdpa_equals_explicit_probabilities(cross):
    attn = _attn(cross)
    h, ctx = _inputs(batch=4, cross=cross)
    outs = {}
    for explicit in (False, True):
        attn.set_processor(EmerDiffAttnProcessor("x", AttentionController(share_attention=True,
                                                                          explicit_probabilities=explicit)))
        with torch.no_grad():
            outs[explicit] = attn(h, encoder_hidden_states=ctx)
    assert torch.allclose(outs[False], outs[True], atol=1e-5)


def test_shared_attention_uses_reference_probabilities():
    """Self-attention with sharing == probabilities of element 0 applied to each element's values."""
    attn = _attn(False)
    h, _ = _inputs(batch=3, cross=False)
    attn.set_processor(EmerDiffAttnProcessor("x", AttentionController(share_attention=True)))
    with torch.no_grad():
        got = attn(h)
        q = attn.to_q(h[:1]).view(1, -1, 4, 8).transpose(1, 2)
        k = attn.to_k(h[:1]).view(1, -1, 4, 8).transpose(1, 2)
        v = attn.to_v(h).view(3, -1, 4, 8).transpose(1, 2)
        p = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
        ref = attn.to_out[0]((p @ v).transpose(1, 2).reshape(3, -1, 32))
    assert torch.allclose(got, ref, atol=1e-5)
    # element 0 is exactly what it would be alone
    attn.set_processor(EmerDiffAttnProcessor("x", AttentionController()))
    with torch.no_grad():
        alone = attn(h[:1])
    assert torch.allclose(got[:1], alone, atol=1e-6)


def test_capture_and_restore(tiny_model):
    unet = tiny_model.unet
    before = dict(unet.attn_processors)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = unet_forward(tiny_model, x, 281)
    ctl = AttentionController(capture_layers={QUERY})
    with controlled_attention(unet, ctl):
        hooked = unet_forward(tiny_model, x, 281)
    assert torch.allclose(plain, hooked, atol=1e-5)  # idle processors change nothing
    q = ctl.captured[QUERY]
    assert q.shape == (2, 16, 64)  # (batch, 4x4 tokens, channels), before the head split
    after = unet.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_restored_on_error(tiny_model):
    unet = tiny_model.unet
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with controlled_attention(unet, AttentionController()):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is before[k] for k in before)


def test_mask_resized_to_other_layer_grid(tiny_model):
    """A 4x4 mask on the query grid modulates an 8x8 layer on the matching region."""
    ctl = AttentionController(modulation=torch.zeros(2, 16), modulation_grid=(4, 4), latent_size=(16, 16))
    ctl.modulation[1, 0] = 1.0  # top-left token
    m = ctl.modulation_for(64).reshape(2, 8, 8)
    assert m[1, :2, :2].eq(1).all() and m[1].sum() == 4 and m[0].sum() == 0
