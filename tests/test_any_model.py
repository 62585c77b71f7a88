"""Models of every common shape through search, fine-tune and export: a sequence model on token ids, a
segmentation net with a transposed convolution, a token transformer built from nn.TransformerEncoderLayer,
(B, F) vectors, tuple and dict inputs, volumes through Conv3d and ConvTranspose1d, and nn.Transformer on two
float sequences; the first layers are those reading the input."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixbits
from mixbits.cost import bitops, profile
from mixbits.errors import MixbitsError
from mixbits.quant import quant_layers
from mixbits.quant.attention import prepare_model
from mixbits.rundir import MARKER
from mixbits.space import Policy, SearchSpace

# HAWQ at exactly one batch (trace_rse None): the check that nothing is left float turns every warning into an error
QUICK = {"hawq": {"probes": 1, "batches": 1, "trace_rse": None},
         "oneshot": {"epochs": 1, "eval_batches": 1, "bn_batches": 1}}


class SequenceNet(nn.Module):
    """Token ids (B, L) -> embedding -> two Conv1d -> class scores."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv1 = nn.Conv1d(8, 12, 3, padding=1)
        self.conv2 = nn.Conv1d(12, 12, 3, padding=1)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(self.conv1(self.emb(x).transpose(1, 2)))
        return self.head(torch.relu(self.conv2(h)).mean(-1))


class SegNet(nn.Module):
    """Images -> a (B, classes, H, W) map through a strided conv and a transposed convolution back up."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.out(torch.relu(self.up(torch.relu(self.mid(torch.relu(self.down(x)))))))


class TokenTransformer(nn.Module):
    """Token ids -> embedding -> nn.TransformerEncoder (PyTorch's own layers, fast path as PyTorch sets it)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(self.emb(x)).mean(1))


class VectorNet(nn.Module):
    """(B, F) feature vectors."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


class TwoInputs(nn.Module):
    """Two inputs, positional (a tuple batch) or by keyword (a dict batch); each branch's first layer reads one."""

    def __init__(self):
        super().__init__()
        self.image = nn.Conv2d(1, 4, 3, padding=1)
        self.features = nn.Linear(6, 4)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, image, features):
        a = torch.relu(self.image(image)).mean((2, 3))
        return self.head(torch.relu(self.mix(torch.cat([a, torch.relu(self.features(features))], 1))))


