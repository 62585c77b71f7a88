"""The command line on models whose inputs are not one image tensor: token ids into Conv1d layers, a tuple of
two tensors (positional inputs) and a dict of them (keyword inputs), each named as file.py:factory, through
train, search (HAWQ and one-shot), fine-tune, eval, cost, lut and export with the onnxruntime check; and a model
with LSTM and GRU layers, kept float and named so by every command."""

from __future__ import annotations

import json

import pytest
import torch

from mixbits.__main__ import main
from mixbits.pipeline import load_trained
from mixbits.quant import quant_layers

USER_CODE = '''
import torch
from torch import nn


class Sequence(nn.Module):
    """Token ids (B, L) -> embedding -> two Conv1d -> class scores."""

    def __init__(self, num_classes):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv1 = nn.Conv1d(8, 12, 3, padding=1)
        self.conv2 = nn.Conv1d(12, 12, 3, padding=1)
        self.head = nn.Linear(12, num_classes)

    def forward(self, x):
        h = torch.relu(self.conv1(self.emb(x).transpose(1, 2)))
        return self.head(torch.relu(self.conv2(h)).mean(-1))


class Pair(nn.Module):
    """An image and a feature vector, each read by its own first layer."""

    def __init__(self, num_classes):
        super().__init__()
        self.image = nn.Conv2d(1, 4, 3, padding=1)
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.features = nn.Linear(6, 4)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, image, features):
        a = torch.relu(self.mid(torch.relu(self.image(image)))).mean((2, 3))
        return self.head(torch.relu(self.mix(torch.cat([a, torch.relu(self.features(features))], 1))))


class Recurrent(nn.Module):
    """Token ids -> embedding -> LSTM -> Conv1d -> GRU -> class scores: the recurrent layers stay float."""

    def __init__(self, num_classes):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        h, _ = self.lstm(self.emb(x))
        h, _ = self.gru(torch.relu(self.conv(h.transpose(1, 2))).transpose(1, 2))
        return self.head(h.mean(1))


def recurrent(num_classes=3):
    return Recurrent(num_classes)


def shallow(num_classes=3):  # an embedding (the first layer) and a head (the last): nothing left to search
    return nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(80, num_classes))


def sequence(num_classes=3):
    return Sequence(num_classes)


def pair(num_classes=3):
    return Pair(num_classes)


def _split(inputs, y, batch_size, pack):
    batches = [(pack(*(t[i:i + batch_size] for t in inputs)), y[i:i + batch_size]) for i in range(0, 64, batch_size)]
    return batches[:2], batches[2:3], batches[3:]


def token_data(batch_size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 20, (64, 10), generator=gen)
    return _split([x], x[:, 0] % 3, batch_size, lambda t: t)


def _pair(seed):
    gen = torch.Generator().manual_seed(seed)
    image, features = torch.randn(64, 1, 6, 6, generator=gen), torch.randn(64, 6, generator=gen)
    score = features[:, 0] + image.mean((1, 2, 3))
    return [image, features], (score > -0.5).long() + (score > 0.5).long()


def tuple_data(batch_size=16, seed=0):
    return _split(*_pair(seed), batch_size, lambda image, features: (image, features))


def dict_data(batch_size=16, seed=0):
    return _split(*_pair(seed), batch_size, lambda image, features: {"image": image, "features": features})
'''

KINDS = {"tokens": ("sequence", "token_data"), "tuple": ("pair", "tuple_data"), "dict": ("pair", "dict_data")}
METHODS = {"hawq": ["--set", "search.options={probes: 1, batches: 1, trace_rse: null}"],
           "oneshot": ["--set", "search.options={epochs: 1, eval_batches: 1, bn_batches: 1}"]}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_token_tuple_and_dict_inputs_go_through_every_command(tmp_path, capsys, kind):
    path = tmp_path / "inputs_user.py"
    path.write_text(USER_CODE)
    factory, data = KINDS[kind]
    common = ["--model", f"{path}:{factory}", "--data", f"{path}:{data}", "--batch-size", "16"]
    assert main(["train", *common, "--epochs", "1", "--out", str(tmp_path / "fp")]) == 0
    for method, options in METHODS.items():
        capsys.readouterr()
        out = tmp_path / method
        assert main(["search", *common, "--method", method, *options, "--init", str(tmp_path / "fp"), "--budget",
                     "bitops<=uniform:4", "--finetune-epochs", "1", "--out", str(out)]) == 0, capsys.readouterr().err
        (row,) = json.loads(capsys.readouterr().out)
        run = out / "finetune" / "budget0"
        model, card, _ = load_trained(run)
        example = card.example_input()
        if kind == "tokens":
            assert example.dtype == torch.int64 and tuple(example.shape) == (1, 10)
        else:
            image, features = example.values() if kind == "dict" else example
            assert isinstance(example, dict if kind == "dict" else tuple)
            assert tuple(image.shape) == (1, 1, 6, 6) and tuple(features.shape) == (1, 6)
        assert main(["eval", str(run)]) == 0
        assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(row["test_top1"])
        assert main(["cost", str(run)]) == 0
        assert "total: MACs" in capsys.readouterr().out
        exported = tmp_path / f"export-{method}"
        assert main(["export", str(run), "--out", str(exported), "--check-samples", "16"]) == 0, \
            capsys.readouterr().err
        report = json.loads((exported / "export_report.json").read_text())
        check = report["onnx"]["check"]
        assert check["samples"] == 16 and check["differing_samples"] <= 1 and check["top1_agreement"] >= 93.75
        assert report["kept_float"] == [] and (exported / "model.mxb").is_file()
    # QAT at a policy from the float run: fine-tuning as `mixbits train` runs it on its own
    capsys.readouterr()
    assert main(["train", *common, "--epochs", "1", "--policy", "uniform:4", "--init", str(tmp_path / "fp"),
                 "--out", str(tmp_path / "w4a4")]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["kept_float"] == [] and "4/4" in trained["policy"] and trained["compression"]["bitops"] > 1
    # a latency table of the run: every layer timed at its real input shapes, the first layers held as the search did
    assert main(["lut", str(run), "--out", str(tmp_path / "lut.json"), "--bits", "4", "--repeats", "1",
                 "--warmup", "0"]) == 0, capsys.readouterr().err
    timed = json.loads((tmp_path / "lut.json").read_text())["layers"]
    held = {"emb", "head"} if kind == "tokens" else {"image", "features", "head"}
    assert {n: list(entries) for n, entries in timed.items()} == {n: ["w8a8" if n in held else "w4a4"]
                                                                 for n in quant_layers(model)}
    # the fast form's integer kernels take one float input: anything else is one clear refusal, nothing written
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "fast"), "--form", "fast", "--no-check"]) == 2
    assert "form='exact'" in capsys.readouterr().err and not (tmp_path / "fast").exists()


