"""Does mixed precision beat uniform quantization at equal cost? The accuracy-vs-BitOPs front, per model.

    python benchmarks/front.py --model resnet20 --preset quick        # a smoke run: minutes on 2 CPU cores
    python benchmarks/front.py --model mobilenetv2 --preset medium    # the figures: hours, resumable
    python benchmarks/front.py --model resnet20 --preset full --device cuda

One float model per (model, preset) is trained once. Then, for every seed: the uniform references
(W2A2, W3A3, W4A4) are fine-tuned from it, and every search method finds one policy per budget (most
budgets lie strictly between the uniform levels) with :func:`mixbits.search`, each policy fine-tuned
with the references' one recipe (:func:`mixbits.finetune`: same epochs, optimiser, schedule, no
distillation). Extra rows, labelled: one-shot retraining-free (the supernet's own weights) and fine-tuned
with the recipe from the supernet's weights instead of the float model's (oneshot-kept), random search on
the one-shot supernet with the walks' scorer and compute, retraining-free (oneshot-random: its search
compute is the one-shot search's, whose own figures leave the baseline's scoring out), and SDQ with its
own stage 2 (distillation and bin regularisation). The same seed gives every method the same
data order. Each row records test top-1, BitOPs, size, the policy, and the compute of its search and
fine-tune in seconds and in forward passes of the whole network (samples).

Every finished row is kept in benchmarks/front-state/<model>-<preset>/rows.jsonl, which is committed,
with the version of the code that made it (per method, ``CodeVersion``: the library modules the front loads,
of the searches' own sources only that method's, and the row-making files of this benchmark), so a preset can be
completed over several sittings and machines: rerun the same command at the commit named in the
results' meta (``git worktree add ../bench <commit>``, then ``--state-dir`` pointing at this checkout's
front-state). A row from other code is re-run, never mixed in (``--keep-stale`` keeps it, marked). The
float model is trained once per (model, preset), kept beside the rows (float.pt) and shared by every
code version; interrupted fine-tunes resume from checkpoints in benchmarks/cache/, and every search's
trace is kept there too (front/<model>-<preset>/search/<code>/<method>-s<seed>.json). Writes
benchmarks/results/front-<model>-<preset>.json (meta, rows, summary), .md and .png; statistics in
front_stats.py.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's library, whatever is installed
from common import RESULTS, markdown_table, metadata  # noqa: E402
from front_plot import plot_front  # noqa: E402
from front_references import MIX_REFERENCES, UNIFORM_REFERENCES, is_depthwise, rule_policy  # noqa: E402
from front_stats import (  # noqa: E402
    GAINS,
    REFERENCE_METHODS,
    add_gains,
    add_paired_gains,
    add_reference_gains,
    pooled,
    summarise,
)

import mixbits  # noqa: E402
from mixbits.cost import bitops, profile, size_bytes  # noqa: E402
from mixbits.data import DataConfig, build_loaders  # noqa: E402
from mixbits.errors import TrainingDiverged  # noqa: E402
from mixbits.models import create  # noqa: E402
from mixbits.quant import quant_layers, set_fused  # noqa: E402
from mixbits.train import TrainConfig, evaluate, fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STATE = Path(__file__).parent / "front-state"  # committed: finished rows and the float weights
CACHE = Path(__file__).parent / "cache" / "front"  # not committed: checkpoints of unfinished fine-tunes
REFERENCE = "uniform-ref"
BETWEEN = ("uniform:2.25", "uniform:2.5", "uniform:2.75", "uniform:w3a2", "uniform:3.5")  # between the uniform levels
LEVELS = ("uniform:3", "uniform:4")  # at them: where a search must at least match the uniform policy
BUDGETS = BETWEEN + LEVELS
# MobileNetV2 at its standard strides: at 28 px the small-input variant's full-resolution stages make a
# quantized step cost 4x ResNet-20's on CPU; at standard strides width 1.0 costs about 1.2x.
MODELS = {"resnet20": {}, "mobilenetv2": {}}
# The float model's peak learning rate (SGD, cosine after one warm-up epoch): MobileNetV2 from scratch
# diverged at 0.1 (20 epochs: training top-1 fell from 56 % to 32 % in the third epoch).
FLOAT_LR = {"resnet20": 0.1, "mobilenetv2": 0.05}
# quick: a smoke test of the whole protocol. medium: the full-width models on 8,000 training images, many hours of
# 2 CPU cores per model, completed over several sittings from the cached rows
# (MobileNetV2 from scratch needs more float epochs than ResNet-20: 8 left it at 77 % validation top-1).
# full: the whole data set, for a GPU. A value may be one per model ({model: value}).
# medium's finetune_epochs, from benchmarks/experiments/recipe.py (experiments/results/recipe-<model>.md): on
# ResNet-20, 6 epochs from fitted steps with distillation put the uniform references' spread over seeds at 0.1-0.25
# pt (2 epochs from LSQ's steps, the fronts' recipe before: up to 1.8 pt). MobileNetV2's sizing is still running;
# until it is measured it takes the same 6.
PRESETS = {
    "quick": {"width": {"resnet20": 0.25, "mobilenetv2": 0.25}, "train_samples": 2000, "test_samples": 2000,
              "fp_epochs": 3, "finetune_epochs": 1, "search_epochs": 1, "seeds": (0, 1),
              "budgets": ("uniform:2.5", "uniform:w3a2", "uniform:3.5", "uniform:3")},
    "medium": {"width": {"resnet20": 1.0, "mobilenetv2": 1.0}, "train_samples": 8000, "test_samples": None,
               "fp_epochs": {"resnet20": 8, "mobilenetv2": 20}, "finetune_epochs": {"resnet20": 6, "mobilenetv2": 6},
               "search_epochs": 1,
               "seeds": (0, 1, 2), "budgets": BUDGETS},
    "full": {"width": {"resnet20": 1.0, "mobilenetv2": 1.0}, "train_samples": None, "test_samples": None,
             "fp_epochs": 30, "finetune_epochs": 15, "search_epochs": 5, "seeds": (0, 1, 2), "budgets": BUDGETS},
}
def preset_for(preset: str, model: str) -> dict:
    """A preset's settings for one model (a per-model value resolved)."""
    return {k: v[model] if isinstance(v, dict) else v for k, v in PRESETS[preset].items()}