class VolumeNet(nn.Module):
    """Volumes (B, 1, D, H, W) -> two Conv3d -> a 1-D sequence up through a ConvTranspose1d -> class scores."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(1, 4, 3, padding=1)
        self.mid = nn.Conv3d(4, 4, 3, stride=(1, 2, 2), padding=1)
        self.up = nn.ConvTranspose1d(4, 6, 4, stride=2, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.mid(torch.relu(self.stem(x)))).flatten(2)  # (B, 4, D*H*W/4)
        return self.head(torch.relu(self.up(h)).mean(-1))


class Seq2Seq(nn.Module):
    """Two float sequences (source, target) -> nn.Transformer (encoder and decoder layers) -> class scores."""

    def __init__(self):
        super().__init__()
        self.src_in, self.tgt_in = nn.Linear(6, 16), nn.Linear(6, 16)
        self.transformer = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, src, tgt):
        return self.head(self.transformer(self.src_in(src), self.tgt_in(tgt)).mean(1))


class DictInputs(TwoInputs):
    def forward(self, image, features):  # called as model(**{"image": ..., "features": ...})
        return super().forward(image, features)


def _labels(gen, n=8):
    return torch.randint(0, 3, (n,), generator=gen)


def _data(kind: str):
    gen = torch.Generator().manual_seed(0)
    if kind in ("sequence", "transformer"):
        return [(torch.randint(0, 20, (8, 10), generator=gen), _labels(gen)) for _ in range(3)]
    if kind == "segmentation":
        return [(torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 3, (8, 8, 8), generator=gen))
                for _ in range(3)]
    if kind == "vectors":
        return [(torch.randn(8, 10, generator=gen), _labels(gen)) for _ in range(3)]
    if kind == "volume":
        return [(torch.randn(8, 1, 4, 6, 6, generator=gen), _labels(gen)) for _ in range(3)]
    if kind == "seq2seq":  # float sequences of different lengths, as positional inputs
        return [((torch.randn(8, 5, 6, generator=gen), torch.randn(8, 3, 6, generator=gen)), _labels(gen))
                for _ in range(3)]
    if kind == "tuple":
        return [((torch.randn(8, 1, 6, 6, generator=gen), torch.randn(8, 6, generator=gen)), _labels(gen))
                for _ in range(3)]
    return [({"image": torch.randn(8, 1, 6, 6, generator=gen), "features": torch.randn(8, 6, generator=gen)},
             _labels(gen)) for _ in range(3)]


MODELS = {"sequence": SequenceNet, "segmentation": SegNet, "transformer": TokenTransformer, "vectors": VectorNet,
          "tuple": TwoInputs, "dict": DictInputs, "volume": VolumeNet, "seq2seq": Seq2Seq}
FIRST_AND_LAST = {"emb", "head", "out", "down", "image", "features", "net.0", "net.4", "stem", "src_in", "tgt_in"}


def _loss_fn(kind):
    if kind != "segmentation":
        return None
    return lambda model, batch: F.cross_entropy(model(batch[0]), batch[1])  # per-pixel classes


@pytest.mark.parametrize("method", sorted(QUICK))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_input_kind_is_searched_by_hawq_and_oneshot(kind, method):
    torch.manual_seed(0)
    model, data = MODELS[kind](), _data(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left float silently here: every layer has a quantized type
        result = mixbits.search(model, data, "bitops<=uniform:4", method=method, options=QUICK[method],
                                loss_fn=_loss_fn(kind), progress=False)
    (policy,) = result.policies
    stats = profile(model, data[0][0])
    assert bitops(stats, policy) <= bitops(stats, Policy.uniform(result.space, 4))
    assert result.kept_float == [] and set(policy.bits) == set(stats.layers)
    assert result.space.searchable, "the space must leave something to search"


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_input_kind_fine_tunes_and_exports_matching_onnxruntime(kind, tmp_path):
    torch.manual_seed(0)
    model, data = MODELS[kind](), _data(kind)
    # the default learning rate (0.01): one epoch drives the two-input model's tiny fitted `head` input step to or below
    # zero, where the quantizer's floor (LsqQuantizer.table) keeps the step it quantizes with positive
    qmodel = mixbits.finetune(model, "uniform:4", data, epochs=1, loss_fn=_loss_fn(kind), progress=False)
    bits = {name: layer.bits for name, layer in quant_layers(qmodel).items()}
    assert bits == {name: (8, 8) if name in FIRST_AND_LAST else (4, 4) for name in bits}
    report = mixbits.export(qmodel, tmp_path / kind, data[0][0], check_inputs=data)
    check = report["onnx"]["check"]
    assert check["samples"] == 24 and check["differing_samples"] <= 1, check
    assert check["unoptimized"]["differing_samples"] <= 1
    if kind == "segmentation":  # a (B, C, H, W) map: relative error only, no top-1 over pixels
        assert check["top1_agreement"] is None and check["rel_diff"] < 1e-3
    else:
        assert check["top1_agreement"] >= 95.0
    written = {p.name for p in (tmp_path / kind).iterdir()}
    assert written == {"model.onnx", "model.mxb", "policy.json", "export_report.json", MARKER}  # MARKER: the owner


def test_first_layers_are_every_layer_reading_the_input_and_their_siblings():
    x = (torch.randn(2, 1, 6, 6), torch.randn(2, 6))
    space = SearchSpace.from_model(TwoInputs(), example_input=x)
    assert set(space.fixed) == {"image", "features", "head"} and space.searchable == ("mix",)
    # a transformer reading float features directly: q, k and v of the first block all read the input
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2), nn.Linear(8, 3))
    prepare_model(model)
    space = SearchSpace.from_model(model, example_input=torch.randn(2, 5, 8))
    first = [f"0.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert set(space.fixed) == {*first, "1"}
    assert "0.layers.0.self_attn.out_proj" in space.searchable and "0.layers.1.self_attn.q_proj" in space.searchable
    # without an example input: the first registered layer, as before
    assert set(SearchSpace.from_model(model).fixed) == {first[0], "1"}


def test_the_transformer_fast_path_never_bypasses_the_quantized_layers():
    torch.manual_seed(0)
    model, (x, _) = TokenTransformer().eval(), _data("transformer")[0]
    with torch.no_grad():  # eval and no grad: where PyTorch would take its fused path
        outs = {bits: mixbits.quantize(model, f"uniform:{bits}", x)(x) for bits in (2, 8)}
        prepared = prepare_model_copy(model)
        torch.testing.assert_close(prepared(x), model(x), atol=1e-5, rtol=1e-5)
    assert (outs[2] - outs[8]).abs().max() > 1e-3, "the bit-width must change the output"


def prepare_model_copy(model):
    import copy

    model = copy.deepcopy(model)
    prepare_model(model)
    return model


def test_nn_transformer_with_two_inputs_is_quantized_and_exported(tmp_path):
    torch.manual_seed(0)
    model = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True).eval()
    src, tgt = torch.randn(4, 5, 16), torch.randn(4, 3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's own note about enable_nested_tensor
        q = mixbits.quantize(model, "uniform:8", (src, tgt))
    names = list(quant_layers(q))
    assert "decoder.layers.0.multihead_attn.k_proj" in names and "encoder.layers.0.linear1" in names
    report = mixbits.export(q, tmp_path, (src, tgt))
    assert report["onnx"]["check"]["rel_diff"] < 1e-5 and report["onnx"]["check"]["top1_agreement"] is None


def test_a_float_transformer_is_priced_with_the_policy_of_its_prepared_space():
    model = TokenTransformer()
    x = _data("transformer")[0][0]
    space = SearchSpace.from_model(prepare_model_copy(model), example_input=x)
    stats = profile(model, x)  # the float model itself: profiled as prepared
    assert bitops(stats, Policy.uniform(space, 4)) < bitops(stats, Policy.uniform(space, 6))


def test_export_check_can_be_switched_off_and_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    model, data = SegNet(), _data("segmentation")
    q = mixbits.quantize(model, "uniform:4", data[0][0])
    report = mixbits.export(q, tmp_path / "unchecked", data[0][0], check=False)
    assert report["onnx"]["check"] is None and (tmp_path / "unchecked" / "model.onnx").is_file()
    onnx_export = importlib.import_module("mixbits.export.onnx_export")

    def refuse(*args, **kwargs):
        raise MixbitsError("the graph does not match")
    monkeypatch.setattr(onnx_export, "_check", refuse)
    with pytest.raises(MixbitsError, match="does not match"):
        mixbits.export(q, tmp_path / "failed", data[0][0])
    assert not (tmp_path / "failed").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(MixbitsError):
        mixbits.export(q, tmp_path / "kept", data[0][0])
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"]


def test_a_space_with_nothing_to_search_is_a_clear_error_for_every_method():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))  # first and last: both fixed
    data = [(torch.randn(4, 4), torch.randint(0, 3, (4,)))]
    for method in ("hawq", "oneshot"):
        with pytest.raises(MixbitsError, match=r"nothing to search in Sequential.*fixed \(0, 2\).*fixed='none'"):
            mixbits.search(model, data, "bitops<=uniform:4", method=method, progress=False)


@pytest.mark.parametrize("method", mixbits.list_methods())
@pytest.mark.parametrize("kind", ["transformer", "seq2seq"])  # nn.TransformerEncoderLayer; nn.Transformer
def test_every_method_searches_a_token_transformer_and_an_encoder_decoder(method, kind):
    from test_api import QUICK as EVERY

    torch.manual_seed(0)
    model, data = MODELS[kind](), _data(kind)
    result = mixbits.search(model, data, "bitops<=uniform:4", method=method, options=EVERY[method], progress=False)
    (policy,) = result.policies
    assert any(".self_attn.q_proj" in n for n in result.space.searchable)
    if kind == "seq2seq":  # the decoder's attention over the encoder's output is searched too
        assert "transformer.decoder.layers.0.multihead_attn.k_proj" in result.space.searchable
    assert bitops(profile(model, data[0][0]), policy) <= bitops(profile(model, data[0][0]),
                                                                Policy.uniform(result.space, 4))
