"""The command line on a model and data of the user's own, named as file.py:factory or module.path:factory."""

from __future__ import annotations

import json

import pytest

from mixbits.__main__ import main
from mixbits.pipeline import load_trained

USER_CODE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes, width):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(width * 16, num_classes)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x))))).flatten(1))


def make(num_classes=10, width=8):
    return Net(num_classes, width)


def data(batch_size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(96, 1, 8, 8, generator=gen), torch.randint(0, 3, (96,), generator=gen)
    batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, 96, batch_size)]
    return batches[:4], batches[4:5], batches[5:]


def not_data():
    return 42
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_pkg.py"
    path.write_text(USER_CODE)
    return path


def test_train_search_eval_export_a_model_of_ones_own(user_file, tmp_path, capsys):
    common = ["--model", f"{user_file}:make", "--data", f"{user_file}:data", "--set", "model.kwargs.width=4",
              "--batch-size", "16",
              "--set", "quant.fused=false"]
    assert main(["train", *common, "--epochs", "1", "--out", str(tmp_path / "fp")]) == 0
    model, card, _ = load_trained(tmp_path / "fp")
    assert card.name == f"{user_file}:make" and card.num_classes == 3 and model.conv1.out_channels == 4
    capsys.readouterr()
    assert main(["search", *common, "--method", "hawq", "--init", str(tmp_path / "fp"), "--budget",
                 "bitops<=uniform:3", "--finetune-epochs", "1", "--out", str(tmp_path / "s")]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    run = tmp_path / "s" / "finetune" / "budget0"
    assert main(["eval", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(row["test_top1"])
    assert main(["export", str(run), "--out", str(tmp_path / "exp"), "--check-samples", "16"]) == 0
    assert (tmp_path / "exp" / "model.onnx").is_file()


def test_a_module_path_factory_is_found_on_the_python_path(user_file, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(user_file.parent))
    assert main(["train", "--model", "user_pkg:make", "--data", "user_pkg:data", "--epochs", "1", "--batch-size", "16",
                 "--set", "quant.fused=false", "--out", str(tmp_path / "fp")]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "user_pkg:make"


@pytest.mark.parametrize(("flag", "spec", "message"), [
    ("--model", "no_such_module_xyz:make", "cannot import 'no_such_module_xyz'"),
    ("--model", "{file}:missing", "has no callable 'missing'"),
    ("--data", "{file}:not_data", "returned int; expected (train, test)"),
    ("--model", "{file}:make --set model.kwargs.depth=3", "takes no option 'depth'"),
])
def test_bad_specs_get_one_line_and_exit_2(user_file, tmp_path, capsys, flag, spec, message):
    spec, *rest = spec.format(file=user_file).split()
    base = {"--model": f"{user_file}:make", "--data": f"{user_file}:data"}
    base[flag] = spec
    argv = ["train", "--model", base["--model"], "--data", base["--data"], *rest, "--epochs", "1", "--batch-size", "16",
            "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_timm_and_torchvision_names_build_through_those_libraries(monkeypatch):
    import sys
    import types

    from torch import nn

    from mixbits.models import create

    calls = []
    timm = types.ModuleType("timm")
    timm.create_model = lambda name, **kw: calls.append(("timm", name, kw)) or nn.Linear(2, kw["num_classes"])
    vision = types.ModuleType("torchvision")
    vision.models = types.ModuleType("torchvision.models")
    vision.models.get_model = lambda name, **kw: calls.append(("tv", name, kw)) or nn.Linear(2, kw["num_classes"])
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "torchvision", vision)
    monkeypatch.setitem(sys.modules, "torchvision.models", vision.models)
    assert create("timm:resnet18", num_classes=5, in_chans=1).out_features == 5
    assert create("torchvision:resnet18", num_classes=7, in_chans=3).out_features == 7
    assert calls == [("timm", "resnet18", {"num_classes": 5, "in_chans": 1}), ("tv", "resnet18", {"num_classes": 7})]


def test_a_missing_library_says_what_to_install(monkeypatch):
    import sys

    from mixbits import MixbitsError
    from mixbits.models import create

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(MixbitsError, match="needs timm, which is not installed"):
        create("timm:resnet18")


SHAPED_CODE = '''
import torch
from torch import nn


class Tokens(nn.Module):
    """Token ids -> embedding -> PyTorch's own transformer encoder layer -> class scores."""

    def __init__(self, num_classes):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.encoder(self.emb(x)).mean(1))


class Segment(nn.Module):
    """Images -> a per-pixel class map, up through a transposed convolution."""

    def __init__(self, num_classes):
        super().__init__()
        self.down = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.out = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        return self.out(torch.relu(self.up(torch.relu(self.mid(torch.relu(self.down(x)))))))


def tokens(num_classes=3):
    return Tokens(num_classes)


def segment(num_classes=3):
    return Segment(num_classes)


def _split(x, y, batch_size):
    batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, 64, batch_size)]
    return batches[:2], batches[2:3], batches[3:]


def token_data(batch_size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 20, (64, 10), generator=gen)
    return _split(x, (x[:, 0] % 3), batch_size)


def pixel_data(batch_size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 1, 8, 8, generator=gen)
    return _split(x, (x[:, 0] > 0.5).long() + (x[:, 0] > 1.5).long(), batch_size)
'''


@pytest.mark.parametrize(("factory", "data"), [("tokens", "token_data"), ("segment", "pixel_data")])
def test_a_token_transformer_and_a_segmentation_net_go_through_the_cli(tmp_path, capsys, factory, data):
    path = tmp_path / "shaped.py"
    path.write_text(SHAPED_CODE)
    common = ["--model", f"{path}:{factory}", "--data", f"{path}:{data}", "--batch-size", "16"]
    assert main(["train", *common, "--epochs", "1", "--out", str(tmp_path / "fp")]) == 0
    searches = {"hawq": "search.options={probes: 1, trace_rse: null}",
                "oneshot": "search.options={epochs: 1, eval_batches: 1, bn_batches: 1}"}
    for method, options in searches.items():
        capsys.readouterr()
        assert main(["search", *common, "--method", method, "--init", str(tmp_path / "fp"), "--budget",
                     "bitops<=uniform:4", "--set", options, "--finetune-epochs", "1",
                     "--out", str(tmp_path / method)]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        run = tmp_path / method / "finetune" / "budget0"
        _, card, _ = load_trained(run)
        assert card.input_dtype == ("int64" if factory == "tokens" else "float32")
        assert main(["eval", str(run)]) == 0
        assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(row["test_top1"])
        assert main(["cost", str(run)]) == 0
        assert "total: MACs" in capsys.readouterr().out
        exported = tmp_path / f"exp-{method}"
        assert main(["export", str(run), "--out", str(exported), "--check-samples", "16"]) == 0
        report = json.loads((exported / "export_report.json").read_text())
        check = report["onnx"]["check"]
        assert check["samples"] == 16 and check["differing_samples"] <= 1
        assert (check["top1_agreement"] is None) == (factory == "segment")
        assert report["kept_float"] == [] and row["kept_float"] == []
    assert main(["export", str(run), "--out", str(tmp_path / "unchecked"), "--no-check", "--format", "onnx"]) == 0
    unchecked = json.loads((tmp_path / "unchecked" / "export_report.json").read_text())
    assert unchecked["onnx"]["check"] is None and (tmp_path / "unchecked" / "model.onnx").is_file()


def test_help_names_the_factory_specs_the_commands_accept(capsys):
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "file.py:fn or module.path:fn" in text and "(train, test) or (train, val, test)" in text
    assert "a tuple or dict of tensors" in text  # the input kinds tests/test_cli_inputs.py runs