# The recipe of every fine-tune, references included: SGD at mixbits.FINETUNE_LR, cosine, from fitted steps
# (mixbits.finetune's default init, where every search starts too), distilled from the float model (kd_alpha 0.5,
# the float model as teacher), for the preset's finetune_epochs (sized in benchmarks/experiments/recipe.py).
RECIPE = {"weight_decay": 1e-4, "kd_alpha": 0.5}
# Per model, the same for every method. MobileNetV2 with 2-bit activations starts its fine-tune with a gradient
# norm of about 5e3 (37 at W3A3) and uniform W2A2 reached a NaN loss at step 6; clipping the gradient norm at
# 1.0 keeps it finite (and gave W3A3 after one epoch 71.7 % against 68.3 % unclipped).
MODEL_RECIPE = {"resnet20": {}, "mobilenetv2": {"grad_clip": 1.0}}
# Each method's options at a preset: the training searches train `search_epochs` per budget.
TRAINING_SEARCHES = ("dnas", "ssps", "dmpq", "sdq", "oneshot")
DEFAULT_METHODS = ("hawq", "random", "dnas", "ssps", "dmpq", "sdq", "oneshot")
# Extra, labelled rows beside a method's own: one-shot retraining-free and fine-tuned from its supernet's weights
# (keep_weights) instead of the float model's, and random search on its supernet with the walks' scorer and
# compute (random_baseline, retraining-free); SDQ with its own stage 2.
EXTRA_ROWS = {"oneshot": ("oneshot-free", "oneshot-kept", "oneshot-random"), "sdq": ("sdq-stage2",)}
RANDOM_BASELINE = {"oneshot"}  # searched with random_baseline: true, for its "-random" row
KEEPS_WEIGHTS = {"oneshot"}  # searched with keep_weights: true, for its "-kept" row


def labels_of(method: str) -> list[str]:
    return [method, *EXTRA_ROWS.get(method, ())]