def test_recurrent_layers_are_warned_about_and_listed_kept_float_by_every_command(tmp_path, capsys):
    path = tmp_path / "inputs_user.py"
    path.write_text(USER_CODE)
    common = ["--model", f"{path}:recurrent", "--data", f"{path}:token_data", "--batch-size", "16"]
    assert main(["train", *common, "--epochs", "1", "--out", str(tmp_path / "fp")]) == 0
    capsys.readouterr()
    listed = r"2 layer\(s\) with weights stay float, counted at 32 bits in BitOPs and size: lstm \(LSTM\), gru \(GRU\)"
    with pytest.warns(UserWarning, match=listed):  # Python prints it on stderr outside pytest
        assert main(["search", *common, "--method", "hawq", *METHODS["hawq"], "--init", str(tmp_path / "fp"),
                     "--budget", "bitops<=uniform:4", "--finetune-epochs", "1", "--out", str(tmp_path / "s")]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["kept_float"] == ["lstm", "gru"]
    assert json.loads((tmp_path / "s" / "search.json").read_text())["kept_float"] == ["lstm", "gru"]
    run = tmp_path / "s" / "finetune" / "budget0"
    assert json.loads((run / "result.json").read_text())["kept_float"] == ["lstm", "gru"]
    with pytest.warns(UserWarning, match=listed):  # every command that rebuilds the run says it again
        model, _, _ = load_trained(run)
    assert list(quant_layers(model)) == ["emb", "conv", "head"]
    with pytest.warns(UserWarning, match=listed):
        assert main(["cost", str(run)]) == 0
    table = capsys.readouterr().out
    assert "kept float (32-bit weights and inputs, counted in BitOPs and size): lstm, gru" in table
    assert all(line.split()[4:6] == ["32", "32"] for line in table.splitlines() if line.startswith(("lstm", "gru")))
    with pytest.warns(UserWarning, match=listed):
        assert main(["export", str(run), "--out", str(tmp_path / "exp"), "--check-samples", "16"]) == 0
    assert "kept float (32-bit, counted in the predicted size): lstm, gru" in capsys.readouterr().out
    report = json.loads((tmp_path / "exp" / "export_report.json").read_text())
    assert report["kept_float"] == ["lstm", "gru"] and report["onnx"]["float_layers"] == ["lstm", "gru"]
    assert report["onnx"]["check"]["samples"] == 16 and report["onnx"]["check"]["differing_samples"] <= 1


def test_a_model_with_nothing_to_search_is_one_clear_error_on_the_command_line(tmp_path, capsys):
    path = tmp_path / "inputs_user.py"
    path.write_text(USER_CODE)
    common = ["--model", f"{path}:shallow", "--data", f"{path}:token_data", "--batch-size", "16"]
    assert main(["train", *common, "--epochs", "1", "--out", str(tmp_path / "fp")]) == 0
    for method, options in METHODS.items():
        capsys.readouterr()
        assert main(["search", *common, "--method", method, *options, "--init", str(tmp_path / "fp"), "--budget",
                     "bitops<=uniform:4", "--out", str(tmp_path / method)]) == 2
        err = capsys.readouterr().err
        assert "nothing to search in Sequential: all 2 quantized layer(s) are held fixed (0, 2)" in err, err
        assert "--set quant.fixed=none" in err and not (tmp_path / method).exists()  # nothing left behind
