"""Run configuration: dataclass sections, YAML load/save, ``key=value`` overrides, whole-config validation.

A run config has one section per area — ``model``, ``data``, ``train``, ``quant`` — plus a few top-level
fields. Each section's dataclass lives beside the code it configures and reports its own problems;
``validate`` gathers every problem of every section and raises them together, before anything runs.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .data import DataConfig
from .errors import MixbitsError, did_you_mean
from .quant.fit import STEP_INITS
from .space import DEFAULT_BITS, FIXED_BITS
from .specs import is_spec, load_factory, spec_problems
from .train import TrainConfig
from .utils import atomic_write_text, device_problem, read_text


class _Loader(yaml.SafeLoader):
    """YAML 1.1's safe loader, reading ``1e-4`` and ``1E5`` as numbers (as YAML 1.2 does) rather than text."""


class _Dumper(yaml.SafeDumper):
    """The matching writer: it quotes a string such as "1e3", which _Loader would read back as a number."""


for _yaml_class in (_Loader, _Dumper):
    _yaml_class.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )


def read_yaml(text: str, source: str):
    """Parse YAML config text safely (no code runs); ``source`` names it in the error."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain data only
    except yaml.YAMLError as e:
        raise MixbitsError(f"{source} is not valid YAML: {' '.join(str(e).split())}") from None


@dataclass
class ModelConfig:
    """Which model to build: a registered name or ``module.path:factory`` / ``file.py:factory``; ``kwargs`` go
    to its factory (e.g. ``width``, ``shortcut``)."""

    name: str = "resnet20"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def problems(self, prefix: str = "model") -> list[str]:
        from .models import MODELS, option_problems

        out = []
        if is_spec(self.name):
            out += spec_problems(self.name, "model", f"{prefix}.name")
        elif self.name not in MODELS:
            out.append(f"{prefix}.name: unknown model {self.name!r}; expected one of: {', '.join(MODELS.names())}."
                       f"{did_you_mean(self.name, MODELS.names())}")
        if not isinstance(self.kwargs, dict):
            out.append(f"{prefix}.kwargs: must be a mapping, got {self.kwargs!r}")
        elif self.name in MODELS or (is_spec(self.name) and not out):
            factory = load_factory(self.name, "model") if is_spec(self.name) else MODELS.get(self.name)
            out.extend(f"{prefix}.kwargs.{p}" for p in option_problems(factory, self.kwargs))
        return out


@dataclass
class QuantConfig:
    """The search space and, for training, the policy to train at."""

    w_bits: list[int] = field(default_factory=lambda: list(DEFAULT_BITS))  # candidate weight bit-widths
    a_bits: list[int] = field(default_factory=lambda: list(DEFAULT_BITS))  # candidate activation bit-widths
    fixed: str | list[str] = "first_last"  # layers kept at fixed_bits: "first_last", "none", or names/re: patterns
    fixed_bits: list[int] = field(default_factory=lambda: list(FIXED_BITS))
    per_channel: bool = False  # per-output-channel weight steps
    policy: str | None = None  # "uniform:4", "uniform:w4a8" or a policy JSON path; null = float training
    fused: bool = True  # compiled single-pass quantizer kernels (eager ops if compiling fails; MIXBITS_FUSED pins it)
    init: str = "fitted"  # starting steps: "fitted" (least rounding error on the first batch) or "lsq" (LSQ's)

    def problems(self, prefix: str = "quant") -> list[str]:
        out = []
        for name in ("w_bits", "a_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, list) or not bits or not all(_is_int(b) and 2 <= b <= 8 for b in bits):
                out.append(f"{prefix}.{name}: must be a non-empty list of integers in 2..8, got {bits!r}")
        fb = self.fixed_bits
        if not isinstance(fb, list) or len(fb) != 2 or not all(_is_int(b) and 2 <= b <= 8 for b in fb):
            out.append(f"{prefix}.fixed_bits: must be [weight_bits, activation_bits] in 2..8, got {fb!r}")
        if not (self.fixed in ("first_last", "none") or isinstance(self.fixed, list)):
            out.append(f"{prefix}.fixed: must be 'first_last', 'none' or a list of layer names, got {self.fixed!r}")
        for name in ("per_channel", "fused"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{prefix}.{name}: must be true or false, got {getattr(self, name)!r}")
        if self.init not in STEP_INITS:
            out.append(f"{prefix}.init: must be one of {', '.join(STEP_INITS)}, got {self.init!r}")
        policy = self.policy
        if policy is not None and not (isinstance(policy, str) and (policy.startswith("uniform:") or
                                                                    Path(policy).is_file())):
            out.append(f"{prefix}.policy: must be uniform:<bits> (e.g. uniform:4, uniform:w4a8) or an existing "
                       f"policy JSON file, got {policy!r}")
        return out


@dataclass
class SearchConfig:
    """Which search method, under which budget(s), and how long to fine-tune what it finds."""

    method: str = "uniform"  # see `mixbits list methods`; checked against the registry when a search runs
    budget: str = "bitops<=uniform:4"  # one or several budgets, e.g. "bitops<=uniform:2,uniform:3,uniform:4"
    options: dict[str, Any] = field(default_factory=dict)  # the method's own options
    finetune_epochs: int | None = None  # epochs of QAT per found policy; null = train.epochs, 0 = none
    latency_table: str | None = None  # JSON latency table, for latency budgets

    def problems(self, prefix: str = "search") -> list[str]:
        from .budget import parse_budgets

        out = []
        if not isinstance(self.method, str) or not self.method:
            out.append(f"{prefix}.method: must be a search method name (`mixbits list methods`), got {self.method!r}")
        try:
            parse_budgets(self.budget)
        except MixbitsError as e:
            out.append(f"{prefix}.budget: {e}")
        if not isinstance(self.options, dict):
            out.append(f"{prefix}.options: must be a mapping of the method's options, got {self.options!r}")
        if self.finetune_epochs is not None and (not _is_int(self.finetune_epochs) or self.finetune_epochs < 0):
            out.append(f"{prefix}.finetune_epochs: must be a whole number >= 0 or null, got {self.finetune_epochs!r}")
        if self.latency_table is not None and not Path(str(self.latency_table)).is_file():
            out.append(f"{prefix}.latency_table: file {self.latency_table!r} does not exist; write one with "
                       f"`mixbits lut`")
        return out


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    out: str = "runs/train"  # run directory: checkpoint.pt, metrics.jsonl, config.yaml, result.json
    init: str | None = None  # checkpoint (file or run directory) whose weights start this run
    device: str = "cpu"

    def problems(self) -> list[str]:
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out.extend(value.problems(f.name))
        if not isinstance(self.out, str) or not self.out:
            out.append(f"out: must be a directory path, got {self.out!r}")
        if self.init is not None and not Path(str(self.init)).exists():
            out.append(f"init: checkpoint {self.init!r} does not exist; give a checkpoint.pt or a run directory")
        if not isinstance(self.device, str) or self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            out.append(f"device: must be cpu, cuda, cuda:N or mps, got {self.device!r}")
        elif device_problem(self.device):
            out.append(f"device: {device_problem(self.device)}")
        return out

    def validate(self, extra: list[str] | tuple[str, ...] = ()) -> RunConfig:
        """Raise one MixbitsError listing every problem, with ``extra`` ones found by the caller (e.g. an
        unknown search method, which the search registry knows and this module does not import)."""
        problems = self.problems() + list(extra)
        if problems:
            raise MixbitsError(f"invalid configuration ({len(problems)} problem{'s' * (len(problems) > 1)}):\n  "
                               + "\n  ".join(problems))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _merge(target, values: dict, where: str, problems: list[str]) -> None:
    """Set dataclass fields from a mapping, recursing into sections; unknown keys become problems."""
    known = {f.name: f for f in fields(target)}
    for key, value in values.items():
        if key not in known:
            problems.append(f"{where}{key}: unknown setting; expected one of: {', '.join(known)}."
                            f"{did_you_mean(key, known)}")
            continue
        current = getattr(target, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            _merge(current, value, f"{where}{key}.", problems)
        elif dataclasses.is_dataclass(current):
            problems.append(f"{where}{key}: must be a mapping of settings, got {value!r}")
        else:
            setattr(target, key, _merged(current, value))


def _merged(current, value):
    """A mapping setting (model.kwargs, search.options) takes new keys over its old ones; anything else is replaced."""
    if isinstance(current, dict) and isinstance(value, dict):
        return {**current, **{k: _merged(current.get(k), v) for k, v in value.items()}}
    return value


def parse_override(text: str) -> dict:
    """``train.lr=0.05`` -> {"train": {"lr": 0.05}}; the value is read as YAML (numbers, lists, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise MixbitsError(f"override {text!r} is not key=value; e.g. train.epochs=3 or quant.w_bits=[2,4]")
    value = read_yaml(raw, f"the value of override {text!r}") if raw.strip() else None
    return _nested(key, value)


def _nested(key: str, value) -> dict:
    """``("train.lr", 0.05)`` -> {"train": {"lr": 0.05}}."""
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


Override = str | tuple[str, Any]  # "key=YAML value" as typed, or (key, value) taken as it is (command-line flags)


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[Override] = (),
                validate: bool = True) -> RunConfig:
    """Defaults, then the YAML file, then each override; every problem reported at once.

    An override is ``"key=value"`` (the value read as YAML) or a ``(key, value)`` pair, whose value is
    used as it is: a path or a number from a typed flag never goes through YAML.
    """
    cfg = RunConfig()
    problems: list[str] = []
    if path is not None:
        where = f"config file {str(path)!r}"
        if not Path(path).exists():
            raise MixbitsError(f"{where} does not exist; give a YAML file or a shipped name (`mixbits list configs`)")
        data = read_yaml(read_text(path, "config file"), where) or {}
        if not isinstance(data, dict):
            raise MixbitsError(f"{where} must hold a mapping of sections (model:, data:, train: ...), "
                               f"got {type(data).__name__}")
        _merge(cfg, data, "", problems)
    for item in overrides:
        _merge(cfg, parse_override(item) if isinstance(item, str) else _nested(*item), "", problems)
    if problems:
        raise MixbitsError("invalid configuration:\n  " + "\n  ".join(problems + cfg.problems()))
    return cfg.validate() if validate else cfg


def shipped_configs() -> dict[str, Path]:
    """name -> path of the YAML recipes shipped with mixbits."""
    root = Path(__file__).parent / "configs"
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}
