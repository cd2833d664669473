"""Open-vocabulary class names for EmerDiff masks.

Two labellers behind one interface, ``labeller.label(image, segmentation,
vocabulary) -> OpenVocabResult``:

* :class:`CLIPMaskLabeller` — MaskCLIP-style dense CLIP features (the value
  path of the last attention block through the output and visual projections)
  pooled inside each mask, compared by cosine with prompt-ensembled text
  embeddings of the class names. Its per-patch argmax is the noisy baseline.
* :class:`CrossAttentionLabeller` — the diffusion model's own cross-attention
  maps of the class-name tokens (DAAM-style: averaged over layers, heads and
  timesteps), pooled inside each mask. Needs no extra model.

Both also return the dense (mask-free) prediction, so "labeller alone" and
"labeller + EmerDiff masks" can be compared.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from emerdiff.sd.images import ImageInput, load_image

TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "there is a {} in the scene.",
    "a cropped photo of the {}.",
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class OpenVocabResult:
    """Class names for one image.

    class_map: (H, W) index into ``vocabulary`` for every pixel (masks labelled).
    mask_classes: (K,) class index of each EmerDiff mask.
    mask_scores: (K, V) similarity of each mask to each class.
    dense_class_map: (H, W) the labeller alone, without masks (baseline).
    """

    vocabulary: list[str]
    class_map: np.ndarray
    mask_classes: np.ndarray
    mask_scores: np.ndarray
    dense_class_map: np.ndarray


# A mask's best class is "within noise" of its second when their margin is below this share of the
# mask's score range over the vocabulary, or when that range itself is below FLAT_SCORES of the scores'
# magnitude (every class looks alike to the labeller). Heuristics, stated so a user can judge them.
TIE_MARGIN = 0.1
FLAT_SCORES = 0.02


def ambiguous_masks(mask_scores: np.ndarray) -> list[int]:
    """Masks whose best and second-best class scores are within noise (:data:`TIE_MARGIN`,
    :data:`FLAT_SCORES`): their class is a coin toss between names, not a reading of the image."""
    scores = np.asarray(mask_scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        return []
    top2 = np.sort(scores, axis=1)[:, -2:]
    spread = scores.max(1) - scores.min(1)
    flat = spread < FLAT_SCORES * (np.abs(scores).mean(1) + 1e-12)
    tied = (top2[:, 1] - top2[:, 0]) < TIE_MARGIN * np.maximum(spread, 1e-12)
    return [int(i) for i in np.flatnonzero(flat | tied)]


def known_vocabulary(model: Any) -> tuple[str, ...] | None:
    """The words a model can know, where that is a closed set: the shipped reference model was trained on
    captions of its 12 scene classes only (:data:`emerdiff.assets.scenes.CAPTION_WORDS`). None for SD and
    any other model (open vocabulary)."""
    source = str(getattr(model, "source", model))
    folder = Path(source)
    if source == "reference" or (folder / "reference.json").is_file():
        from emerdiff.assets.scenes import CAPTION_WORDS

        return CAPTION_WORDS
    return None


def vocabulary_warnings(result: OpenVocabResult, known: Sequence[str] | None = None) -> list[str]:
    """Plain-language warnings for a labelled image: names outside what the model knows (``known``, e.g.
    :func:`known_vocabulary`) and masks whose class is within noise of another (:func:`ambiguous_masks`)."""
    out = []
    if known is not None:
        words = {w.lower() for w in known}
        unknown = [name for name in result.vocabulary if any(w not in words for w in name.lower().split())]
        if unknown:
            out.append(f"{unknown} lie outside the {len(words)} words this model was trained on (e.g. "
                       f"{', '.join(list(known)[:12])}); their scores say nothing about the image")
    ambiguous = ambiguous_masks(result.mask_scores)
    if ambiguous:
        names = [result.vocabulary[int(c)] for c in result.mask_classes[ambiguous]]
        out.append(f"{len(ambiguous)} of {len(result.mask_classes)} segments have a best class within noise of the "
                   f"next (segments {ambiguous}, labelled {names}): treat those names as guesses")
    return out


def check_vocabulary(vocabulary: Sequence[str] | str) -> list[str]:
    """Normalise a vocabulary ("cat,dog" or a list); empty or duplicate names are errors."""
    names = [v.strip() for v in (vocabulary.split(",") if isinstance(vocabulary, str) else vocabulary)]
    if not names or any(not n for n in names):
        raise ValueError("the vocabulary is empty or has an empty class name; pass e.g. --vocab 'cat,dog,grass'")
    seen: set[str] = set()
    dups = sorted({n for n in names if n.lower() in seen or seen.add(n.lower())})  # type: ignore[func-returns-value]
    if dups:
        raise ValueError(f"duplicate class name(s) in the vocabulary: {dups}; each class must appear once")
    return names


def pool_in_masks(features: torch.Tensor, labels: np.ndarray | torch.Tensor, num_masks: int) -> torch.Tensor:
    """Area-weighted mean of dense features inside each mask.

    features: (C, h, w) on a patch grid; labels: (H, W) mask ids at any size.
    Each mask is reduced to the patch grid by the fraction of each patch it
    covers (adaptive average pooling of its one-hot map). Returns (K, C).
    """
    lab = torch.as_tensor(np.asarray(labels), device=features.device).long()
    onehot = F.one_hot(lab, num_masks).permute(2, 0, 1).float()[None]  # (1, K, H, W)
    weights = F.adaptive_avg_pool2d(onehot, features.shape[-2:])[0].flatten(1)  # (K, h*w)
    f = features.flatten(1).T.float()  # (h*w, C)
    return (weights @ f) / weights.sum(1, keepdim=True).clamp_min(1e-12)


def scores_to_result(vocabulary: list[str], segmentation_labels: np.ndarray, mask_scores: torch.Tensor,
                     dense_scores: torch.Tensor) -> OpenVocabResult:
    """Assemble the result: masks take their best class; the dense map is upsampled to the image."""
    size = tuple(segmentation_labels.shape)
    mask_classes = mask_scores.argmax(1).cpu().numpy()
    up = F.interpolate(dense_scores[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return OpenVocabResult(
        vocabulary=vocabulary,
        class_map=mask_classes[np.asarray(segmentation_labels)],
        mask_classes=mask_classes,
        mask_scores=mask_scores.cpu().numpy(),
        dense_class_map=up.argmax(0).cpu().numpy(),
    )


# --------------------------------------------------------------------- CLIP
def _in_hub_cache(repo_id: str) -> bool:
    """True if the Hugging Face cache holds ``repo_id``'s config (then loading needs no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint opens within ``timeout`` seconds.

    With a proxy configured the direct probe says nothing, so it answers True and lets the
    hub client try.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