def _library_files() -> list[Path]:
    """The source files of the mixbits modules this process has loaded."""
    return sorted({Path(m.__file__).resolve() for name, m in list(sys.modules.items())
                   if (name == "mixbits" or name.startswith("mixbits.")) and getattr(m, "__file__", None)})


# Search sources that only their own method runs (tests/test_front_stats.py checks that no other module imports
# them): a change to one of them stales that method's rows alone, a change anywhere else every row.
METHOD_SOURCES = {"dnas": ("search/dnas.py",), "dmpq": ("search/dmpq.py",), "ssps": ("search/ssps.py",),
                  "hawq": ("search/hawq.py", "search/hawq_stopping.py", "search/hutchinson.py"),
                  "sdq": ("search/sdq/",), "oneshot": ("search/oneshot/", "search/greedy.py")}
ROW_SOURCES = ("front.py", "front_references.py")  # the benchmark's code that makes rows (not the reporting)


def method_of(label: str) -> str:
    """The search a row label belongs to (``oneshot-free`` -> ``oneshot``; a reference is its own label)."""
    return next((method for method, extra in EXTRA_ROWS.items() if label in extra), label)


class CodeVersion:
    """Hashes of the code that makes each method's rows: the mixbits modules loaded once this file's imports are
    done, the row-making benchmark files, and of METHOD_SOURCES only the method's own. Rows made by other code
    are stale. Modules the front never loads (the CLI commands, the ONNX writer) do not enter, so changing them
    keeps the rows; ``RowCache.put`` refuses a row if a mixbits module was loaded after the version was taken."""

    def __init__(self, fixed: str | None = None):
        self.library = _library_files()
        self.fixed = fixed  # one version for every method (tests, and caches keyed by another cache's version)
        here = Path(__file__).resolve().parent
        self._files = {p: p.relative_to(ROOT).as_posix() for p in [*self.library, *(here / f for f in ROW_SOURCES)]}

    def _owner(self, name: str) -> str | None:
        inside = name.split("src/mixbits/", 1)[-1] if name.startswith("src/mixbits/") else None
        return next((m for m, own in METHOD_SOURCES.items() if inside and inside.startswith(own)), None)

    def of(self, label: str | None) -> str:
        """The version of ``label``'s rows; None: of the code every row shares."""
        if self.fixed is not None:
            return self.fixed
        method = None if label is None else method_of(label)
        digest = hashlib.sha256()
        for path, name in sorted(self._files.items(), key=lambda kv: kv[1]):
            if self._owner(name) in (None, method):
                digest.update(name.encode())
                digest.update(path.read_bytes())
        return digest.hexdigest()[:16]

    def __str__(self) -> str:
        return self.of(None)


class RowCache:
    """rows.jsonl: one finished row per line, keyed by (method, budget, seed) and the code version."""

    def __init__(self, directory: Path, version: CodeVersion | str, keep_stale: bool = False):
        self.path = directory / "rows.jsonl"
        self.version = version if isinstance(version, CodeVersion) else CodeVersion(fixed=version)
        self.rows: dict[str, dict] = {}
        self.stale = 0
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                row = json.loads(line)
                if row.get("code") != self.version.of(row["method"]):
                    self.stale += 1
                    if not keep_stale:
                        continue
                    row["stale"] = True  # reported as such, beside the code version that made it
                self.rows[row["key"]] = row

    @staticmethod
    def key(method: str, budget: str, seed: int) -> str:
        return f"{method}|{budget}|{seed}"

    def get(self, method: str, budget: str, seed: int) -> dict | None:
        return self.rows.get(self.key(method, budget, seed))

    def put(self, row: dict) -> None:
        late = sorted(set(_library_files()) - set(self.version.library))
        if late:  # code that made this row is not in the version: the cache could keep it after that code changed
            raise RuntimeError(f"mixbits modules loaded after the front keyed its rows: "
                               f"{', '.join(p.relative_to(ROOT).as_posix() for p in late)}; import them at the "
                               "top of benchmarks/front.py so the code version covers them")
        row = {**row, "key": self.key(row["method"], row["budget"], row["seed"]),
               "code": self.version.of(row["method"])}
        self.rows[row["key"]] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows.values()))  # stale rows are dropped


