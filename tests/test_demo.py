"""The demo's stages: the uniform level that fits its in-between budget, and one recipe for both policies."""

from __future__ import annotations

import argparse

import pytest

from mixbits.__main__ import build_parser, main
from mixbits.commands.demo import stage_configs


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["demo", *argv])


@pytest.mark.parametrize(("bits", "uniform"), [("3.5", "uniform:3"), ("2.75", "uniform:2"), ("4", "uniform:4")])
def test_the_uniform_stage_is_the_highest_level_within_the_budget(bits, uniform, tmp_path):
    fp, qat, mixed = stage_configs(_args("--bits", bits, "--out", str(tmp_path)))
    assert qat.quant.policy == uniform and mixed.search.budget == f"bitops<=uniform:{float(bits):g}"
    assert qat.init == mixed.init == fp.out
    assert mixed.train == qat.train and mixed.search.finetune_epochs == qat.train.epochs  # one recipe


def test_a_budget_outside_the_bit_range_is_refused(tmp_path, capsys):
    assert main(["demo", "--bits", "9", "--out", str(tmp_path)]) == 2
    assert "--bits 9 is outside 2..8" in capsys.readouterr().err


def test_the_default_budget_lies_between_w2a2_and_w3a3(tmp_path):
    _, qat, mixed = stage_configs(_args("--out", str(tmp_path)))
    assert qat.quant.policy == "uniform:2" and mixed.search.budget == "bitops<=uniform:2.5"
