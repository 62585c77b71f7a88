"""The front benchmark's statistics: interpolation in log(BitOPs), paired gains, Student-t intervals."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path[:0] = [str(BENCHMARKS), str(BENCHMARKS / "experiments")]
from front_stats import add_gains, ci95, front_at, summarise  # noqa: E402


def test_front_interpolates_in_log_bitops_and_is_flat_outside_the_references():
    refs = {100.0: 80.0, 400.0: 90.0}
    assert front_at(refs, 200.0) == pytest.approx(85.0)  # halfway in log: sqrt(100 * 400) = 200
    assert front_at(refs, 50.0) == 80.0 and front_at(refs, 1000.0) == 90.0
    three = {100.0: 80.0, 200.0: 84.0, 400.0: 86.0}
    assert front_at(three, 300.0) == pytest.approx(84 + 2 * math.log(1.5) / math.log(2))


def test_ci95_is_student_t():
    assert ci95([1.0, 2.0, 3.0]) == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)
    assert math.isnan(ci95([1.0]))


def test_gains_are_paired_by_seed_and_summarised():
    rows = []
    for seed, shift in ((0, 0.0), (1, 2.0), (2, -1.0)):  # a seed-level offset every run of that seed shares
        rows += [{"model": "m", "method": "uniform-ref", "budget": "uniform:2", "seed": seed, "bitops": 100.0,
                  "test_top1": 80.0 + shift},
                 {"model": "m", "method": "uniform-ref", "budget": "uniform:4", "seed": seed, "bitops": 400.0,
                  "test_top1": 90.0 + shift},
                 {"model": "m", "method": "x", "budget": "bitops<=uniform:2.5", "seed": seed, "bitops": 200.0,
                  "test_top1": 86.0 + shift}]
    add_gains(rows)
    gains = [r["gain_vs_uniform_front"] for r in rows if r["method"] == "x"]
    assert gains == pytest.approx([1.0, 1.0, 1.0])
    summary = {(s["method"], s["budget"]): s for s in summarise(rows)}
    x = summary["x", "bitops<=uniform:2.5"]
    assert x["n"] == 3 and x["mean_gain"] == pytest.approx(1.0) and x["ci95"] == pytest.approx(0.0, abs=1e-12)
    assert x["top1_ci95"] > 1.0  # unpaired, the seed offsets would swamp the gain


def test_diverged_runs_are_counted_and_left_out_of_every_mean():
    rows = []
    for seed in (0, 1, 2):
        rows += [{"model": "m", "method": "uniform-ref", "budget": "uniform:2", "seed": seed, "bitops": 100.0,
                  "test_top1": None if seed == 0 else 80.0},  # W2A2 diverged at seed 0
                 {"model": "m", "method": "uniform-ref", "budget": "uniform:4", "seed": seed, "bitops": 400.0,
                  "test_top1": 90.0},
                 {"model": "m", "method": "x", "budget": "bitops<=uniform:2.5", "seed": seed, "bitops": 200.0,
                  "test_top1": None if seed == 2 else 86.0},
                 {"model": "m", "method": "y", "budget": "bitops<=uniform:2.5", "seed": seed, "bitops": None,
                  "test_top1": None}]  # a search that diverged: no policy, no cost
    add_gains(rows)
    x = [r["gain_vs_uniform_front"] for r in rows if r["method"] == "x"]
    assert x[0] == pytest.approx(-4.0)  # seed 0's front is W4A4 alone, its W2A2 having diverged
    assert x[1] == pytest.approx(1.0) and x[2] is None
    summary = {(s["method"], s["budget"]): s for s in summarise(rows)}
    ref2 = summary["uniform-ref", "uniform:2"]
    assert (ref2["n"], ref2["diverged"], ref2["test_top1"]) == (2, 1, 80.0)
    assert summary["x", "bitops<=uniform:2.5"]["n"] == 2 and summary["x", "bitops<=uniform:2.5"]["diverged"] == 1
    y = summary["y", "bitops<=uniform:2.5"]
    assert (y["n"], y["diverged"], y["test_top1"], y["bitops"], y["mean_gain"]) == (0, 3, None, None, None)


def test_the_row_cache_reruns_or_marks_rows_from_other_code(tmp_path):
    from front import RowCache

    old = RowCache(tmp_path, "code-a")
    old.put({"method": "hawq", "budget": "bitops<=uniform:2.5", "seed": 0, "test_top1": 80.0})
    assert RowCache(tmp_path, "code-a").get("hawq", "bitops<=uniform:2.5", 0)["test_top1"] == 80.0
    fresh = RowCache(tmp_path, "code-b")
    assert fresh.stale == 1 and fresh.get("hawq", "bitops<=uniform:2.5", 0) is None
    kept = RowCache(tmp_path, "code-b", keep_stale=True)
    assert kept.get("hawq", "bitops<=uniform:2.5", 0)["stale"] is True
    fresh.put({"method": "hawq", "budget": "bitops<=uniform:2.5", "seed": 0, "test_top1": 81.0})
    again = RowCache(tmp_path, "code-b")
    assert again.stale == 0 and again.get("hawq", "bitops<=uniform:2.5", 0)["test_top1"] == 81.0


def test_an_ablation_variant_whose_search_diverges_is_recorded_and_the_others_still_run(tmp_path):
    from ablation import searched_variants
    from front import Bench, RowCache

    from mixbits.errors import TrainingDiverged

    class FakeBench:  # Bench's bookkeeping, with searches that diverge for one variant and fine-tunes that cost nothing
        record_diverged_search = Bench.record_diverged_search

        def __init__(self):
            self.cache, self.searched = RowCache(tmp_path, "code"), []

        def budgets(self):
            return ["bitops<=uniform:2.5", "bitops<=uniform:3.5"]

        def search(self, method, budgets, seed, options):
            self.searched.append(options)
            if options.get("weights") == "separate":
                raise TrainingDiverged("loss is nan at step 3")
            return type("Result", (), {"policies": ["p25", "p35"], "space": None})(), {"search_seconds": 1.0}

        def loaders(self, seed):
            return [None]

        def finetuned(self, policy, space, seed, name):
            return f"model of {policy}", {"finetune_seconds": 2.0}

        def row(self, method, budget, seed, model, policy, seconds):
            return {"method": method, "budget": budget, "seed": seed, "test_top1": None if model is None else 80.0,
                    **seconds}

        def record(self, row):
            self.cache.put(row)

    bench = FakeBench()
    searched_variants(bench, "dnas", seed=0)
    assert bench.searched == [{}, {"weights": "separate"}]  # the diverged variant did not stop the run
    for budget in bench.budgets():
        assert bench.cache.get("dnas[shared]", budget, 0)["test_top1"] == 80.0
        separate = bench.cache.get("dnas[separate]", budget, 0)
        assert separate["test_top1"] is None and "nan" in separate["diverged"]
    searched_variants(bench, "dnas", seed=0)  # every row is cached, diverged ones included: nothing re-runs
    assert len(bench.searched) == 2


def test_two_runs_are_compared_paired_by_seed_only_where_both_finished():
    from compare_runs import compare

    def run(top1s, passes):
        rows = []
        for seed, top1 in enumerate(top1s):
            common = {"model": "x", "seed": seed}
            rows += [{**common, "method": "uniform-ref", "budget": "uniform:2", "bitops": 100.0, "test_top1": 80.0},
                     {**common, "method": "uniform-ref", "budget": "uniform:4", "bitops": 400.0, "test_top1": 90.0},
                     {**common, "method": "m", "budget": "bitops<=uniform:2.5", "bitops": 200.0, "test_top1": top1,
                      "search_seconds": 10.0, "search_passes": passes}]
        return add_gains(rows)

    (line,) = compare(run([84.0, 85.0, 86.0], 1000), run([85.0, 87.0, None], 400), ["m"])
    assert line["n"] == 2  # seed 2 did not finish in the second run: left out of both means
    assert line["top1_a"] == pytest.approx(84.5) and line["diff_b_minus_a"] == pytest.approx(1.5)
    assert line["gain_b"] == pytest.approx(1.0) and line["search_passes_b"] == 400


def test_pooled_comparison_averages_budgets_within_a_seed_before_the_interval():
    from compare_runs import pooled

    def run(table):  # table: {seed: {budget: top1}}
        return [{"method": "m", "budget": b, "seed": s, "test_top1": t}
                for s, by_budget in table.items() for b, t in by_budget.items()]

    a = run({0: {"x": 80.0, "y": 70.0}, 1: {"x": 81.0, "y": 71.0}, 2: {"x": 82.0, "y": 72.0}})
    b = run({0: {"x": 81.0, "y": 72.0}, 1: {"x": 81.0, "y": 73.0}, 2: {"x": 83.0, "y": None}})
    (line,) = pooled(a, b, ["m"])
    # budget y did not finish for seed 2 in b: only x is pooled, so every seed's mean is over the same budgets
    assert line["budgets"] == 1 and line["n"] == 3
    assert line["per_seed_diff"] == [1.0, 0.0, 1.0]
    assert line["diff_b_minus_a"] == pytest.approx(2 / 3) and line["ci95"] > 0
    assert pooled(a, b, ["other"]) == []


def test_a_fine_tune_resumes_only_into_the_run_of_the_same_policy_and_settings(tmp_path):
    from front import finetune_dir

    from mixbits import Policy

    p3, p4 = Policy({"a": (3, 3), "b": (4, 4)}), Policy({"a": (4, 4), "b": (4, 4)})
    same = finetune_dir(tmp_path, "oneshot-b0-s0", p3, {"kd_alpha": 0.5})
    assert same == finetune_dir(tmp_path, "oneshot-b0-s0", Policy({"a": (3, 3), "b": (4, 4)}), {"kd_alpha": 0.5})
    assert same.name.startswith("oneshot-b0-s0-") and same.parent == tmp_path
    assert same != finetune_dir(tmp_path, "oneshot-b0-s0", p4, {"kd_alpha": 0.5})  # another budget's policy
    assert same != finetune_dir(tmp_path, "oneshot-b0-s0", p3, {"kd_alpha": 0.0})
    assert finetune_dir(tmp_path, "ref", "uniform:2", {}) != finetune_dir(tmp_path, "ref", "uniform:3", {})


def test_policy_layers_groups_bits_by_kind_of_layer():
    from policy_layers import layer_kind, summarise

    assert layer_kind(torch.nn.Conv2d(8, 8, 3, groups=8)) == "depthwise"
    assert layer_kind(torch.nn.Conv2d(8, 16, 1)) == "pointwise"
    assert layer_kind(torch.nn.Conv2d(8, 16, 3)) == "conv"
    assert layer_kind(torch.nn.Conv2d(8, 16, 3, groups=2)) == "conv"  # grouped, not depthwise
    assert layer_kind(torch.nn.Linear(8, 2)) == "linear"

    kinds, macs = {"dw": "depthwise", "pw": "pointwise"}, {"dw": 10, "pw": 90}
    rows = [{"method": "m", "budget": "b", "seed": s, "test_top1": 70.0 + s,
             "policy": {"dw": {"w": 2, "a": 4}, "pw": {"w": w, "a": 3}}} for s, w in ((0, 4), (1, 6))]
    rows.append({"method": "m", "budget": "b", "seed": 2, "test_top1": None, "policy": None})  # diverged: left out
    dw, pw = summarise(rows, kinds, macs)
    assert (dw["kind"], dw["macs_share"], dw["mean_w"], dw["mean_a"], dw["w2_share"]) == ("depthwise", 0.1, 2, 4, 1.0)
    assert (pw["mean_w"], pw["w2_share"], pw["top1"], pw["n"]) == (5, 0.0, 70.5, 2)
    # the kind's share of each policy's BitOPs (MACs·w·a) and weight bits (params·w), averaged over the seeds
    dw, pw = summarise(rows, kinds, macs, params={"dw": 30, "pw": 70})
    seed0 = 10 * 2 * 4 / (10 * 2 * 4 + 90 * 4 * 3)  # 80 / 1160
    seed1 = 10 * 2 * 4 / (10 * 2 * 4 + 90 * 6 * 3)  # 80 / 1700
    assert dw["bitops_share"] == pytest.approx((seed0 + seed1) / 2)
    assert dw["size_share"] == pytest.approx((60 / (60 + 280) + 60 / (60 + 420)) / 2)
    assert pw["bitops_share"] == pytest.approx(1 - dw["bitops_share"])


def test_method_cost_counts_one_search_per_seed_as_multiples_of_one_qat_run():
    from front import preset_for
    from method_cost import method_costs

    preset = preset_for("medium", "resnet20")
    qat_seconds = 20.0 * preset["search_epochs"] / preset["finetune_epochs"]  # a reference fine-tune takes 20 s
    rows = []
    for seed in (0, 1):
        common = {"model": "resnet20", "preset": "medium", "seed": seed}
        rows += [{**common, "method": "uniform-ref", "budget": f"uniform:{b}", "bitops": c, "test_top1": t,
                  "finetune_seconds": 20.0, "finetune_passes": 1000}
                 for b, c, t in ((2, 100.0, 80.0), (4, 400.0, 90.0))]
        rows += [{**common, "method": "m", "budget": b, "bitops": 200.0, "test_top1": 86.0 + seed + g,
                  "search_seconds": 30.0 * (seed + 1), "search_passes": 500, "finetune_seconds": 20.0}
                 for b, g in (("bitops<=uniform:2.5", 0.0), ("bitops<=uniform:3.5", 2.0), ("bitops<=uniform:3", 9.0))]
    (line,) = method_costs(add_gains(rows))
    # one QAT run of the search's epochs: that share of a reference fine-tune's seconds and samples
    assert line["search_seconds"] == 45.0 and line["search_x_qat"] == pytest.approx(45.0 / qat_seconds)
    assert line["search_passes_x_qat"] == pytest.approx(500 / (1000 * qat_seconds / 20.0))
    assert line["total_x_qat"] == pytest.approx((45.0 + 60.0) / qat_seconds)  # the search and three fine-tunes a seed
    # uniform:3 is a uniform level, not between them: pooled over 2.5 and 3.5 only (front at 200 BitOPs: 85)
    assert line["pooled_gain"] == pytest.approx(2.5) and line["seeds"] == 2 and line["gain_ci95"] > 0


def _row(method, budget, seed, bitops, top1):
    return {"model": "m", "method": method, "budget": budget, "seed": seed, "bitops": bitops, "test_top1": top1}


def test_gain_over_the_best_reference_costing_no_more_and_paired_baselines():
    from front_stats import add_paired_gains, add_reference_gains, pooled

    rows = []
    for seed, shift in ((0, 0.0), (1, 1.0)):
        rows += [_row("uniform-ref", "uniform:2", seed, 100.0, 80.0 + shift),
                 _row("mix-ref", "uniform:w2a3", seed, 150.0, 84.0 + shift),  # above the chord
                 _row("uniform-ref", "uniform:3", seed, 225.0, 86.0 + shift),
                 _row("x", "bitops<=uniform:2.5", seed, 160.0, 85.0 + shift),
                 _row("x", "bitops<=uniform:2.25", seed, 120.0, 82.0 + shift),
                 _row("random", "bitops<=uniform:2.5", seed, 155.0, 83.0),
                 _row("hawq", "bitops<=uniform:2.5", seed, 150.0, 84.5 + shift)]
    add_paired_gains(add_reference_gains(add_gains(rows)))
    x25 = [r for r in rows if r["method"] == "x" and r["budget"] == "bitops<=uniform:2.5"]
    # w2a3 (150 <= 160) is the best reference costing no more; W3A3 (225) is dearer and does not count
    assert [r["gain_vs_best_reference"] for r in x25] == pytest.approx([1.0, 1.0])
    assert x25[0]["best_reference"] == "mix-ref uniform:w2a3"
    assert x25[0]["gain_vs_uniform_front"] > x25[0]["gain_vs_best_reference"]  # the chord is the lower bar
    assert [r["gain_vs_random"] for r in x25] == pytest.approx([2.0, 3.0])
    assert [r["gain_vs_hawq"] for r in x25] == pytest.approx([0.5, 0.5])
    x225 = [r for r in rows if r["budget"] == "bitops<=uniform:2.25" and r["method"] == "x"]
    assert [r["gain_vs_best_reference"] for r in x225] == pytest.approx([2.0, 2.0])  # only W2A2 is that cheap
    assert x225[0]["gain_vs_random"] is None  # no random row at that budget
    assert "gain_vs_best_reference" not in rows[1]  # references get no gain over themselves

    (line,) = [p for p in pooled(rows, ["bitops<=uniform:2.5", "bitops<=uniform:2.25"]) if p["method"] == "x"]
    assert line["gain_vs_best_reference"] == pytest.approx(1.5)  # per seed (1 + 2) / 2, the same both seeds
    assert line["gain_vs_best_reference_n"] == 2 and line["gain_vs_best_reference_ci95"] == pytest.approx(0.0)
    assert line["gain_vs_random"] == pytest.approx(2.5) and line["gain_vs_random_n"] == 2


def test_the_deployment_rule_holds_depthwise_layers_at_8_bits_and_fits_the_rest():
    from front_references import is_depthwise, rule_policy

    from mixbits import SearchSpace
    from mixbits.budget import parse_budget
    from mixbits.cost import profile

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, groups=8),
                                torch.nn.Conv2d(8, 16, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3),
                                torch.nn.Flatten(), torch.nn.LazyLinear(3))
    model(torch.zeros(1, 1, 16, 16))
    stats, space = profile(model, (1, 16, 16)), SearchSpace.from_model(model)
    assert [n for n in space.searchable if is_depthwise(stats, n)] == ["2"]
    policy = rule_policy(stats, space, "bitops<=uniform:4")
    assert policy["2"] == (8, 8) and policy["0"] == policy["7"] == (8, 8)  # depthwise, first and last
    rest = {policy["3"], policy["5"]}
    assert len(rest) == 1 and parse_budget("bitops<=uniform:4").satisfied(stats, policy, space)
    bits = rest.pop()[0]
    higher = rule_policy(stats, space, "bitops<=uniform:6")
    assert higher["3"][0] > bits  # more budget, more bits for the rest
    assert rule_policy(stats, space, "bitops<=uniform:2") is None  # 8-bit depthwise leaves no room at W2A2's cost


def test_the_code_version_covers_the_library_the_front_loaded_and_a_late_module_is_refused(tmp_path, monkeypatch):
    import front
    from front import CodeVersion, RowCache

    loaded = front._library_files()
    assert any(p.name == "dnas.py" for p in loaded) and any(p.name == "loop.py" for p in loaded)
    version = CodeVersion()
    assert version.of("hawq") == CodeVersion().of("hawq")
    cache = RowCache(tmp_path, version)
    late = Path(front.ROOT) / "src" / "mixbits" / "late_module.py"  # a module imported after the rows were keyed
    monkeypatch.setattr(front, "_library_files", lambda: [*loaded, late])
    with pytest.raises(RuntimeError, match="late_module.py"):
        cache.put({"method": "hawq", "budget": "bitops<=uniform:2.5", "seed": 0, "test_top1": 80.0})
    assert not (tmp_path / "rows.jsonl").exists()


def test_a_change_to_one_method_s_own_source_stales_its_rows_alone(tmp_path, monkeypatch):
    import front
    from front import CodeVersion, RowCache

    before = CodeVersion()
    cache = RowCache(tmp_path, before)
    for method in ("dnas", "hawq", "oneshot-free", "uniform-ref"):
        cache.put({"method": method, "budget": "bitops<=uniform:2.5", "seed": 0, "test_top1": 80.0})
    real = Path.read_bytes

    def edited(path):  # DNAS's own source as if it were changed
        return real(path) + (b"# edited" if path.name == "dnas.py" else b"")

    monkeypatch.setattr(Path, "read_bytes", edited)
    after = RowCache(tmp_path, CodeVersion())
    assert after.stale == 1 and after.get("dnas", "bitops<=uniform:2.5", 0) is None
    assert after.get("hawq", "bitops<=uniform:2.5", 0) and after.get("oneshot-free", "bitops<=uniform:2.5", 0)

    def shared_edit(path):  # the quantizer, which every row runs
        return real(path) + (b"# edited" if path.name == "lsq.py" or path.name == "quantizer.py" else b"")

    monkeypatch.setattr(Path, "read_bytes", shared_edit)
    assert RowCache(tmp_path, CodeVersion()).stale == 4
    assert front.method_of("sdq-stage2") == "sdq" and front.method_of("rule-ref") == "rule-ref"


def _imported_modules(path: Path, package_root: Path) -> set[str]:
    """Absolute names of the modules a source file imports (``from .x import y`` gives ``...x`` and ``...x.y``)."""
    import ast

    parts = path.relative_to(package_root.parent).with_suffix("").parts
    package = parts[:-1]  # a module's package, or the package an __init__ file is
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
    return names


def test_a_method_s_own_sources_are_imported_by_no_other_module():
    from front import METHOD_SOURCES

    src = Path(__file__).resolve().parents[1] / "src" / "mixbits"

    def module_name(path: Path) -> str:
        parts = path.relative_to(src.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    registry = src / "search" / "__init__.py"  # imports every method to register it
    for method, own in METHOD_SOURCES.items():
        owned = [p for o in own for p in ((src / o).rglob("*.py") if o.endswith("/") else [src / o])]
        assert owned and all(p.is_file() for p in owned), method
        owned_names = {module_name(p) for p in owned}
        for path in src.rglob("*.py"):
            if path in owned or path == registry:
                continue
            assert not _imported_modules(path, src) & owned_names, f"{path} imports {method}'s own sources"
    searcher = src / "search" / "oneshot" / "searcher.py"  # the check sees a relative import of a method's module
    assert "mixbits.search.greedy" in _imported_modules(searcher, src)


def test_the_recipe_sizing_pairs_each_fine_tuned_one_shot_policy_with_its_retraining_free_score(tmp_path, monkeypatch):
    import recipe

    monkeypatch.setattr(recipe, "STATE", tmp_path)
    rows = recipe.Rows("m")
    for seed, free in ((0, 80.0), (1, 82.0)):
        rows.put({"key": f"oneshot-free|b|{seed}", "recipe": "oneshot-free", "policy": "b", "seed": seed,
                  "test_top1": free})
        rows.put({"key": f"oneshot-e6-fitted-kd|b|{seed}", "recipe": "oneshot-e6-fitted-kd", "policy": "b",
                  "seed": seed, "test_top1": free + 0.5 - seed})
        rows.put({"key": f"e6-fitted-kd|uniform:2|{seed}", "recipe": "e6-fitted-kd", "policy": "uniform:2",
                  "seed": seed, "test_top1": 70.0 + seed, "finetune_seconds": 1.0})
    gaps = recipe.oneshot_gaps(recipe.Rows("m"))  # read back from the state file
    assert [(g["recipe"], g["n"]) for g in gaps] == [("e6-fitted-kd", 2)]
    assert gaps[0]["mean_gap"] == pytest.approx(0.0) and gaps[0]["min_gap"] == pytest.approx(-0.5)
    assert [(s["recipe"], s["policy"], s["n"]) for s in recipe.summary(rows)] == [("e6-fitted-kd", "uniform:2", 2)]
