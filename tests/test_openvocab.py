"""Open-vocabulary labellers: tiny CLIP offline, mask pooling, vocabulary errors, cross-attention."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from builders import build_tiny_clip

from emerdiff.method.vocabulary import (
    CLIPMaskLabeller,
    CrossAttentionLabeller,
    check_vocabulary,
    pool_in_masks,
    scores_to_result,
)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")
    return CLIPMaskLabeller(folder, device="cpu", local_files_only=True)


def _segmentation(h=96, w=128):
    labels = np.zeros((h, w), np.int64)
    labels[:, w // 2:] = 1
    labels[: h // 3, :] = 2
    return SimpleNamespace(labels=labels, num_segments=3)


def test_tiny_clip_end_to_end_offline(tiny_clip, photo):
    seg = _segmentation(512, 512)
    res = tiny_clip.label(photo, seg, ["person", "sky", "rocket", "grass"])
    assert res.class_map.shape == (512, 512) and res.dense_class_map.shape == (512, 512)
    assert res.mask_scores.shape == (3, 4) and res.mask_classes.shape == (3,)
    assert set(np.unique(res.class_map)) <= set(range(4))
    # every mask's pixels carry the mask's class
    for i in range(3):
        assert (res.class_map[seg.labels == i] == res.mask_classes[i]).all()
    feats = tiny_clip.dense_features(photo)
    assert feats.shape == (16, 8, 8)  # projection dim, 64 px / 8 px patches
    assert torch.allclose(feats.norm(dim=0), torch.ones(8, 8), atol=1e-5)


def test_denser_grid_by_interpolating_positions(tmp_path, photo):
    lab = CLIPMaskLabeller(build_tiny_clip(tmp_path / "c"), device="cpu", image_size=96, local_files_only=True)
    assert lab.dense_features(photo).shape[-2:] == (12, 12)


def test_mask_pooling_picks_the_matching_class():
    """Constructed features: mask 0 covers patches whose features equal class 2's text embedding."""
    text = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    feats = torch.zeros(8, 4, 4)
    feats[:, :, :2] = text[2][:, None, None]  # left half looks like class 2
    feats[:, :, 2:] = text[0][:, None, None]  # right half like class 0
    feats += 0.05 * torch.randn(feats.shape, generator=torch.Generator().manual_seed(1))
    labels = np.zeros((40, 40), np.int64)
    labels[:, 20:] = 1
    pooled = F.normalize(pool_in_masks(feats, labels, 2), dim=-1)
    res = scores_to_result(["a", "b", "c", "d"], labels, pooled @ text.T, torch.einsum("chw,vc->vhw", feats, text))
    assert list(res.mask_classes) == [2, 0]
    assert (res.dense_class_map[:, :18] == 2).mean() > 0.9


def test_pool_is_area_weighted():
    feats = torch.stack([torch.tensor([[1.0, 0.0], [1.0, 0.0]])])  # (1, 2, 2): left patch column = 1
    labels = np.zeros((4, 4), np.int64)
    labels[:, 3] = 1  # mask 1 covers half of the right patch column only
    labels[:, 1] = 1  # ... and half of the left column
    pooled = pool_in_masks(feats, labels, 2)
    assert torch.allclose(pooled[:, 0], torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("vocab,match", [
    ("", "empty"), ([], "empty"), ("cat,,dog", "empty"), ("cat,dog,Cat", "duplicate"),
])
def test_vocabulary_errors(vocab, match):
    with pytest.raises(ValueError, match=match):
        check_vocabulary(vocab)


def test_vocabulary_too_long_for_text_encoder(tiny_model):
    lab = CrossAttentionLabeller(tiny_model, resolution=128)
    names = [f"class{i}" for i in range(40)]  # far beyond 77 tokens with a byte-level tokenizer
    with pytest.raises(ValueError, match="tokens but the text encoder takes 77"):
        lab.prompt_tokens(names)


def test_clip_name_too_long(tiny_clip):
    with pytest.raises(ValueError, match="too long"):
        tiny_clip.text_embeddings(["x" * 200])


def test_cross_attention_labeller(tiny_model, photo):
    lab = CrossAttentionLabeller(tiny_model, timesteps=(101, 281), resolution=128)
    ids, spans = lab.prompt_tokens(["cat", "dog"])
    assert ids.shape == (1, 77) and spans[0] == [1, 2, 3] and spans[1][0] == 5  # byte tokens, comma between
    maps = lab.class_maps(photo, ["cat", "dog"])
    assert maps.shape == (2, 16, 16)
    assert torch.allclose(maps.sum(0), torch.ones(16, 16), atol=1e-5)
    res = lab.label(photo, _segmentation(512, 512), ["cat", "dog"])
    assert res.class_map.shape == (512, 512) and res.mask_scores.shape == (3, 2)


def test_cross_attention_unknown_layer(tiny_model):
    with pytest.raises(ValueError, match="not cross-attention layers"):
        CrossAttentionLabeller(tiny_model, layers=["up_blocks.1.attentions.0.transformer_blocks.0.attn1"])


def test_ambiguous_masks_flags_ties_and_flat_scores():
    from emerdiff.method.vocabulary import ambiguous_masks

    scores = np.array([[0.9, 0.1, 0.0],     # a clear winner
                       [0.50, 0.49, 0.0],   # best within 2 % of the range of the next: a tie
                       [0.300, 0.301, 0.302]])  # every class alike (range 0.3 % of the scores)
    assert ambiguous_masks(scores) == [1, 2]
    assert ambiguous_masks(scores[:1]) == [] and ambiguous_masks(np.ones((3, 1))) == []


def test_vocabulary_warnings_name_unknown_words_and_guesses(tmp_path):
    from emerdiff.assets.scenes import CLASSES
    from emerdiff.method.vocabulary import OpenVocabResult, known_vocabulary, vocabulary_warnings

    known = known_vocabulary("reference")
    assert known is not None and set(CLASSES) <= set(known)
    assert known_vocabulary("tiny") is None and known_vocabulary(str(tmp_path)) is None
    (tmp_path / "reference.json").write_text("{}")  # a folder of the reference model (a copy or a checkpoint)
    assert known_vocabulary(str(tmp_path)) == known

    def result(vocab, scores):
        scores = np.asarray(scores, dtype=float)
        return OpenVocabResult(vocab, np.zeros((2, 2), int), scores.argmax(1), scores, np.zeros((2, 2), int))

    clear = result(["sky", "house"], [[0.9, 0.1], [0.1, 0.9]])
    assert vocabulary_warnings(clear, known) == []
    odd = vocabulary_warnings(result(["person", "sky", "rocket"], [[0.2, 0.9, 0.1], [0.5, 0.1, 0.49]]), known)
    assert len(odd) == 2 and "person" in odd[0] and "rocket" in odd[0] and "sky" not in odd[0].split("]")[0]
    assert "segments [1]" in odd[1]
    assert vocabulary_warnings(result(["person", "rocket"], [[0.9, 0.1], [0.1, 0.9]]), None) == []  # open vocabulary