class CLIPMaskLabeller:
    """MaskCLIP-style dense CLIP features pooled in EmerDiff masks.

    Args:
        model: hub id or local folder of a transformers CLIP model (safetensors).
        device: torch device (default: cuda if available).
        templates: prompt templates averaged per class name.
        image_size: input side in pixels; position embeddings are interpolated
            when it differs from the model's (a denser patch grid).
        local_files_only: never touch the network (default: HF_HUB_OFFLINE).
    """

    def __init__(self, model: str | os.PathLike = "openai/clip-vit-base-patch16", device: str | None = None,
                 templates: Sequence[str] = TEMPLATES, image_size: int | None = None,
                 local_files_only: bool | None = None) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        from emerdiff.sd.loading import ModelLoadError, _offline, resolve_device

        self.device = resolve_device(device)
        offline = _offline(local_files_only) or Path(model).exists()
        how = (f"Download it where the hub is reachable (`hf download {model} --local-dir ./clip`) and pass "
               "the folder, or use the labeller that needs no extra model (CLI: --labeller unet).")
        if not offline and not _in_hub_cache(str(model)) and not hub_reachable():
            # without this check the hub client retries for about half a minute before failing
            raise ModelLoadError(f"the CLIP model {model!r} is not in the local cache and the hub is "
                                 f"unreachable. {how}")
        try:
            self.model = CLIPModel.from_pretrained(str(model), use_safetensors=True,
                                                   local_files_only=offline).to(self.device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(str(model), local_files_only=offline)
        except OSError as err:
            raise ModelLoadError(f"could not load the CLIP model {model!r} ({err}). {how}") from err
        self.templates = list(templates)
        self.image_size = image_size or int(self.model.config.vision_config.image_size)

    @torch.no_grad()
    def text_embeddings(self, vocabulary: Sequence[str]) -> torch.Tensor:
        """(V, D) unit text embeddings, each the normalised mean over the templates."""
        names = check_vocabulary(vocabulary)
        limit = self.tokenizer.model_max_length
        out = []
        for name in names:
            prompts = [t.format(name) for t in self.templates]
            lengths = [len(self.tokenizer(p).input_ids) for p in prompts]
            if max(lengths) > limit:
                raise ValueError(f"class name {name!r} is too long for the text encoder "
                                 f"({max(lengths)} > {limit} tokens); shorten it")
            tok = self.tokenizer(prompts, padding=True, return_tensors="pt").to(self.device)
            pooled = self.model.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output
            e = F.normalize(self.model.text_projection(pooled), dim=-1).mean(0)
            out.append(F.normalize(e, dim=-1))
        return torch.stack(out)

    @torch.no_grad()
    def dense_features(self, image: ImageInput) -> torch.Tensor:
        """(D, h, w) unit patch features: value path of the last block (MaskCLIP)."""
        img = load_image(image)
        x = F.interpolate(img[None], size=(self.image_size, self.image_size), mode="bicubic",
                          antialias=True, align_corners=False).clamp(0, 1)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(self.device, self.model.dtype)
        vm = self.model.vision_model
        interp = self.image_size != int(self.model.config.vision_config.image_size)
        hidden = vm(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=interp).hidden_states[-2]
        last = vm.encoder.layers[-1]
        # MaskCLIP: drop the query-key attention of the last block (it mixes all
        # patches into the class token); keep value -> output projection only.
        v = last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(hidden)))
        feats = self.model.visual_projection(vm.post_layernorm(v))[0, 1:]  # drop the class token
        side = int(round(feats.shape[0] ** 0.5))
        return F.normalize(feats, dim=-1).T.reshape(-1, side, side)

    def label(self, image: ImageInput, segmentation: Any, vocabulary: Sequence[str]) -> OpenVocabResult:
        names = check_vocabulary(vocabulary)
        text = self.text_embeddings(names)
        feats = self.dense_features(image)
        pooled = F.normalize(pool_in_masks(feats, segmentation.labels, segmentation.num_segments), dim=-1)
        mask_scores = pooled @ text.T
        dense_scores = torch.einsum("chw,vc->vhw", feats.float(), text.float())
        return scores_to_result(names, segmentation.labels, mask_scores, dense_scores)


