"""Run configuration: shipped YAML recipes, key=value overrides, whole-config validation, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mixbits.__main__ import build_parser
from mixbits.commands.common import config_from_args
from mixbits.config import RunConfig, load_config, shipped_configs
from mixbits.errors import MixbitsError

SHIPPED = shipped_configs()


def _assert_matches_yaml(cfg: RunConfig, data: dict) -> None:
    """Every value written in the YAML is the value the config holds (sections one level deep)."""
    for key, value in data.items():
        if isinstance(value, dict) and key != "kwargs":
            section = getattr(cfg, key)
            for sub, sub_value in value.items():
                assert getattr(section, sub) == sub_value, f"{key}.{sub}"
        else:
            assert getattr(cfg, key) == value, key


@pytest.fixture
def recipe_dir(tmp_path, monkeypatch):
    """Run from an empty directory holding the runs the recipes start from (their ``init``)."""
    monkeypatch.chdir(tmp_path)
    for path in SHIPPED.values():
        init = (yaml.safe_load(path.read_text()) or {}).get("init")
        if init:
            (tmp_path / init).mkdir(parents=True, exist_ok=True)
    return tmp_path


def test_configs_are_shipped():
    root = Path(__import__("mixbits").__file__).parent / "configs"
    assert SHIPPED and set(SHIPPED) == {p.stem for p in root.glob("*.yaml")}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_loads_validates_and_binds_to_train(name, recipe_dir):
    path = SHIPPED[name]
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and data
    cfg = load_config(path)
    assert cfg.problems() == []
    _assert_matches_yaml(cfg, data)

    args = build_parser().parse_args(["train", "--config", name])
    bound = config_from_args(args)
    assert bound == cfg
    _assert_matches_yaml(bound, data)

    # a flag overrides the recipe and leaves the rest of it alone
    flagged = config_from_args(build_parser().parse_args(["train", "--config", name, "--lr", "0.0123"]))
    assert flagged.train.lr == 0.0123
    assert flagged.model == cfg.model and flagged.data == cfg.data and flagged.out == cfg.out


def test_overrides_set_typed_values():
    cfg = load_config(None, ["train.lr=0.05", "quant.w_bits=[2,4]", "model.kwargs.width=0.5"])
    assert cfg.train.lr == 0.05 and type(cfg.train.lr) is float
    assert cfg.quant.w_bits == [2, 4] and all(type(b) is int for b in cfg.quant.w_bits)
    assert cfg.model.kwargs == {"width": 0.5} and type(cfg.model.kwargs["width"]) is float
    defaults = RunConfig()
    assert cfg.quant.a_bits == defaults.quant.a_bits and cfg.train.epochs == defaults.train.epochs


def test_one_error_lists_every_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optimiser:\n  name: adam\n"
                    "train:\n  epoch: 3\n  lr: -1\n"
                    "data:\n  batch_size: 0\n")
    with pytest.raises(MixbitsError) as info:
        load_config(path)
    msg = str(info.value)
    assert "optimiser: unknown setting" in msg
    assert "train.epoch: unknown setting" in msg and "Did you mean 'epochs'?" in msg
    assert "train.lr: must be a number > 0, got -1" in msg
    assert "data.batch_size: must be an integer > 0, got 0" in msg


@pytest.mark.parametrize("override", ["train.lr", "=3"])
def test_bad_override_syntax(override):
    with pytest.raises(MixbitsError, match="key=value"):
        load_config(None, [override])


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(MixbitsError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- train\n- lr\n")
    with pytest.raises(MixbitsError, match="must hold a mapping.*got list"):
        load_config(listed)


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(None, ["train.lr=0.05", "quant.w_bits=[2,4]", "model.name=small_cnn",
                             "model.kwargs.channels=8", "data.max_train_samples=100", "quant.policy=uniform:w4a8",
                             f"out={tmp_path / 'run'}"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
