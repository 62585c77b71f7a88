"""Bad input on the command line: exit code 2, one message naming the value and the fix, and no file touched."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_fails, snapshot

from mixbits.__main__ import COMMANDS, main
from mixbits.budget import cheapest_policy
from mixbits.config import QuantConfig
from mixbits.cost import bitops, profile
from mixbits.data import DATASETS
from mixbits.models import MODELS, create
from mixbits.pipeline import search_space
from mixbits.rundir import make_output_dir
from mixbits.space import POLICY_FORMAT

SMALL_CNN_LAYERS = ("conv1", "conv2", "conv3", "fc")
ALLOWED_BITS = "[2, 3, 4, 5, 6, 7, 8]"


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """An --out directory holding files of an earlier training run stopped before its first checkpoint (so train
    may use it again)."""
    out = make_output_dir(tmp_path / "out", "train")
    (out / "config.yaml").write_text("# notes of an earlier run\n")
    (out / "result.json").write_text('{"test_top1": 12.5}\n')
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    return out


def _train_fails(argv: list[str], out: Path, capsys) -> str:
    """``train ... --out out`` must fail without creating, changing or removing any file in ``out``."""
    before = snapshot(out) if out.exists() else None
    err = cli_fails([*argv, "--out", str(out)], capsys)
    if before is None:
        assert not out.exists()
    else:
        assert snapshot(out) == before
    return err


def _policy_file(path: Path, bits: dict[str, tuple[int, int]]) -> Path:
    layers = {name: {"w": w, "a": a} for name, (w, a) in bits.items()}
    path.write_text(json.dumps({"format": POLICY_FORMAT, "layers": layers}))
    return path


# 1. model name -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,hint", [("resnet21", "Did you mean 'resnet"),
                                       ("small-cnn", "Did you mean 'small_cnn'?")])
def test_unknown_model(name, hint, tiny_fp_run, out_dir, capsys):
    argv = [*tiny_fp_run.argv, "--model", name]
    err = _train_fails(argv, out_dir, capsys)
    assert f"unknown model {name!r}; expected one of: {', '.join(MODELS.names())}." in err
    assert hint in err


# 2. dataset name -----------------------------------------------------------------------------------------------
def test_unknown_dataset(tiny_fp_run, out_dir, capsys):
    err = _train_fails([*tiny_fp_run.argv, "--data", "fashion_mnist"], out_dir, capsys)
    assert f"unknown dataset 'fashion_mnist'; expected one of: {', '.join(DATASETS.names())}." in err
    assert "Did you mean 'fashion-mnist'?" in err


# 3. policies ---------------------------------------------------------------------------------------------------
def test_policy_naming_a_layer_the_model_lacks(tiny_fp_run, out_dir, tmp_path, capsys):
    bits = {**{name: (8, 8) for name in SMALL_CNN_LAYERS}, "conv4": (4, 4)}
    policy = _policy_file(tmp_path / "policy.json", bits)
    err = _train_fails([*tiny_fp_run.argv, "--policy", str(policy)], out_dir, capsys)
    assert "layer 'conv4' is not in the model" in err


def test_policy_file_with_bits_out_of_range(tiny_fp_run, out_dir, tmp_path, capsys):
    bits = {name: (8, 8) for name in SMALL_CNN_LAYERS} | {"conv2": (9, 4)}
    policy = _policy_file(tmp_path / "policy.json", bits)
    err = _train_fails([*tiny_fp_run.argv, "--policy", str(policy)], out_dir, capsys)
    assert f"layer 'conv2': weight bits 9 not allowed, expected one of {ALLOWED_BITS}" in err


def test_uniform_policy_with_bits_out_of_range(tiny_fp_run, out_dir, capsys):
    err = _train_fails([*tiny_fp_run.argv, "--policy", "uniform:9"], out_dir, capsys)
    assert f"policy 'uniform:9': 9 bits is not a candidate; expected one of {ALLOWED_BITS}" in err
    err = cli_fails(["cost", "--model", "small_cnn", "--policy", "uniform:9"], capsys)
    assert f"9 bits is not a candidate; expected one of {ALLOWED_BITS}" in err


# 4. budgets ----------------------------------------------------------------------------------------------------
def test_infeasible_budget_names_the_cheapest_cost(capsys):
    model = create("small_cnn", num_classes=10, in_chans=1)
    cheapest = bitops(profile(model, (1, 28, 28)), cheapest_policy(search_space(model, QuantConfig())))
    capsys.readouterr()
    assert main(["cost", "--model", "small_cnn", "--budget", "bitops<=0.001G"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing printed before the budget check
    assert "budget bitops<=0.001G is infeasible" in captured.err
    assert f"needs {cheapest / 1e9:.3g} G BitOPs but bitops<=0.001G allows 0.001 G BitOPs" in captured.err
    assert "raise the budget or allow lower bit-widths" in captured.err


@pytest.mark.parametrize("budget,why", [
    ("bitops<0.3G", "has no '<metric><=<limit>'"),
    ("bitops<=0.3Q", "BitOPs suffix 'Q' unknown; use K, M, G, T or none"),
])
def test_malformed_budget(budget, why, capsys):
    err = cli_fails(["cost", "--model", "small_cnn", "--budget", budget], capsys)
    assert f"budget {budget!r} is not understood: " in err
    assert why in err and "accepted forms: bitops<=0.35G" in err


# 5. checkpoints ------------------------------------------------------------------------------------------------
@pytest.fixture
def corrupt_run(tmp_path) -> Path:
    run = tmp_path / "corrupt"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(bytes((i * 7 + 3) % 256 for i in range(4096)))
    return run


def test_corrupt_checkpoint_given_to_eval(corrupt_run, capsys):
    before = snapshot(corrupt_run)
    err = cli_fails(["eval", str(corrupt_run)], capsys)
    assert f"checkpoint {corrupt_run / 'checkpoint.pt'} is corrupt or not a mixbits checkpoint" in err
    assert snapshot(corrupt_run) == before


def test_corrupt_checkpoint_given_as_init(corrupt_run, tiny_fp_run, out_dir, capsys):
    err = _train_fails([*tiny_fp_run.argv, "--init", str(corrupt_run)], out_dir, capsys)
    assert f"checkpoint {corrupt_run / 'checkpoint.pt'} is corrupt" in err


def test_checkpoint_of_another_model_given_as_init(tiny_fp_run, tmp_path, capsys):
    before = snapshot(tiny_fp_run.dir)
    err = _train_fails([*tiny_fp_run.argv, "--model", "resnet20", "--init", str(tiny_fp_run.dir)],
                       tmp_path / "resnet20", capsys)
    assert f"weights in {tiny_fp_run.dir / 'checkpoint.pt'} do not fit the model" in err
    assert "missing keys" in err and "unexpected keys: " in err and "bn2.weight" in err
    assert snapshot(tiny_fp_run.dir) == before


def test_quantized_checkpoint_given_as_init(tiny_q_run, tiny_fp_run, out_dir, capsys):
    err = _train_fails([*tiny_fp_run.argv, "--policy", "uniform:4", "--init", str(tiny_q_run.dir)], out_dir, capsys)
    assert f"--init {tiny_q_run.dir} is a quantized checkpoint; start from a float (pre-trained) one" in err


# 6. data directory ---------------------------------------------------------------------------------------------
def test_missing_data_directory(tiny_fp_run, out_dir, capsys):
    err = _train_fails([*tiny_fp_run.argv, "--data-dir", "/nonexistent/fmnist"], out_dir, capsys)
    assert "Fashion-MNIST directory /nonexistent/fmnist does not exist" in err
    assert "apt-get install dataset-fashion-mnist" in err and "--data-dir" in err


# 7-8. existing runs --------------------------------------------------------------------------------------------
def test_train_into_a_finished_run_without_resume(tiny_fp_run, fp_copy, capsys):
    err = _train_fails(tiny_fp_run.argv, fp_copy, capsys)
    assert "already holds a checkpoint; pass --resume to continue it or choose another --out" in err


def test_resume_with_another_learning_rate(tiny_fp_run, fp_copy, capsys):
    err = _train_fails([*tiny_fp_run.argv, "--resume", "--lr", "0.05"], fp_copy, capsys)
    assert "1 setting differs from the run's config.yaml (recorded -> asked): train.lr 0.1 -> 0.05" in err
    assert "resume with the recorded settings" in err


# the module entry point ----------------------------------------------------------------------------------------
def test_python_dash_m_help_lists_every_command():
    done = subprocess.run([sys.executable, "-m", "mixbits", "--help"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: mixbits ")
    for name, (_, help_text) in COMMANDS.items():
        assert name in done.stdout and help_text.split(",")[0] in done.stdout


# merge: --set into a mapping setting adds keys, it does not replace the mapping ----------------------------------
def _config(argv: list[str], command: str = "train"):
    """The run config the CLI would build from ``argv`` (no training)."""
    from mixbits.__main__ import build_parser
    from mixbits.commands import search
    from mixbits.commands.common import config_from_args

    args = build_parser().parse_args([command, *argv])
    return config_from_args(args, search.FLAGS if command == "search" else None)


def test_set_merges_into_mappings_from_the_config_file(tmp_path):
    config = tmp_path / "narrow.yaml"
    config.write_text("model:\n  name: resnet20\n  kwargs:\n    width: 0.25\nsearch:\n  options:\n    epochs: 2\n")
    cfg = _config(["--config", str(config), "--set", "model.kwargs.shortcut=B"])
    assert cfg.model.kwargs == {"width": 0.25, "shortcut": "B"}
    cfg = _config(["--config", str(config), "--set", "model.kwargs.shortcut=B", "--set", "model.kwargs.width=0.5",
                   "--set", "search.options.start=5"])
    assert cfg.model.kwargs == {"width": 0.5, "shortcut": "B"}
    assert cfg.search.options == {"epochs": 2, "start": 5}


# path round-trip: a path flag reaches the config exactly as typed ---------------------------------------------------
@pytest.mark.parametrize("path", ["runs/a\\b", "runs/it's", 'runs/say "hi"', "1e3", "null", "[x]", "runs/a: b"])
def test_path_flags_reach_the_config_unchanged(path, tmp_path):
    cfg = _config(["--out", path, "--data-dir", path, "--policy", "uniform:4"])
    assert (cfg.out, cfg.data.root) == (path, path)
    cfg = _config(["--out", path, "--budget", "bitops<=uniform:3", "--method", "hawq"], command="search")
    assert (cfg.out, cfg.search.budget, cfg.search.method) == (path, "bitops<=uniform:3", "hawq")
    cfg.save(tmp_path / "config.yaml")  # and back through the file a run keeps
    from mixbits.config import load_config

    assert load_config(tmp_path / "config.yaml").out == path


# numbers: exponent notation is a number, wherever it is written ------------------------------------------------------
def test_exponent_numbers_are_numbers(tmp_path):
    cfg = _config(["--lr", "0.00001", "--set", "train.weight_decay=1e-4", "--set", "train.min_lr=1E-7"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.min_lr) == (1e-5, 1e-4, 1e-7)
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lr: 2e-3\n  grad_clip: 1e+1\n")
    cfg = _config(["--config", str(config)])
    assert (cfg.train.lr, cfg.train.grad_clip) == (2e-3, 10.0)


@pytest.mark.parametrize("entry", [{"w": 4, "a": 4.7}, {"w": "4", "a": 4}, {"w": True, "a": 4}, {"w": 4}])
def test_policy_bits_must_be_whole_numbers(entry, tmp_path, capsys):
    bits = {name: {"w": 8, "a": 8} for name in SMALL_CNN_LAYERS} | {"conv2": entry}
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"format": POLICY_FORMAT, "layers": bits}))
    err = cli_fails(["cost", "--model", "small_cnn", "--policy", str(policy)], capsys)
    assert f"'conv2': {entry!r}" in err and "'w': <whole number>" in err


# encodings: a file that is not UTF-8, or not a file ------------------------------------------------------------------
def test_files_that_are_not_utf8_or_not_files(tiny_fp_run, out_dir, tmp_path, capsys):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("train:\n  lr: 0.1  # réglé\n".encode("latin-1"))
    err = _train_fails([*tiny_fp_run.argv, "--config", str(latin1)], out_dir, capsys)
    assert f"config file {str(latin1)!r} is not UTF-8 text" in err and "save it as UTF-8" in err
    err = _train_fails([*tiny_fp_run.argv, "--config", str(tmp_path)], out_dir, capsys)
    assert f"config file {str(tmp_path)!r} is a directory" in err
    for flag, what in (("--policy", "policy file"), ("--latency-table", "latency table")):
        bad = tmp_path / f"{what.replace(' ', '_')}.json"
        bad.write_bytes(b'{"format": "\xff"}')
        err = cli_fails(["cost", "--model", "small_cnn", flag, str(bad)], capsys)
        assert f"{what} {str(bad)!r} is not UTF-8 text" in err


# foreign runs: files in a run directory that mixbits did not write ---------------------------------------------------
@pytest.mark.parametrize("text,why", [("- data\n- train\n", "must be a mapping with a 'data' section"),
                                      ("data: [1, 2\n", "is not valid YAML"),
                                      ("data: 3\n", "must be a mapping with a 'data' section")])
def test_run_with_a_foreign_config_yaml(text, why, q_copy, tmp_path, capsys):
    (q_copy / "config.yaml").write_text(text)
    before = snapshot(q_copy)
    for argv in (["eval", str(q_copy)], ["export", str(q_copy), "--out", str(tmp_path / "exp")]):
        err = cli_fails(argv, capsys)
        assert f"run config {str(q_copy / 'config.yaml')!r} {why}" in err
    assert snapshot(q_copy) == before and not (tmp_path / "exp").exists()


@pytest.mark.parametrize("text,why", [('{"test_top1": 1', "is not valid JSON"), ("[1, 2]", "holds a JSON list")])
def test_report_on_a_foreign_result_json(text, why, q_copy, tmp_path, capsys):
    (q_copy / "result.json").write_text(text)
    err = cli_fails(["report", str(q_copy), "--out", str(tmp_path / "r")], capsys)
    assert f"{q_copy / 'result.json'} {why}" in err
    benchmark = tmp_path / "bench.json"
    benchmark.write_text(text)
    err = cli_fails(["report", str(benchmark)], capsys)
    assert f"{benchmark} {why}" in err and not (tmp_path / "bench.md").exists()


def test_foreign_checkpoint_is_named_without_torch_advice(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    run = tmp_path / "foreign"
    run.mkdir()
    torch.save(torch.nn.Linear(2, 2), run / "checkpoint.pt")
    err = cli_fails(["eval", str(run)], capsys)
    assert "holds Python objects such as torch.nn.modules.linear.Linear" in err
    assert "weights_only" not in err and "\n" not in err.rstrip("\n")


def test_unknown_model_keyword(tiny_fp_run, out_dir, capsys):
    err = _train_fails([*tiny_fp_run.argv, "--set", "model.kwargs.chanels=8"], out_dir, capsys)
    assert "model.kwargs.chanels: small_cnn takes no option 'chanels'; its options: channels. Did you mean" in err
    err = _train_fails([*tiny_fp_run.argv, "--set", "model.kwargs.num_classes=3"], out_dir, capsys)
    assert "model.kwargs.num_classes: set from the dataset" in err
    from mixbits.errors import MixbitsError

    with pytest.raises(MixbitsError, match="small_cnn takes no option 'bogus'"):
        create("small_cnn", bogus=3)


def test_device_that_is_not_here(tiny_fp_run, tiny_q_run, out_dir, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    err = _train_fails([*tiny_fp_run.argv, "--device", "cuda"], out_dir, capsys)
    assert "device: 'cuda' asked for, but this torch sees no CUDA device; use cpu" in err
    err = cli_fails(["eval", str(tiny_q_run.dir), "--device", "cuda:1"], capsys)
    assert "--device: 'cuda:1' asked for" in err


# silent acceptance: inputs that used to be taken and give a wrong answer ----------------------------------------------
def _latency_table(path: Path, layers=SMALL_CNN_LAYERS, value=0.1, unit="ms") -> Path:
    keys = [f"w{w}a{a}" for w in range(2, 9) for a in range(2, 9)]
    path.write_text(json.dumps({"format": "mixbits.latency/1", "unit": unit,
                                "layers": {n: dict.fromkeys(keys, value) for n in layers}}))
    return path


def test_latency_table_that_cannot_be_right(tmp_path, capsys):
    cost = ["cost", "--model", "small_cnn", "--policy", "uniform:4", "--budget", "latency<=1ms", "--latency-table"]
    assert main([*cost, str(_latency_table(tmp_path / "ok.json"))]) == 0  # the table the others spoil
    table = _latency_table(tmp_path / "nan.json")
    table.write_text(table.read_text().replace("0.1", "NaN", 1))
    assert "values are finite non-negative numbers" in cli_fails([*cost, str(table)], capsys)
    table = _latency_table(tmp_path / "unit.json", unit="fortnights")
    assert "unit 'fortnights' is unknown; expected one of ns, us" in cli_fails([*cost, str(table)], capsys)
    table = _latency_table(tmp_path / "other.json", layers=(*SMALL_CNN_LAYERS, "layer4.1.conv2"))
    err = cli_fails([*cost, str(table)], capsys)
    assert "latency table has layers the model lacks: layer4.1.conv2; it was measured for another model" in err


def test_empty_budget_is_refused(capsys):
    err = cli_fails(["cost", "--model", "small_cnn", "--budget", ""], capsys)
    assert "budget '' is not understood: it is empty" in err


@pytest.fixture
def image_root(tmp_path) -> Path:
    """An image folder with classes a, b, c of two images each in train/ and test/."""
    image = pytest.importorskip("PIL.Image")
    for split in ("train", "test"):
        for cls in "abc":
            (tmp_path / "images" / split / cls).mkdir(parents=True)
            for i in range(2):
                image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "images" / split / cls / f"{i}.png")
    return tmp_path / "images"


@pytest.mark.parametrize("damage,why", [
    ("empty", "holds no images (.jpg"),  # in both splits: would train two classes out of three
    ("missing", "classes ['b'] of {root}/train have no folder in {root}/test"),
])
def test_imagefolder_with_a_class_empty_or_missing(damage, why, image_root, tmp_path, capsys):
    splits = ("train", "test") if damage == "empty" else ("test",)
    for split in splits:
        shutil.rmtree(image_root / split / "b")
        if damage == "empty":
            (image_root / split / "b").mkdir()
    argv = ["train", "--data", "imagefolder", "--data-dir", str(image_root), "--model", "small_cnn",
            "--set", "data.image_size=8", "--epochs", "1", "--out", str(tmp_path / "run")]
    err = cli_fails(argv, capsys)
    assert why.format(root=image_root) in err and not (tmp_path / "run").exists()


# messages: one bad value blamed once ----------------------------------------------------------------------------------
def test_bad_epochs_or_lr_is_not_blamed_on_the_settings_it_bounds(tiny_fp_run, out_dir, capsys):
    err = _train_fails([*tiny_fp_run.argv, "--epochs", "-1", "--set", "train.warmup_epochs=1"], out_dir, capsys)
    assert "train.epochs: must be a whole number >= 1, got -1" in err and "warmup_epochs" not in err
    err = _train_fails([*tiny_fp_run.argv, "--lr", "-0.1", "--set", "train.min_lr=0.01"], out_dir, capsys)
    assert "train.lr: must be a number > 0, got -0.1" in err and "min_lr" not in err


# divergence: a loss that explodes stops the run as a non-finite one does ----------------------------------------------
def _separable(n: int = 256):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    return model, x, (x[:, 0] > 0).long()


def test_divergence_stops_the_run_with_step_and_checkpoint(tmp_path):
    from conftest import ToyLoader

    from mixbits.errors import TrainingDiverged
    from mixbits.train import StepOutput, TrainConfig, fit, load_checkpoint, supervised_objective

    model, x, y = _separable()
    with pytest.raises(TrainingDiverged, match="training diverged: loss .* is above 1e\\+03") as err:
        fit(model, ToyLoader(x, y), TrainConfig(epochs=2, lr=1e12))  # finite, but ~1e22 from the second step
    assert "step 2 " in str(err.value) and "none yet" in str(err.value)

    def blows_up(state, xb, yb):  # an ordinary run until step 12, then a loss 10^4 times larger
        out = supervised_objective(state, xb, yb)
        return StepOutput(out.loss * 1e4, out.logits) if state.step == 11 else out

    model, x, y = _separable()
    with pytest.raises(TrainingDiverged, match="training diverged") as err:
        fit(model, ToyLoader(x, y), TrainConfig(epochs=3, lr=0.05), objective=blows_up, run_dir=tmp_path)
    assert "epoch 2/3, step 12" in str(err.value) and str(tmp_path / "checkpoint.pt") in str(err.value)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["loss_guard"]["early_steps"] == 8  # epoch 1's 8 steps


def test_divergence_guard_ignores_ordinary_training():
    from mixbits.train.guard import EARLY_STEPS, LossGuard

    guard = LossGuard()
    falling = [2.3 * 0.9**i for i in range(200)]  # a loss falling 10^9-fold, then noisy spikes of 100x
    assert all(guard.problem(v) is None for v in falling + [50.0, 0.01, 900.0])
    assert guard.early_steps == EARLY_STEPS
    assert guard.problem(1e4) is not None and guard.problem(float("nan")) == "training loss is nan"
