"""Encoder outputs: shapes, norms, sparsity bounds, batch/single equality, local features, image modes."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from stair_search.encode import select_local
from stair_search.images import to_rgb
from stair_search.models.heads import SparseHead, top_k_sparse

TEXTS = ["a red circle", "two blue squares on a yellow background", "triangle", "dog running on the beach"]


def test_dense_vectors_are_unit_float32(tiny_encoder, shape_images):
    for batch in (tiny_encoder.encode_images(shape_images), tiny_encoder.encode_texts(TEXTS)):
        assert batch.dense.dtype == np.float32
        assert batch.dense.shape[1] == tiny_encoder.model.embed_dim
        np.testing.assert_allclose(np.linalg.norm(batch.dense, axis=1), 1.0, atol=1e-5)


def test_sparse_vectors_are_positive_bounded_and_use_emittable_tokens(tiny_encoder, shape_images):
    config, vocab = tiny_encoder.model.config, tiny_encoder.model.vocabulary
    images, texts = tiny_encoder.encode_images(shape_images), tiny_encoder.encode_texts(TEXTS)
    for vectors, bound in ((images.sparse, config.image_top_k), (texts.sparse, config.text_top_k)):
        for vector in vectors:
            assert 0 < len(vector) <= bound
            assert all(weight > 0 for weight in vector.values())
            assert all(vocab.emittable[vocab.index[token]] for token in vector)


def test_a_batch_gives_the_same_vectors_as_single_items(tiny_encoder, shape_images):
    batch = tiny_encoder.encode_images(shape_images[:5])
    for i, image in enumerate(shape_images[:5]):
        single = tiny_encoder.encode_images([image])
        np.testing.assert_allclose(single.dense[0], batch.dense[i], atol=1e-5)
        np.testing.assert_allclose(single.local[0].astype(np.float32), batch.local[i].astype(np.float32), atol=1e-3)
        assert single.sparse[0].keys() == batch.sparse[i].keys()
        np.testing.assert_allclose([single.sparse[0][t] for t in batch.sparse[i]], list(batch.sparse[i].values()),
                                   atol=1e-4)
    texts = tiny_encoder.encode_texts(TEXTS)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(tiny_encoder.encode_texts([text]).dense[0], texts.dense[i], atol=1e-5)


def test_encoding_is_deterministic(tiny_encoder, shape_images):
    first, second = tiny_encoder.encode_images(shape_images), tiny_encoder.encode_images(shape_images)
    np.testing.assert_array_equal(first.dense, second.dense)
    assert first.sparse == second.sparse


def test_local_features_are_unit_fp16_with_positions_inside_the_image(tiny_encoder, shape_images):
    batch = tiny_encoder.encode_images(shape_images)
    m = tiny_encoder.model.config.num_local
    assert batch.local.shape == (len(shape_images), m, tiny_encoder.model.embed_dim)
    assert batch.local.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(batch.local.astype(np.float32), axis=2), 1.0, atol=1e-2)
    assert batch.local_positions.shape == (len(shape_images), m, 2)
    assert (batch.local_positions > 0).all() and (batch.local_positions < 1).all()
    # distinct patches: MMR never picks the same patch twice
    assert all(len({tuple(p) for p in pos}) == m for pos in batch.local_positions.tolist())


def test_minilm_text_tower_encodes_real_meaning():
    """The embedded default's text tower is the pretrained MiniLM: paraphrases land closer than unrelated text."""
    from stair_search.encode import Encoder

    enc = Encoder("stair-tiny", device="cpu")
    dense = enc.encode_texts(["a dog playing on the beach", "a puppy running on the sand", "a tax return form"]).dense
    assert dense[0] @ dense[1] > dense[0] @ dense[2]


def test_sparse_head_equals_the_naive_formula_across_chunks():
    """Chunked, max-pooled-first head over a token subset == log1p(relu(logits)) per position, pooled, scattered."""
    torch.manual_seed(0)
    vocab = torch.randn(50, 8)
    token_ids = torch.tensor([i for i in range(50) if i not in (3, 17)])
    head = SparseHead(6, vocab, token_ids, bias_init=0.0)
    with torch.no_grad():
        head.bias.uniform_(-1, 1)
    features, mask = torch.randn(5, 7, 6), torch.rand(5, 7) > 0.3
    mask[:, 0] = True
    import stair_search.models.heads as heads

    budget, heads._LOGIT_BUDGET = heads._LOGIT_BUDGET, 7 * 48 * 2  # force chunks of 2 rows
    try:
        got = head(features, mask)
    finally:
        heads._LOGIT_BUDGET = budget
    full_logits = head.transform(features) @ vocab.T + head.bias  # every vocabulary row, computed naively
    expected = torch.stack([torch.log1p(torch.relu(full_logits[b][mask[b]])).amax(dim=0) for b in range(5)])
    expected[:, [3, 17]] = 0  # tokens outside the head's subset never get weight
    torch.testing.assert_close(got, expected)


def test_top_k_keeps_the_largest_weights():
    weights = torch.tensor([[0.1, 0.0, 3.0, 2.0, 0.5]])
    assert top_k_sparse(weights, 2).tolist() == [[0.0, 0.0, 3.0, 2.0, 0.0]]
    assert top_k_sparse(weights, 0).tolist() == weights.tolist()


def test_select_local_prefers_relevant_then_diverse_patches():
    # patches 0 and 1 are near-copies, 2 is as relevant but shows something else, 3 is irrelevant
    patches = torch.tensor([[[1.0, 0.3, 0.0], [1.0, 0.35, 0.0], [0.3, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    patches = torch.nn.functional.normalize(patches, dim=-1)
    global_ = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0, 0.0]]), dim=-1)
    # worked by hand: relevance .880 .901 .880 0; after picking 1, MMR scores -.060, .146, 0 -> pick 2
    assert select_local(patches, global_, 2)[0].tolist() == [1, 2]


def test_to_rgb_composites_transparency_on_white_and_handles_odd_modes():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgb = to_rgb(rgba)
    assert rgb.mode == "RGB" and rgb.getpixel((1, 1)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (255, 0, 0)
    palette = Image.new("P", (2, 2), 0)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).mode == "RGB"


def test_trimming_padding_columns_leaves_text_outputs_unchanged():
    from stair_search.models import create_model

    model = create_model("stair-tiny", device="cpu")  # a Hugging Face text tower: the one that trims
    ids = model.tokenizer(TEXTS)
    assert (ids == model.pad_id).all(dim=0).any()  # the batch has columns that are padding everywhere
    with torch.no_grad():
        pooled, tokens = model._text_tokens(ids)  # the full context length, untrimmed
        reference = model.text_head(tokens, ids[:, ids.shape[1] - tokens.shape[1] :] != model.pad_id)
        trimmed = model.encode_text(ids)
    torch.testing.assert_close(trimmed.dense, pooled, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(trimmed.sparse, reference, atol=1e-5, rtol=1e-4)