def finetune_dir(base: Path, name: str, policy, settings: dict) -> Path:
    """Where a fine-tune checkpoints: named, and keyed by its policy and settings, so an interrupted fine-tune
    resumes only into the same run (a name reused for another budget's policy starts afresh)."""
    plain = sorted((k, k if isinstance(v, torch.nn.Module) else v) for k, v in settings.items())
    what = repr((policy if isinstance(policy, str) else policy.key(), plain))
    return base / f"{name}-{hashlib.sha256(what.encode()).hexdigest()[:8]}"


@contextmanager
def forward_counter(model_class: type):
    """Counts samples through the whole network (calls of ``model_class``'s forward) while active."""
    count = {"samples": 0}

    def hook(module, inputs, output):
        if type(module) is model_class and inputs and isinstance(inputs[0], torch.Tensor):
            count["samples"] += int(inputs[0].shape[0])

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


class Bench:
    """One model at one preset: its data, float model, cache, and the rows it makes."""

    def __init__(self, args):
        self.args, self.preset = args, preset_for(args.preset, args.model)
        if args.seeds:
            self.preset["seeds"] = tuple(args.seeds)
        self.state = Path(args.state_dir) / f"{args.model}-{args.preset}"
        self.dir = CACHE / f"{args.model}-{args.preset}"
        self.recipe = {**RECIPE, **MODEL_RECIPE[args.model]}
        self.cache = RowCache(self.state, CodeVersion(), keep_stale=args.keep_stale)
        self.device = torch.device(args.device)
        self._loaders: dict[int, tuple] = {}
        set_fused(args.device == "cpu")
        self.float_model = self._float_model()
        self.stats = profile(self.float_model, (1, 28, 28))
        if not getattr(args, "report_only", False):
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile the quantizer kernels once before anything is timed, so the first rows do not carry it."""
        x, y = next(iter(self.loaders(0)[0]))
        for spec in UNIFORM_REFERENCES:
            model = mixbits.quantize(self.float_model, spec, x).train().to(self.device)
            torch.nn.functional.cross_entropy(model(x.to(self.device)), y.to(self.device)).backward()

    # data and the float model -------------------------------------------------------------------------------
    def loaders(self, seed: int):
        """(train, val, test) of a seed, built once: every method at that seed reads the same ones."""
        if seed not in self._loaders:
            # One validation split for every seed: the float model's (seed 0), so no scored image was in its
            # training data; each seed draws its own training subset from the rest and its own batch order.
            data = DataConfig(root=self.args.data_dir, max_train_samples=self.preset["train_samples"], split_seed=0)
            self._loaders[seed] = build_loaders(data, seed)[:3]
        return self._loaders[seed]

    def _float_model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        model = create(self.args.model, num_classes=10, in_chans=1, width=self.preset["width"],
                       **MODELS[self.args.model])
        train, val, test = self.loaders(0)
        weights = self.state / "float.pt"
        if weights.is_file():
            model.load_state_dict(torch.load(weights, map_location="cpu"))
        else:
            cfg = TrainConfig(epochs=self.preset["fp_epochs"], lr=FLOAT_LR[self.args.model], warmup_epochs=1.0, seed=0)
            run_dir = self.dir / "float"
            fit(model, train, cfg, val_loader=val, run_dir=run_dir, resume=(run_dir / "checkpoint.pt").is_file(),
                device=self.device)
            weights.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), weights)
        model.to(self.device)
        self.float_top1 = self.test(model, test)
        print(f"float {self.args.model}: {self.float_top1:.2f} % top-1", flush=True)
        return model.eval()

    def test(self, model, test_loader) -> float:
        samples = self.preset["test_samples"]
        max_batches = None if samples is None else max(1, samples // test_loader.batch_size)
        return evaluate(model, test_loader, self.device, max_batches=max_batches)["top1"]

    # rows ---------------------------------------------------------------------------------------------------
    def row(self, method: str, budget: str, seed: int, model, policy, seconds: dict) -> dict:
        """A finished run; ``model`` None when its training diverged (``seconds`` then says how: top-1 None)."""
        return {"model": self.args.model, "preset": self.args.preset, "method": method, "budget": budget,
                "seed": seed, "test_top1": None if model is None else self.test(model, self.loaders(seed)[2]),
                "bitops": None if policy is None else float(bitops(self.stats, policy)),
                "size_bytes": None if policy is None else float(size_bytes(self.stats, policy)),
                "policy": None if policy is None else {n: {"w": w, "a": a} for n, (w, a) in policy.bits.items()},
                # seconds depend on it, and so (by summation order) does a 2-epoch result's last digit
                "threads": torch.get_num_threads(), **seconds}

    def finetuned(self, policy, space, seed: int, name: str, searched=None, **extra) -> tuple[torch.nn.Module, dict]:
        """``policy`` fine-tuned with the recipe; ``searched`` = (result, index): from the weights the search
        kept for that budget instead of the float model's."""
        train = self.loaders(seed)[0]
        run_dir = finetune_dir(self.dir / "finetune" / str(self.cache.version), name, policy,
                               {**extra, **({"searched": True} if searched else {})})
        target, index = searched if searched else (policy, 0)
        started = time.perf_counter()
        with forward_counter(type(self.float_model)) as passes:
            try:
                model = mixbits.finetune(self.float_model, target, train, epochs=self.preset["finetune_epochs"],
                                         index=index, space=space, seed=seed, device=self.device, run_dir=run_dir,
                                         resume=(run_dir / "checkpoint.pt").is_file(), **{**self.recipe, **extra})
                diverged = {}
            except TrainingDiverged as e:  # a result too: this policy does not train with the recipe
                model, diverged = None, {"diverged": str(e)}
        return model, {"finetune_seconds": time.perf_counter() - started, "finetune_passes": passes["samples"],
                       **diverged}

    def references(self, seed: int) -> None:
        """The cheap policies a user would try first (front_references.py), fine-tuned with the one recipe."""
        for spec in (*UNIFORM_REFERENCES, *MIX_REFERENCES):
            label = REFERENCE if spec in UNIFORM_REFERENCES else "mix-ref"
            if not self.cache.get(label, spec, seed):
                self.reference(label, spec, spec, seed)
        space = mixbits.SearchSpace.from_model(self.float_model)
        if not any(is_depthwise(self.stats, name) for name in space.searchable):
            return  # the rule is then a uniform policy, already a reference
        for budget in self.budgets():
            policy = rule_policy(self.stats, space, budget)
            if policy is not None and not self.cache.get("rule-ref", budget, seed):  # None: over the budget
                self.reference("rule-ref", budget, policy, seed)

    def reference(self, label: str, budget: str, policy, seed: int) -> None:
        name = f"{label}-{budget.split(':')[-1]}-s{seed}"
        model, seconds = self.finetuned(policy, None, seed, name)
        policy = mixbits.Policy({n: layer.bits for n, layer in quant_layers(model).items()}) if model else None
        self.record(self.row(label, budget, seed, model, policy, {"search_seconds": 0.0, "search_passes": 0,
                                                                 **seconds}))

    def budgets(self) -> list[str]:
        return [f"bitops<={b}" for b in self.preset["budgets"]]

    def search(self, method: str, budgets: list[str], seed: int, options: dict | None = None):
        """One search at every budget, with the preset's epochs; the result and its compute."""
        train, val, _ = self.loaders(seed)
        epochs = {"epochs": self.preset["search_epochs"]} if method in TRAINING_SEARCHES else {}
        kept = {"keep_weights": True} if method in KEEPS_WEIGHTS else {}
        rival = {"random_baseline": True} if method in RANDOM_BASELINE else {}
        options = {**epochs, **kept, **rival, **(options or {})}
        where = self.dir / "search" / self.cache.version.of(method) / f"{method}-s{seed}"
        run_dir = where if kept else None  # where kept weights are written (a fresh search each time: no resume)
        if run_dir is not None and run_dir.exists():  # left by an interrupted search, whose checkpoint would
            shutil.rmtree(run_dir)  # make the library refuse the run directory
        started = time.perf_counter()
        with forward_counter(type(self.float_model)) as passes:
            result = mixbits.search(self.float_model, train, ",".join(budgets), method=method, val=val,
                                    options=options, seed=seed, device=self.device, run_dir=run_dir)
        compute = {"search_seconds": time.perf_counter() - started, "search_passes": passes["samples"]}
        baseline = result.info.get("random_baseline")
        if baseline:  # the baseline's scoring is not the search's cost
            compute = {"search_seconds": compute["search_seconds"] - baseline["seconds"],
                       "search_passes": compute["search_passes"] - baseline["forward_samples"]}
        # What the search did (e.g. a walk's steps and scores per budget), kept for reading its cost and choices.
        trace = where.with_suffix(".json")
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.write_text(json.dumps({**result.to_dict(), **compute}, indent=1, default=str))
        return result, compute

    def method(self, method: str, seed: int) -> None:
        budgets = self.budgets()
        labels = labels_of(method)
        if all(self.cache.get(label, b, seed) for label in labels for b in budgets):
            return
        train = self.loaders(seed)[0]
        try:
            result, search = self.search(method, budgets, seed)
        except TrainingDiverged as e:
            self.record_diverged_search(labels, budgets, seed, e)
            return
        for i, (budget, policy) in enumerate(zip(budgets, result.policies, strict=True)):
            if method == "oneshot" and not self.cache.get("oneshot-free", budget, seed):
                net = mixbits.subnet(result, i, bn_data=train, device=self.device)
                self.record(self.row("oneshot-free", budget, seed, net, policy,
                                     {**search, "finetune_seconds": 0.0, "finetune_passes": 0}))
            if method in RANDOM_BASELINE and not self.cache.get(f"{method}-random", budget, seed):
                rival = mixbits.Policy.from_dict(result.info["random_baseline"]["policies"][i])
                net = mixbits.subnet(result, i, policy=rival, bn_data=train, device=self.device)
                self.record(self.row(f"{method}-random", budget, seed, net, rival,
                                     {**search, "finetune_seconds": 0.0, "finetune_passes": 0}))
            if not self.cache.get(method, budget, seed):
                model, seconds = self.finetuned(policy, result.space, seed, f"{method}-b{i}-s{seed}")
                self.record(self.row(method, budget, seed, model, policy, {**search, **seconds}))
            if method in KEEPS_WEIGHTS and not self.cache.get(f"{method}-kept", budget, seed):
                model, seconds = self.finetuned(policy, result.space, seed, f"{method}-kept-b{i}-s{seed}",
                                                searched=(result, i))
                self.record(self.row(f"{method}-kept", budget, seed, model, policy, {**search, **seconds}))
            if method == "sdq" and not self.cache.get("sdq-stage2", budget, seed):
                own = result.finetune  # SDQ's stage 2: distillation from the float model and bin regularisation
                model, seconds = self.finetuned(policy, result.space, seed, f"sdq2-b{i}-s{seed}",
                                                teacher=copy.deepcopy(self.float_model), **own)
                self.record(self.row("sdq-stage2", budget, seed, model, policy, {**search, **seconds}))

    def record_diverged_search(self, labels: list[str], budgets: list[str], seed: int, error: Exception) -> None:
        """A search that diverged found no policy at any budget: every row it would have made says so."""
        for label in labels:
            for budget in budgets:
                self.record(self.row(label, budget, seed, None, None, {"diverged": str(error), "search_seconds": None,
                                                                      "finetune_seconds": 0.0}))

    def record(self, row: dict) -> None:
        self.cache.put(row)
        top1 = "diverged" if row["test_top1"] is None else f"{row['test_top1']:6.2f} %"
        cost = "?" if row["bitops"] is None else f"{row['bitops'] / 1e6:8.2f}"
        print(f"{row['method']:>13} seed {row['seed']} {row['budget']:<22} {top1} at {cost} M BitOPs  (search "
              f"{row['search_seconds'] or 0:.0f} s, fine-tune {row['finetune_seconds']:.0f} s)", flush=True)


