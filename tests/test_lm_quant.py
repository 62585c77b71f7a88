"""Weight-only post-training quantization of a causal LM (mixbits.quantize_weights and mixbits.lm)."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import pytest
import torch

import mixbits
from mixbits.errors import MixbitsError
from mixbits.lm import allocate as allocate_module
from mixbits.lm import measure as measure_module
from mixbits.lm.bpw import layer_bits, model_bpw, parse_weight_budget
from mixbits.lm.corpus import fixed_windows, load_split, random_windows
from mixbits.lm.evaluate import next_token_loss, perplexity
from mixbits.lm.groupwise import GroupFormat, quantize
from mixbits.lm.tiny import TinyCausalLM, TinyLMConfig

CONFIG = TinyLMConfig(width=64, layers=2, heads=4, context=32)


@pytest.fixture(scope="module")
def trained() -> dict:
    """A tiny LM trained for a few seconds on the standard library's email package (bytes as tokens)."""
    train, held = load_split(Path(sysconfig.get_paths()["stdlib"]) / "email", held_out_percent=20)
    torch.manual_seed(0)
    model = TinyCausalLM(CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        loss = next_token_loss(model, random_windows(train, 16, CONFIG.context, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    calibration = [fixed_windows(train, 32, CONFIG.context)[:, :-1]]
    return {"model": model.eval(), "calibration": calibration, "held": fixed_windows(held, 64, CONFIG.context)}


def weight(seed: int = 0, shape=(64, 256)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# quantizers ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_round_trip_error_falls_with_bits(method):
    w = weight()
    errors = [relative(quantize(w, b, method=method).dequantize(), w) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01 and errors[0] > 0.2


def test_codes_scales_and_zeros_are_what_is_stored():
    w = weight(shape=(8, 100))  # 100 columns: a short last group
    q = quantize(w, 3, GroupFormat(group_size=64, integer_zero=True))
    assert q.codes.shape == (8, 2, 64) and int(q.codes.max()) <= 7
    assert q.scale.dtype == torch.float16 and torch.equal(q.zero, q.zero.round())
    assert q.dequantize().shape == (8, 100)


def test_hqq_beats_rtn_on_a_layer_output():
    w, x = weight(1), torch.randn(128, 256, generator=torch.Generator().manual_seed(2))
    for bits in (2, 3, 4):
        rtn, hqq = (relative(x @ quantize(w, bits, method=m).dequantize().T, x @ w.T) for m in ("rtn", "hqq"))
        assert hqq < rtn, (bits, hqq, rtn)


def test_gptq_beats_hqq_and_rtn_on_correlated_inputs():
    gen = torch.Generator().manual_seed(4)
    w = weight(5, shape=(48, 128))
    x = torch.randn(1024, 16, generator=gen) @ torch.randn(16, 128, generator=gen) + 0.1 * torch.randn(1024, 128,
                                                                                                      generator=gen)
    hessian = x.T.double() @ x.double() / len(x)
    for bits in (2, 3, 4):
        rtn, hqq, gptq = (relative(x @ quantize(w, bits, method=m, hessian=hessian).dequantize().T, x @ w.T)
                          for m in ("rtn", "hqq", "gptq"))
        assert gptq < 0.7 * min(rtn, hqq), (bits, gptq, hqq, rtn)
    assert torch.equal(quantize(w, 3, method="gptq").codes, quantize(w, 3, method="rtn").codes)  # no Hessian: RTN


# bits per weight ----------------------------------------------------------------------------------------------
def test_bpw_counts_scales_and_zeros_by_hand():
    # 8 x 128 at 4 bits, groups of 64: 4096 code bits + 16 groups x (16-bit scale + 16-bit zero) = 4608 bits
    assert layer_bits((8, 128), 4, GroupFormat(64)) == 4608
    assert model_bpw({"a": (8, 128)}, {"a": 4}, GroupFormat(64)) == 4.5
    # a 4-bit integer zero: 16 x (16 + 4) = 320 -> 4.3125; 100 columns still make 2 groups per row
    assert model_bpw({"a": (8, 128)}, {"a": 4}, GroupFormat(64, integer_zero=True)) == 4.3125
    assert layer_bits((8, 100), 2, GroupFormat(64)) == 8 * 100 * 2 + 16 * 32


def test_weight_budgets_parse():
    assert parse_weight_budget("bpw<=3.5").limit_bits({"a": (10, 10)}) == 350
    assert parse_weight_budget("size<=1KB").limit_bits({"a": (10, 10)}) == 8000
    for bad in ("bpw<=0.5", "bits<=3", "size<=uniform:3", 3.5):
        with pytest.raises(MixbitsError, match="budget"):
            parse_weight_budget(bad)


# allocation ---------------------------------------------------------------------------------------------------
def test_ilp_is_exact_and_greedy_and_random_fit():
    gen = torch.Generator().manual_seed(3)
    names = [f"l{i}" for i in range(5)]
    errors = {n: dict(zip((2, 3, 4), sorted(torch.rand(3, generator=gen).tolist(), reverse=True), strict=True))
              for n in names}
    costs = {n: {b: b * (i + 1) * 100 for b in (2, 3, 4)} for i, n in enumerate(names)}
    limit = 4200

    def total(bits):
        return sum(errors[n][bits[n]] for n in names)

    import itertools

    best = min(total(dict(zip(names, c, strict=True))) for c in itertools.product((2, 3, 4), repeat=5)
               if sum(costs[n][b] for n, b in zip(names, c, strict=True)) <= limit)
    chosen = {m: allocate_module.allocate(m, errors, costs, limit, {}) for m in ("ilp", "greedy", "uniform", "random")}
    for bits in chosen.values():
        assert sum(costs[n][bits[n]] for n in names) <= limit
    assert math.isclose(total(chosen["ilp"]), best) and total(chosen["greedy"]) >= best
    assert set(chosen["uniform"].values()) == {2}  # 3 bits on all would cost 4500


def test_mixed_allocation_beats_uniform_on_held_out_loss(trained):
    model, calibration, held = trained["model"], trained["calibration"], trained["held"]
    # hqq: on this 5-second model GPTQ's 2-bit error is within the held-out noise (the benchmark on the
    # trained tiny LM, benchmarks/results/lm-front.md, compares GPTQ allocations)
    uniform = mixbits.quantize_weights(model, calibration, "bpw<=3.0", "uniform", quantizer="hqq")
    searched = {m: mixbits.quantize_weights(model, calibration, "bpw<=3.0", m, quantizer="hqq")
                for m in ("ilp", "greedy")}
    assert uniform.bpw == 2.5  # 2-bit codes + 0.5 for scales and zeros: 3-bit (3.5) does not fit
    for result in searched.values():
        assert 2.5 < result.bpw <= 3.0
        assert perplexity(result.model, held) < perplexity(uniform.model, held)
    assert searched["ilp"].predicted_error <= searched["greedy"].predicted_error + 1e-12


def test_gptq_through_the_verb_meets_the_budget(trained):
    model, calibration, held = trained["model"], trained["calibration"], trained["held"]
    gptq = mixbits.quantize_weights(model, calibration, "bpw<=3.0", "greedy", quantizer="gptq", score="output")
    rtn = mixbits.quantize_weights(model, calibration, "bpw<=3.0", "greedy", quantizer="rtn", score="output")
    assert 2.5 < gptq.bpw <= 3.0 and sum(gptq.errors[n][2] < rtn.errors[n][2] for n in gptq.errors) >= 10
    assert math.isfinite(perplexity(gptq.model, held))


def test_overrides_by_name_and_regex(trained):
    model, calibration = trained["model"], trained["calibration"]
    overrides = {r"blocks\.\d+\.mlp\.down_proj": 8, "blocks.0.attn.v_proj": 4, "blocks.1.attn.q_proj": None}
    result = mixbits.quantize_weights(model, calibration, "bpw<=5.5", "ilp", overrides=overrides)
    assert result.bits["blocks.0.mlp.down_proj"] == result.bits["blocks.1.mlp.down_proj"] == 8
    assert result.bits["blocks.0.attn.v_proj"] == 4 and "blocks.1.attn.q_proj" not in result.bits
    kept = result.model.get_submodule("blocks.1.attn.q_proj").weight
    assert torch.equal(kept, model.get_submodule("blocks.1.attn.q_proj").weight)  # None: left in float
    with pytest.raises(MixbitsError, match="matches no quantized layer"):
        mixbits.quantize_weights(model, calibration, "bpw<=3.5", overrides={"blocks.0.attn.w_proj": 4})


def test_head_and_embeddings_are_options(trained):
    model, calibration = trained["model"], trained["calibration"]
    plain = mixbits.quantize_weights(model, calibration, "bpw<=4.5", "uniform")
    both = mixbits.quantize_weights(model, calibration, "bpw<=4.5", "uniform", head=True, embeddings=True)
    assert "lm_head" not in plain.bits and {"lm_head", "embed", "pos"} <= set(both.bits)


# reproducibility and reuse ------------------------------------------------------------------------------------
def test_same_arguments_give_the_same_model_bit_for_bit(trained):
    model, calibration = trained["model"], trained["calibration"]
    runs = [mixbits.quantize_weights(model, calibration, "bpw<=3.0", "ilp") for _ in range(2)]
    a, b = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    randoms = [mixbits.quantize_weights(model, calibration, "bpw<=3.0", "random", seed=s).bits for s in (0, 0, 1)]
    assert randoms[0] == randoms[1] != randoms[2]


def test_measurement_is_saved_and_reused(trained, tmp_path, monkeypatch):
    model, calibration = trained["model"], trained["calibration"]
    first = mixbits.quantize_weights(model, calibration, "bpw<=3.0", score="output", cache_dir=tmp_path)
    assert (tmp_path / f"{first.measurement_key}.json").exists()

    def refuse(*args):
        raise AssertionError("measured again although the saved measurement has the same key")

    monkeypatch.setattr(measure_module, "_output_errors", refuse)
    again = mixbits.quantize_weights(model, calibration, "bpw<=3.0", "greedy", score="output", cache_dir=tmp_path)
    assert again.measurement_key == first.measurement_key and again.errors == first.errors
    with pytest.raises(AssertionError, match="measured again"):  # other calibration data: another key
        mixbits.quantize_weights(model, [calibration[0][:8]], "bpw<=3.0", score="output", cache_dir=tmp_path)


# clear errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"method": "anneal"}, "method must be one of ilp, greedy, uniform, random"),
    ({"quantizer": "awq"}, "quantizer must be one of rtn, hqq, gptq"),
    ({"bits": (1, 4)}, "weight bits must be one of"),
    ({"group_size": 0}, "group_size must be"),
    ({"budget": "bpw<=2.0"}, "fewest bits allowed"),
    ({"batches": [torch.randn(2, 8)]}, "calibration batch 0 must be token ids"),
    ({"batches": []}, "batches is empty"),
])
def test_bad_input_is_named(trained, kwargs, match):
    args = {"batches": trained["calibration"], "budget": "bpw<=3.0", **kwargs}
    with pytest.raises(MixbitsError, match=match):
        mixbits.quantize_weights(trained["model"], args.pop("batches"), args.pop("budget"), **args)


def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Language models: bits per weight", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_lm_example"})
    bpw, down_bits = capsys.readouterr().out.split(" bits per weight ")
    assert float(bpw) <= 3.5 and down_bits.strip() == "4"
    assert len(list((tmp_path / "measurements").glob("*.json"))) == 1


def test_every_layer_pinned_needs_no_choice():
    costs = {"a": {2: 10, 4: 20}, "b": {2: 10, 4: 20}}
    for method in ("ilp", "greedy", "uniform", "random"):
        assert allocate_module.allocate(method, {}, costs, 40, {"a": 4, "b": 2}) == {"a": 4, "b": 2}


def test_the_classifier_workflow_does_not_load_the_language_model_code():
    import subprocess
    import sys

    probe = ("import sys, mixbits, mixbits.search; "
             "print(sorted(m for m in sys.modules if m.startswith('mixbits.lm') or m == 'mixbits.api.weights')); "
             "mixbits.quantize_weights; print('mixbits.lm.allocate' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True"  # loaded on first use of the verb, not before
