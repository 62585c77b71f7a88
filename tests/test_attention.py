"""nn.MultiheadAttention split into quantizable projections, and a transformer classifier through search and export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mixbits
from mixbits.cost import bitops, profile, size_bits
from mixbits.models import create
from mixbits.quant.attention import SplitAttention, prepare_model


@pytest.mark.parametrize("batch_first", [True, False])
def test_split_attention_computes_what_multihead_attention_computes(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    split = SplitAttention.from_mha(mha).eval()
    q, kv = torch.randn(3, 5, 16), torch.randn(3, 7, 16)  # different query and key lengths
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[:, -2:] = True
    for kwargs in ({}, {"key_padding_mask": padding, "average_attn_weights": False},
                   {"attn_mask": torch.randn(5, 7)}, {"attn_mask": torch.rand(12, 5, 7) > 0.8}):
        expected, expected_w = mha(q, kv, kv, **kwargs)
        got, got_w = split(q, kv, kv, **kwargs)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got_w, expected_w, atol=1e-6, rtol=1e-5)


def test_prepare_model_replaces_attention_and_the_space_sees_every_projection():
    model = create("vit_tiny", num_classes=10, in_chans=1)
    x = torch.randn(2, 1, 28, 28)
    before = model.eval()(x)
    assert mixbits.SearchSpace.from_model(model).layers == ("patch_embed", "blocks.0.mlp.0", "blocks.0.mlp.2",
                                                             "blocks.1.mlp.0", "blocks.1.mlp.2", "head")
    assert prepare_model(model) == ["blocks.0.attn", "blocks.1.attn"]
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    layers = mixbits.SearchSpace.from_model(model).layers
    assert [n for n in layers if ".attn." in n] == [f"blocks.{b}.attn.{p}_proj" for b in (0, 1)
                                                    for p in ("q", "k", "v", "out")]


def test_transformer_bitops_and_size_match_a_hand_count():
    model = create("vit_tiny", num_classes=10, in_chans=1)  # 28 px, patch 4: 49 patches + 1 class token
    prepare_model(model)
    stats = profile(model, (1, 28, 28))
    space = mixbits.SearchSpace.from_model(model)
    policy = mixbits.Policy.uniform(space, 4)
    tokens, dim, hidden = 50, 64, 128
    macs_searched = 2 * (4 * tokens * dim * dim + 2 * tokens * dim * hidden)  # q, k, v, out; the MLP's two layers
    macs_fixed = 49 * 16 * dim + dim * 10  # patch embedding (4x4x1 kernel per patch), head on the class token
    assert bitops(stats, policy) == macs_searched * 4 * 4 + macs_fixed * 8 * 8
    weights_searched = 2 * (4 * dim * dim + 2 * dim * hidden)
    weights_fixed = 16 * dim + dim * 10
    assert size_bits(stats, policy) >= weights_searched * 4 + weights_fixed * 8


def test_a_transformer_classifier_is_searched_and_exported(tmp_path):
    torch.manual_seed(0)
    model = create("vit_tiny", num_classes=3, in_chans=1, image_size=8, patch=4, dim=16, depth=1, heads=2)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(3)]
    result = mixbits.search(model, data, "bitops<=uniform:3", method="oneshot",
                            options={"epochs": 1, "eval_batches": 1, "bn_batches": 1}, progress=False)
    assert any(".attn.q_proj" in n for n in result.policies[0].bits)
    net = mixbits.subnet(result, bn_data=data)
    assert mixbits.evaluate(net, data)["samples"] == 24
    report = mixbits.export(net, tmp_path / "vit", data[0][0], check_inputs=data)
    assert report["onnx"]["check"]["top1_agreement"] >= 99.0
    assert report["onnx"]["check"]["unoptimized"]["top1_agreement"] >= 99.0
    assert report["packed"]["file_bytes"] > 0