def write_results(bench: Bench, methods: list[str]) -> Path:
    wanted = {*REFERENCE_METHODS, *(label for method in methods for label in labels_of(method))}
    rows = [r for r in bench.cache.rows.values() if r["method"] in wanted]
    rows = sorted(rows, key=lambda r: (r["method"], r["budget"], r["seed"]))
    add_paired_gains(add_reference_gains(add_gains(rows, REFERENCE)))
    summary = summarise(rows)
    qat = [r["finetune_seconds"] for r in rows if r["method"] == REFERENCE and r.get("finetune_seconds")]
    qat_seconds = sum(qat) / len(qat) if qat else None  # one uniform fine-tune: the unit of compute
    for line in summary:
        line["search_x_qat"] = line["search_seconds"] / qat_seconds if qat_seconds else None
    between = [f"bitops<={b}" for b in BETWEEN]
    pooled_lines = [line for line in pooled(rows, between) if line["method"] not in REFERENCE_METHODS]
    name = f"front-{bench.args.model}-{bench.args.preset}"
    code = {m: bench.cache.version.of(m) for m in ("uniform-ref", *methods)}  # per method: see CodeVersion
    meta = {**metadata(), "preset": bench.args.preset, "preset_settings": bench.preset, "code": code,
            "stale_rows": sum(1 for r in rows if r.get("stale")), "float_top1": bench.float_top1,
            "validation_split": "seed 0's (the float model's), for every seed",
            "recipe": {**bench.recipe, "init": "fitted", "lr": mixbits.FINETUNE_LR["sgd"],
                       "epochs": bench.preset["finetune_epochs"]}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary,
                                                      "pooled": pooled_lines}, indent=1) + "\n")
    columns = ["method", "budget", "n", "diverged", "bitops", "test_top1", "top1_ci95", "mean_gain", "ci95",
               "gain_vs_best_reference", "gain_vs_best_reference_ci95", "gain_vs_random", "gain_vs_random_ci95",
               "gain_vs_hawq", "gain_vs_hawq_ci95", "search_seconds", "search_x_qat", "finetune_seconds"]
    table = markdown_table(summary, columns)
    pooled_columns = ["method"] + [c for g in GAINS for c in (g, f"{g}_ci95")] + ["gain_vs_uniform_front_n"]
    pooled_table = markdown_table(pooled_lines, pooled_columns)
    stale = meta["stale_rows"]
    header = (f"{bench.args.model}, preset {bench.args.preset} ({bench.preset}); float {bench.float_top1:.2f} %; "
              f"recipe {meta['recipe']}; validation split of seed 0 for every seed; shared code {bench.cache.version}, "
              f"commit {meta['commit']}" + (f"; {stale} rows from earlier code (stale: true)" if stale else "")
              + ". Gains are paired by seed, with 95 % Student-t intervals over seeds: mean_gain over the uniform "
              "front (the chord through W2A2, W3A3, W4A4 in log BitOPs), gain_vs_best_reference over the best of "
              "the uniform, wXaY and rule-of-thumb references costing no more BitOPs, gain_vs_random and "
              "gain_vs_hawq over those searches at the same budget. search_x_qat: search seconds over one uniform "
              "reference fine-tune's.")
    pooled_header = (f"Pooled over the budgets between the uniform levels ({', '.join(BETWEEN)}): per seed the mean "
                     "gain over them, then the mean and 95 % interval over seeds.")
    (RESULTS / f"{name}.md").write_text(f"{header}\n\n{table}\n\n{pooled_header}\n\n{pooled_table}\n")
    plot_front(rows, summary, bench.float_top1, RESULTS / f"{name}.png", f"{bench.args.model} ({bench.args.preset})")
    print(f"\n{header}\n\n{table}\n\n{pooled_header}\n\n{pooled_table}")
    return RESULTS / f"{name}.json"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="resnet20")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=mixbits.list_methods())
    p.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--state-dir", default=str(STATE),
                   help="where finished rows and the float weights are kept (default: benchmarks/front-state)")
    p.add_argument("--report-only", action="store_true", help="write the results from the cached rows, run nothing")
    p.add_argument("--keep-stale", action="store_true",
                   help="keep rows made by other code (marked stale in the results) instead of running them again")
    args = p.parse_args(argv)
    bench = Bench(args)
    if bench.cache.stale:
        what = "are kept and marked stale" if args.keep_stale else "are run again"
        print(f"{bench.cache.stale} cached rows came from other code and {what}", flush=True)
    if not args.report_only:
        for seed in bench.preset["seeds"]:
            bench.references(seed)
            for method in args.methods:
                if method != "uniform":
                    bench.method(method, seed)
    write_results(bench, [m for m in args.methods if m != "uniform"])


if __name__ == "__main__":
    main()
