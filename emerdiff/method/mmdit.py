"""EmerDiff on MMDiT denoisers (SD3, FLUX; issue 28): the flow-matching schedule with its exact
(edit-friendly) inversion, and the joint-attention processor that captures, modulates and shares.

**Flow schedule.** Rectified flow noises along ``x_t = (1 - s) x_0 + s e`` (``s`` = sigma = t / 1000
for the integer timesteps of :func:`emerdiff.sd.mmdit.flow_timesteps`) and the network predicts the
velocity ``v = e - x_0``. :class:`FlowSchedule` has :class:`~emerdiff.method.inversion.Schedule`'s
interface, so :func:`~emerdiff.method.inversion.invert`, ``replay`` and Step C's denoising run unchanged:
a sampler step from t to the next timestep p is
``x_p = (1 - s_p) x0_hat + sqrt(s_p^2 - eta_t^2) e_hat + eta_t z`` (DDIM for the Gaussian path
``alpha = 1 - s``, ``sigma = s``); with ``eta = 0`` it is exactly FlowMatchEulerDiscreteScheduler's Euler
step ``x_t + (s_p - s_t) v``, with ``eta = 1`` (the default, as the project's DDPM inversion is DDIM eta = 1)
the posterior's noise ``eta_t^2 = (s_t^2 - (a_t / a_p)^2 s_p^2) s_p^2 / s_t^2``. The inversion samples every
x_t independently and stores ``z_t = (x_p - mu_t) / eta_t`` (the residual itself where eta_t = 0): replaying the
stored z_t lands on every forward-noised x_t, hence on x_0, whatever the network predicts.

**Processor.** :class:`MMDiTAttnProcessor` replaces diffusers' ``JointAttnProcessor2_0`` (SD3, image tokens
first), ``FluxAttnProcessor`` (FLUX double-stream blocks, text first, RMS-normed q/k and RoPE; single-stream
blocks: one joint sequence, text first, no output projection) and SD3.5's image-only ``attn2``, mirroring
:class:`emerdiff.method.attention.EmerDiffAttnProcessor`:

* capture: the image tokens' ``attn.to_q`` output (before the head split and q-norm), (B, h*w, C);
* modulation: ``+ c M`` on the image tokens' attention output after ``to_out`` (single-stream blocks: on the
  image slice of the attention output, before the block's MLP concat and ``proj_out``);
* sharing: every element gets element 0's query and key over the *joint* sequence (text tokens included, after
  RoPE), values per element: all joint attention maps equal the reference run's.

Installed with ``set_attn_processor`` by :func:`controlled_mmdit_attention` (which
:func:`emerdiff.method.attention.controlled_attention` calls for a transformer); no monkey-patching.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from emerdiff.method.attention import AttentionController


@dataclass
class FlowSchedule:
    """Integer timesteps t (sigma = t / 1000, descending) of a flow-matching model; Schedule's interface."""

    timesteps: list[int]
    eta: float = 1.0  # 1: the DDPM-type posterior step; 0: plain Euler (every step's residual stored)
    prediction_type: str = "flow"

    @classmethod
    def from_model(cls, model: Any, num_inference_steps: int, resolution: int, eta: float = 1.0) -> FlowSchedule:
        from emerdiff.sd.layers import model_timesteps

        return cls(model_timesteps(model, num_inference_steps, resolution), eta)

    def sigma(self, t: int) -> float:
        return t / 1000 if t >= 0 else 0.0

    def previous(self, t: int) -> int:
        i = self.timesteps.index(t)
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1

    def noised(self, x0: torch.Tensor, e: torch.Tensor, t: int) -> torch.Tensor:
        """The forward-noised latent (1 - s) x0 + s e."""
        s = self.sigma(t)
        return (1 - s) * x0 + s * e

    def eps_and_x0(self, x_t: torch.Tensor, v: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, x_0) predicted from the velocity v = e - x_0."""
        s = self.sigma(t)
        return x_t + (1 - s) * v, x_t - s * v

    def posterior(self, x_t: torch.Tensor, v: torch.Tensor, t: int) -> tuple[torch.Tensor, float]:
        """Mean and std of the step t -> previous(t) (module docstring)."""
        p = self.previous(t)
        s_t, s_p = self.sigma(t), self.sigma(p)
        ratio = (1 - s_t) / (1 - s_p)
        var = max(s_t**2 - ratio**2 * s_p**2, 0.0) * s_p**2 / s_t**2
        noise = self.eta * var**0.5
        eps, x0 = self.eps_and_x0(x_t, v, t)
        return (1 - s_p) * x0 + max(s_p**2 - noise**2, 0.0) ** 0.5 * eps, noise


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D)."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


class MMDiTAttnProcessor:
    """Joint attention with EmerDiff's capture, modulation and sharing (module docstring)."""

    def __init__(self, name: str, kind: str, controller: AttentionController, text_first: bool) -> None:
        self.name = name
        self.kind = kind  # "joint", "single", "image" (emerdiff.sd.mmdit.attention_kind)
        self.controller = controller
        self.text_first = text_first

    def _qkv(self, attn: Any, x: torch.Tensor, added: bool) -> tuple[torch.Tensor, ...]:
        if added:
            q, k, v = attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x)
            nq, nk = getattr(attn, "norm_added_q", None), getattr(attn, "norm_added_k", None)
        else:
            q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
            nq, nk = getattr(attn, "norm_q", None), getattr(attn, "norm_k", None)
        raw_q = q
        q, k, v = (_heads(y, attn.heads) for y in (q, k, v))
        if nq is not None:
            q = nq(q)
        if nk is not None:
            k = nk(k)
        return raw_q, q, k, v

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        ctl = self.controller
        batch, n_first = hidden_states.shape[:2]
        raw_q, q, k, v = self._qkv(attn, hidden_states, added=False)
        text = encoder_hidden_states is not None and getattr(attn, "add_q_proj", None) is not None
        if text:
            n_text = encoder_hidden_states.shape[1]  # type: ignore[union-attr]
            ctl.text_tokens = n_text  # FLUX's single-stream blocks (later in the same call) need it
            _, tq, tk, tv = self._qkv(attn, encoder_hidden_states, added=True)  # type: ignore[arg-type]
            parts = ((tq, q), (tk, k), (tv, v)) if self.text_first else ((q, tq), (k, tk), (v, tv))
            q, k, v = (torch.cat(pair, dim=2) for pair in parts)
        if self.kind == "single":  # one joint sequence, text first: the image tokens are its tail
            n_text = ctl.text_tokens if ctl.text_tokens is not None else 0
            image = slice(n_text, None)
        elif text and self.text_first:
            image = slice(n_text, None)
        else:
            image = slice(0, n_first)
        if self.name in ctl.capture_layers:
            ctl.captured[self.name] = raw_q[:, image if self.kind == "single" else slice(None)].detach()
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=2)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=2)

        share = ctl.share_attention and batch > 1
        if share:  # element 0's maps for every element (joint sequence, text included)
            q, k = q[:1], k[:1]
        scale = q.shape[-1] ** -0.5
        if self.name in ctl.probability_layers:
            p = ((q.float() @ k.float().transpose(-1, -2)) * scale).softmax(-1).mean(1)
            ctl.probabilities.setdefault(self.name, []).append(p.detach())
        if ctl.explicit_probabilities:
            scores = (q.float() @ k.float().transpose(-1, -2)) * scale
            if attention_mask is not None:
                scores = scores + attention_mask[: scores.shape[0]].float()
            out = scores.softmax(-1).to(v.dtype) @ v
        else:
            if share:
                q, k = q.expand(batch, -1, -1, -1), k.expand(batch, -1, -1, -1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * v.shape[-1]).to(v.dtype)

        modulate = ctl.modulation is not None and self.name == ctl.modulation_layer
        if self.kind == "single":  # no output projection: the block concatenates with its MLP and projects
            if modulate:
                img = out[:, image]
                out = torch.cat([out[:, : out.shape[1] - img.shape[1]], self._add(img)], dim=1)
            return out
        img, txt = out[:, image], None
        if text:
            txt = out[:, :n_text] if self.text_first else out[:, n_first:]
        img = attn.to_out[1](attn.to_out[0](img.contiguous()))
        if modulate:
            img = self._add(img)
        if txt is None:
            return img
        if not getattr(attn, "context_pre_only", False):
            txt = attn.to_add_out(txt.contiguous())
        return img, txt

    def _add(self, img: torch.Tensor) -> torch.Tensor:
        """+c on every channel of every image token inside the mask."""
        return img + self.controller.modulation_for(img.shape[1]).to(img.dtype)[:, :, None]


@contextlib.contextmanager
def controlled_mmdit_attention(transformer: Any, controller: AttentionController) -> Iterator[AttentionController]:
    """Install :class:`MMDiTAttnProcessor` on every attention of an SD3/FLUX transformer for a block;
    the previous processors come back on exit, also when the block raises."""
    from emerdiff.sd.mmdit import attention_kind, transformer_family

    text_first = transformer_family(transformer) == "flux"
    previous = dict(transformer.attn_processors)
    processors = {}
    for key in previous:
        name = key[: -len(".processor")]
        processors[key] = MMDiTAttnProcessor(name, attention_kind(transformer, name), controller, text_first)
    transformer.set_attn_processor(dict(processors))
    try:
        yield controller
    finally:
        transformer.set_attn_processor(dict(previous))
