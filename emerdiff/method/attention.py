"""The one attention processor: capture queries, add the modulation, share attention.

`AttentionController` is the Prompt-to-Prompt-style object that says, per UNet
call, what the processors do; it is passed in, never global.
`EmerDiffAttnProcessor` is installed on every attention layer with
:func:`controlled_attention`, a context manager that restores the previous
processors on exit, also on error.

Attention sharing: batch element 0 is the unmodulated run. Giving every
element the query and key of element 0 makes the attention probabilities of
all elements identical to the unmodulated run's while their values differ, which is
exactly "reuse the unmodulated run's attention maps" without storing any map, and
the fused SDPA kernel still runs. ``explicit_probabilities=True`` computes the
probabilities by hand instead (a test oracle).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class AttentionController:
    """What the EmerDiff processors do during the next UNet calls.

    Attributes:
        capture_layers: layers whose ``to_q`` output (before the head split) is recorded.
        captured: layer -> (batch, tokens, channels) queries of the last capturing call.
        modulation_layer: the layer where ``modulation`` is added after ``to_out``.
        modulation: (batch, tokens) coefficients c * M per batch element, or None.
        modulation_grid: (h, w) token grid of ``modulation`` (resized to the layer's grid if needed).
        share_attention: elements 1..B-1 use the attention probabilities of element 0.
        explicit_probabilities: compute probabilities explicitly instead of with SDPA.
        latent_size: (h, w) of the latent, to place token grids of other layers.
        probability_layers: layers whose attention probabilities (averaged over
            heads) are recorded, e.g. cross-attention maps for DAAM-style word maps.
        probabilities: layer -> list of (batch, tokens, context) maps, one per call.
        text_tokens: MMDiT only: text tokens of the joint sequence in the current call (set by the
            double-stream processors, read by FLUX's single-stream ones; emerdiff.method.mmdit).
    """

    capture_layers: set[str] = field(default_factory=set)
    captured: dict[str, torch.Tensor] = field(default_factory=dict)
    modulation_layer: str | None = None
    modulation: torch.Tensor | None = None
    modulation_grid: tuple[int, int] | None = None
    share_attention: bool = False
    explicit_probabilities: bool = False
    latent_size: tuple[int, int] | None = None
    probability_layers: set[str] = field(default_factory=set)
    probabilities: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    text_tokens: int | None = None

    def modulation_for(self, tokens: int) -> torch.Tensor:
        """Modulation coefficients on a layer's token grid, (batch, tokens)."""
        assert self.modulation is not None
        if self.modulation.shape[1] == tokens:
            return self.modulation
        if self.modulation_grid is None or self.latent_size is None:
            raise ValueError("modulation grid does not match the layer and no grid/latent size is known")
        lh, lw = self.latent_size
        factor = math.sqrt(lh * lw / tokens)
        h, w = round(lh / factor), round(lw / factor)
        grid = self.modulation.reshape(-1, 1, *self.modulation_grid)
        return F.interpolate(grid, size=(h, w), mode="nearest").reshape(grid.shape[0], h * w)


class EmerDiffAttnProcessor:
    """Scaled-dot-product attention plus EmerDiff's three per-layer behaviours."""

    def __init__(self, name: str, controller: AttentionController) -> None:
        self.name = name
        self.controller = controller

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        ctl = self.controller
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape
        context_len = tokens if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if self.name in ctl.capture_layers:
            ctl.captured[self.name] = query.detach()
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        share = ctl.share_attention and batch > 1
        # Shared: only element 0's key is needed; values stay per element.
        key = attn.to_k(encoder_hidden_states[:1] if share else encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if share:
            query = query[:1]

        heads = attn.heads
        head_dim = value.shape[-1] // heads
        q = query.view(query.shape[0], -1, heads, head_dim).transpose(1, 2)
        k = key.view(key.shape[0], -1, heads, head_dim).transpose(1, 2)
        v = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)

        if self.name in ctl.probability_layers:
            # recorded separately so the output path below stays the fused kernel
            p = ((q.float() @ k.float().transpose(-1, -2)) * attn.scale).softmax(-1).mean(1)
            ctl.probabilities.setdefault(self.name, []).append(p.detach())
        if ctl.explicit_probabilities:
            scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask[: scores.shape[0]].float()
            probs = scores.softmax(dim=-1).to(v.dtype)  # (1 or B, heads, tokens, context)
            out = probs @ v  # broadcasts element 0's probabilities over the batch
        else:
            if share:
                q = q.expand(batch, -1, -1, -1)
                k = k.expand(batch, -1, -1, -1)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=attn.scale
            )
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(value.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)

        if ctl.modulation is not None and self.name == ctl.modulation_layer:
            # +c on every channel of every token inside the mask, after the output projection
            out = out + ctl.modulation_for(out.shape[1]).to(out.dtype)[:, :, None]

        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def controlled_attention(unet: Any, controller: AttentionController) -> Iterator[AttentionController]:
    """Install EmerDiff processors on every attention layer for the duration of a block.

    The previous processors are restored on exit, also when the block raises. An SD3/FLUX
    transformer gets :class:`emerdiff.method.mmdit.MMDiTAttnProcessor` instead (issue 28).
    """
    from emerdiff.sd.mmdit import is_mmdit

    if is_mmdit(unet):
        from emerdiff.method.mmdit import controlled_mmdit_attention

        with controlled_mmdit_attention(unet, controller):
            yield controller
        return
    previous = dict(unet.attn_processors)  # set_attn_processor pops from the dict: pass copies
    processors = {key: EmerDiffAttnProcessor(key[: -len(".processor")], controller) for key in previous}
    unet.set_attn_processor(dict(processors))
    try:
        yield controller
    finally:
        unet.set_attn_processor(dict(previous))
