"""Folding (B, 1, K) decode inputs of quantized layers into (B, K) keeps the same results."""

from __future__ import annotations

import mlx.core as mx
from mlx import nn
from mlx_lm.models import llama

from mlx_engine_server.engine.decode_fold import FoldedQuantizedLinear, fold_quantized_decode


def test_folded_layer_matches_the_plain_one() -> None:
    mx.random.seed(3)
    plain = nn.QuantizedLinear.from_linear(nn.Linear(128, 96), group_size=32, bits=4)
    folded = nn.QuantizedLinear.from_linear(nn.Linear(128, 96), group_size=32, bits=4)
    folded.update(plain.parameters())
    folded.__class__ = FoldedQuantizedLinear
    for shape in [(8, 1, 128), (1, 1, 128), (2, 5, 128), (4, 128)]:
        x = mx.random.normal(shape)
        assert folded(x).shape == plain(x).shape
        assert mx.allclose(folded(x), plain(x), atol=1e-5).item(), shape


def test_every_quantized_layer_of_a_model_is_folded_and_logits_agree() -> None:
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=256,
        tie_word_embeddings=False,
    )
    model = llama.Model(args)
    nn.quantize(model, group_size=32, bits=4)
    tokens = mx.array([[5], [7], [9], [11]])
    before = model(tokens)
    assert fold_quantized_decode(model) == 2 * 7 + 1  # q, k, v, o, gate, up, down; lm_head
    assert mx.allclose(model(tokens), before, atol=1e-5).item()