# ------------------------------------------------------- diffusion cross-attention
class CrossAttentionLabeller:
    """Class-name cross-attention maps of the diffusion model itself (DAAM-style).

    The prompt lists the class names ("cat, dog, grass"); the UNet runs on the
    image latent noised to each of ``timesteps``; the attention probabilities
    of every chosen cross-attention layer, averaged over heads, are gathered
    for the tokens of each name, upsampled to the latent grid and averaged.
    Per pixel the class maps are normalised to sum to one.

    Args:
        model: an SDPipeline from :func:`emerdiff.load_pipeline`.
        layers: cross-attention layer paths (default: every decoder cross-attention layer).
        timesteps: noise levels to average over.
        resolution: image side the model sees.
        seed: noise seed.
    """

    def __init__(self, model: Any, layers: Sequence[str] | None = None, timesteps: Sequence[int] = (101, 281, 501),
                 resolution: int = 512, seed: int = 0) -> None:
        from emerdiff.sd.loading import attention_layers

        if getattr(model, "family", "sd") in ("sd3", "flux"):  # issue 28: not ported (docs/PORTING.md)
            raise ValueError(f"the 'unet' labeller reads a UNet's cross-attention to CLIP tokens; {model.family} is an "
                             "MMDiT (joint attention to T5 tokens) and is not supported by it: use the 'clip' labeller")
        self.model = model
        modules = dict(model.unet.named_modules())
        cross = [n for n in attention_layers(model.unet) if getattr(modules[n], "is_cross_attention", False)]
        self.layers = list(layers) if layers is not None else [n for n in cross if n.startswith("up_blocks")]
        unknown = [n for n in self.layers if n not in cross]
        if unknown:
            raise ValueError(f"not cross-attention layers of this UNet: {unknown}; valid: {cross}")
        self.timesteps = list(timesteps)
        self.resolution = resolution
        self.seed = seed

    def prompt_tokens(self, vocabulary: Sequence[str]) -> tuple[torch.Tensor, list[list[int]]]:
        """Token ids of "<bos> name1 , name2 , ... <eos> <pad>..." and each name's positions."""
        names = check_vocabulary(vocabulary)
        tok = self.model.tokenizer
        ids = [tok.bos_token_id]
        spans = []
        comma = tok(",", add_special_tokens=False).input_ids
        for i, name in enumerate(names):
            piece = tok(name, add_special_tokens=False).input_ids
            spans.append(list(range(len(ids), len(ids) + len(piece))))
            ids += piece + (comma if i + 1 < len(names) else [])
        ids.append(tok.eos_token_id)
        limit = tok.model_max_length
        if len(ids) > limit:
            raise ValueError(f"the vocabulary needs {len(ids)} tokens but the text encoder takes {limit}; "
                             "use fewer or shorter class names")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids += [pad] * (limit - len(ids))
        return torch.tensor([ids]), spans

    @torch.no_grad()
    def class_maps(self, image: ImageInput, vocabulary: Sequence[str]) -> torch.Tensor:
        """(V, h, w) per-pixel class probabilities on the latent grid."""
        from emerdiff.method.attention import AttentionController, controlled_attention
        from emerdiff.method.modulation import unet_forward
        from emerdiff.sd.images import to_model_input

        m = self.model
        ids, spans = self.prompt_tokens(vocabulary)
        emb = m.text_encoder(ids.to(m.text_encoder.device))[0].to(m.dtype)
        x = to_model_input(load_image(image), self.resolution).to(m.device, m.dtype)
        latent = m.vae.encode(x).latent_dist.mean * m.vae.config.scaling_factor
        h, w = latent.shape[-2:]
        gen = torch.Generator("cpu").manual_seed(self.seed)
        acc = torch.zeros(len(spans), h, w, device=m.device)
        ctl = AttentionController(probability_layers=set(self.layers))
        shim = _WithEmbedding(m, emb)
        with controlled_attention(m.unet, ctl):
            for t in self.timesteps:
                a = float(m.scheduler.alphas_cumprod[t])
                noise = torch.randn(latent.shape, generator=gen).to(latent.device, latent.dtype)
                unet_forward(shim, a**0.5 * latent + (1 - a) ** 0.5 * noise, t)
        for name in self.layers:
            for probs in ctl.probabilities.get(name, []):
                p = probs[0].float()  # (tokens, context)
                side_h = int(round((p.shape[0] * h / w) ** 0.5))
                side_w = p.shape[0] // side_h
                words = torch.stack([p[:, s].sum(1) for s in spans]).reshape(-1, 1, side_h, side_w)
                acc += F.interpolate(words, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        return acc / acc.sum(0, keepdim=True).clamp_min(1e-12)

    def label(self, image: ImageInput, segmentation: Any, vocabulary: Sequence[str]) -> OpenVocabResult:
        names = check_vocabulary(vocabulary)
        maps = self.class_maps(image, names)
        pooled = pool_in_masks(maps, segmentation.labels, segmentation.num_segments)  # (K, V)
        return scores_to_result(names, segmentation.labels, pooled, maps)


class _WithEmbedding:
    """An SDPipeline view whose 'empty' embedding is a given prompt's (for unet_forward)."""

    def __init__(self, model: Any, embedding: torch.Tensor) -> None:
        self.unet = model.unet
        self.empty_embedding = embedding
