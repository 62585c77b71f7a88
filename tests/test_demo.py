"""The demo's stages: every uniform-like policy that fits its in-between budget, and one recipe for all policies."""

from __future__ import annotations

import argparse

import pytest

from mixbits.__main__ import build_parser, main
from mixbits.commands.demo import stage_configs, uniform_like


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["demo", *argv])


@pytest.mark.parametrize(("bits", "expected"), [
    (2.0, [(2, 2)]), (2.25, [(2, 2)]),  # w2a3 costs 6/4 of W2A2, more than 2.25² / 4
    (2.5, [(2, 3), (3, 2)]),  # 6 <= 6.25: both mixes fit and each beats W2A2 in one bit-width
    (3.0, [(2, 4), (3, 3), (4, 2)]),
    (4.0, [(2, 8), (3, 5), (4, 4), (5, 3), (8, 2)]),
])
def test_uniform_like_policies_are_those_that_fit_and_are_not_dominated(bits, expected):
    assert uniform_like(bits) == expected
    assert all(w * a <= bits * bits for w, a in expected)


def test_every_stage_shares_one_recipe_and_the_float_init(tmp_path):
    fp, references, mixed = stage_configs(_args("--bits", "2.5", "--seed", "2", "--out", str(tmp_path)))
    assert [r.quant.policy for r in references] == ["uniform:w2a3", "uniform:w3a2"]
    assert mixed.search.budget == "bitops<=uniform:2.5"
    assert all(r.init == mixed.init == fp.out for r in references)
    assert all(r.train == mixed.train for r in references)  # one recipe for every quantized policy
    assert mixed.search.finetune_epochs == mixed.train.epochs == 3
    assert mixed.train.kd_alpha > 0 and fp.train.kd_alpha == 0  # distilled from the float model
    assert fp.train.seed == mixed.train.seed == 2


def test_a_budget_outside_the_bit_range_is_refused(tmp_path, capsys):
    assert main(["demo", "--bits", "9", "--out", str(tmp_path)]) == 2
    assert "--bits 9 is outside 2..8" in capsys.readouterr().err


def test_the_default_budget_lies_between_w2a2_and_w3a3_where_only_w2a2_fits(tmp_path):
    _, references, mixed = stage_configs(_args("--out", str(tmp_path)))
    assert [r.quant.policy for r in references] == ["uniform:w2a2"]
    assert mixed.search.budget == "bitops<=uniform:2.25"
