"""What may be searched (`SearchSpace`) and what was chosen (`Policy`).

Both are plain data keyed by module name, so they survive JSON, work for any ``nn.Module`` and never
hold tensors. A policy always covers every quantized layer, fixed layers included, so it is enough on
its own to rebuild a quantized model or to price it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from torch import nn

from .errors import MixbitsError, did_you_mean
from .input_readers import first_layers
from .layer_types import SUPPORTED, quantizable_layers

DEFAULT_BITS = (2, 3, 4, 5, 6)
FIXED_BITS = (8, 8)
POLICY_FORMAT = "mixbits.policy/1"
MAX_LISTED = 8  # problems listed in one error message before "... and N more"

Bits = tuple[int, int]  # (weight bits, activation bits)


def _check_bits(values: Iterable[int], what: str) -> tuple[int, ...]:
    values = list(values)
    bits = tuple(sorted({int(b) for b in values}))
    if not bits or any(b < 2 or b > 8 for b in bits):
        raise MixbitsError(f"{what} must be integers in 2..8, got {values}; e.g. [2, 3, 4, 5, 6]")
    return bits


@dataclass(frozen=True)
class SearchSpace:
    """Which layers are quantized, which of them are searched, and the candidate bit-widths.

    ``layers`` lists every quantized layer in forward-registration order; those in ``fixed`` keep
    their given (w, a) bits, the others choose from ``w_bits`` x ``a_bits``.
    """

    layers: tuple[str, ...]
    w_bits: tuple[int, ...] = DEFAULT_BITS
    a_bits: tuple[int, ...] = DEFAULT_BITS
    fixed: Mapping[str, Bits] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "w_bits", _check_bits(self.w_bits, "weight bit candidates"))
        object.__setattr__(self, "a_bits", _check_bits(self.a_bits, "activation bit candidates"))
        unknown = [n for n in self.fixed if n not in self.layers]
        if unknown:
            raise MixbitsError(
                f"fixed layers {unknown} are not quantized layers of the model; known: {list(self.layers)}")
        for name, (w, a) in self.fixed.items():
            _check_bits((w, a), f"fixed bits of layer {name!r}")
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "fixed", MappingProxyType({n: (int(w), int(a)) for n, (w, a) in self.fixed.items()}))

    def __hash__(self) -> int:
        return hash((self.layers, self.w_bits, self.a_bits, tuple(self.fixed.items())))

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        w_bits: Iterable[int] = DEFAULT_BITS,
        a_bits: Iterable[int] = DEFAULT_BITS,
        fixed: str | Iterable[str] = "first_last",
        fixed_bits: Bits = FIXED_BITS,
        exclude: Iterable[str] = (),
        example_input=None,
    ) -> SearchSpace:
        """Every quantizable layer of ``model`` (``layer_types.QUANTIZABLE``); ``fixed`` is "first_last", "none",
        or a list of names.

        ``exclude`` names layers (exact or ``re:`` patterns) to leave in float entirely. With ``example_input``
        (a batch of the model's inputs) "first" means every layer that reads the model's input, and the layers
        reading the same tensor as one of them (a transformer's query, key and value projections:
        ``mixbits.input_readers``); without it, the first layer registered.
        """
        names = quantizable_layers(model)
        if not names:
            raise MixbitsError(f"{type(model).__name__} has no layer mixbits quantizes ({SUPPORTED})")
        names = [n for n in names if not _matches_any(n, exclude)]
        if not names:
            raise MixbitsError(f"exclude={list(exclude)} leaves no layer to quantize; exclude fewer layers")
        if fixed == "first_last":
            first = first_layers(model, names, example_input) if example_input is not None else names[:1]
            fixed_names = list(dict.fromkeys([*first, names[-1]]))
        elif fixed == "none":
            fixed_names = []
        elif isinstance(fixed, str):
            raise MixbitsError(f"fixed={fixed!r} is not understood; use 'first_last', 'none' or a list of layer names")
        else:
            fixed = list(fixed)
            unmatched = [p for p in fixed if not any(_matches(n, p) for n in names)]
            if unmatched:
                raise MixbitsError(f"fixed layers {unmatched} match no quantized layer; known: {', '.join(names)}")
            fixed_names = [n for n in names if _matches_any(n, fixed)]
        return cls(tuple(names), tuple(w_bits), tuple(a_bits), {n: tuple(fixed_bits) for n in fixed_names})

    @property
    def searchable(self) -> tuple[str, ...]:
        return tuple(n for n in self.layers if n not in self.fixed)

    def candidates(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(weight candidates, activation candidates) of one layer; a fixed layer has one of each."""
        self.require_layer(name)
        if name in self.fixed:
            w, a = self.fixed[name]
            return (w,), (a,)
        return self.w_bits, self.a_bits

    def require_layer(self, name: str) -> None:
        if name not in self.layers:
            raise MixbitsError(
                f"layer {name!r} is not a quantized layer of this model.{did_you_mean(name, self.layers)} "
                f"Known layers: {', '.join(self.layers)}"
            )

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "w_bits": list(self.w_bits), "a_bits": list(self.a_bits),
                "fixed": {n: list(b) for n, b in self.fixed.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> SearchSpace:
        return cls(tuple(d["layers"]), tuple(d["w_bits"]), tuple(d["a_bits"]),
                   {n: tuple(b) for n, b in d.get("fixed", {}).items()})


def _matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(_matches(name, p) for p in patterns)


def _matches(name: str, pattern: str) -> bool:
    """Exact name, or a regular expression written as ``re:<pattern>`` (full match)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern


@dataclass(frozen=True)
class Policy:
    """Layer name -> (weight bits, activation bits), for every quantized layer.

    Immutable and hashable (``key``), so searches can cache evaluations by policy.
    """

    bits: Mapping[str, Bits]

    def __post_init__(self):
        bits = {n: (int(w), int(a)) for n, (w, a) in self.bits.items()}
        object.__setattr__(self, "bits", MappingProxyType(bits))

    # construction -------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, space: SearchSpace, w: int, a: int | None = None) -> Policy:
        """Every searchable layer at W``w``A``a`` (``a`` defaults to ``w``); fixed layers at their bits."""
        return cls.from_rules(space, default=(w, w if a is None else a))

    @classmethod
    def from_rules(cls, space: SearchSpace, default: Bits, overrides: Mapping[str, Bits] | None = None) -> Policy:
        """A default for searchable layers plus overrides by exact name or ``re:`` pattern (first match wins).

        Exact names take precedence over patterns, as torchao's per-module configs do. Fixed layers
        keep their fixed bits. The result is validated against ``space``.
        """
        overrides = dict(overrides or {})
        for key in overrides:
            if not key.startswith("re:"):
                space.require_layer(key)
            elif not any(_matches(n, key) for n in space.searchable):
                raise MixbitsError(
                    f"override pattern {key!r} matches no searchable layer; layers: {list(space.searchable)}")
        bits: dict[str, Bits] = {}
        for name in space.layers:
            if name in space.fixed:
                bits[name] = space.fixed[name]
            elif name in overrides:
                bits[name] = tuple(overrides[name])
            else:
                match = next((v for k, v in overrides.items() if k.startswith("re:") and _matches(name, k)), default)
                bits[name] = tuple(match)
        policy = cls(bits)
        policy.validate(space)
        return policy

    def replace(self, name: str, w: int, a: int) -> Policy:
        """A copy with one layer changed (used by greedy and random searches)."""
        bits = dict(self.bits)
        bits[name] = (w, a)
        return Policy(bits)

    # access -------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Bits:
        return self.bits[name]

    def __iter__(self):
        return iter(self.bits)

    def __len__(self) -> int:
        return len(self.bits)

    def key(self) -> tuple:
        return tuple(self.bits.items())

    def __hash__(self) -> int:
        return hash(self.key())

    def __eq__(self, other) -> bool:
        return isinstance(other, Policy) and self.key() == other.key()

    # checks -------------------------------------------------------------------------------------
    def validate(self, space: SearchSpace) -> Policy:
        """Raise one MixbitsError listing every layer that is missing, unknown or off its candidates."""
        problems = []
        for name in self.bits:
            if name not in space.layers:
                problems.append(f"layer {name!r} is not in the model{did_you_mean(name, space.layers)}")
        for name in space.layers:
            if name not in self.bits:
                problems.append(f"layer {name!r} has no bits in the policy")
                continue
            w, a = self.bits[name]
            w_ok, a_ok = space.candidates(name)
            if w not in w_ok:
                problems.append(f"layer {name!r}: weight bits {w} not allowed, expected one of {list(w_ok)}")
            if a not in a_ok:
                problems.append(f"layer {name!r}: activation bits {a} not allowed, expected one of {list(a_ok)}")
        if problems:
            shown = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"]
                                             if len(problems) > MAX_LISTED else [])
            raise MixbitsError("policy does not fit the search space:\n  " + "\n  ".join(shown))
        return self

    # I/O ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": POLICY_FORMAT, "layers": {n: {"w": w, "a": a} for n, (w, a) in self.bits.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> Policy:
        if not isinstance(d, Mapping) or d.get("format") != POLICY_FORMAT or not isinstance(d.get("layers"), Mapping):
            raise MixbitsError(
                f"not a mixbits policy: expected a JSON object with format {POLICY_FORMAT!r} and 'layers'")
        bad = [f"{n!r}: {v!r}" for n, v in d["layers"].items() if not _is_bits_entry(v)]
        if bad:
            more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
            shown = ", ".join(bad[:MAX_LISTED]) + more
            raise MixbitsError(f"policy layers must map a name to {{'w': <whole number>, 'a': <whole number>}} "
                               f"(e.g. {{'w': 4, 'a': 8}}); got {shown}")
        return cls({n: (v["w"], v["a"]) for n, v in d["layers"].items()})

    def save(self, path: str | os.PathLike) -> None:
        from .utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Policy:
        path = Path(path)
        if not path.is_file():
            raise MixbitsError(
                f"policy file {str(path)!r} does not exist; write one with `mixbits search` or Policy.save")
        from .utils import read_json

        return cls.from_dict(read_json(path, "policy file", "write it with `mixbits search` or Policy.save"))

    def describe(self) -> str:
        """Compact one-line form, e.g. ``conv1:8/8 layer1.0.conv1:4/3 ...``."""
        return " ".join(f"{n}:{w}/{a}" for n, (w, a) in self.bits.items())


def _is_bits_entry(v) -> bool:
    """``{"w": 4, "a": 8}``: exactly those two keys, each a whole number (never 4.7, "4" or true)."""
    return isinstance(v, Mapping) and set(v) == {"w", "a"} and all(
        isinstance(v[k], int) and not isinstance(v[k], bool) for k in ("w", "a"))


_UNIFORM = re.compile(r"uniform:(?:w?(\d+)(?:a(\d+))?|(\d+)/(\d+))$", re.IGNORECASE)


def parse_policy(spec: str | os.PathLike, space: SearchSpace) -> Policy:
    """``uniform:4`` (W4A4), ``uniform:w4a8`` or ``uniform:4/8``, or the path of a policy JSON file."""
    text = str(spec)
    if text.lower().startswith("uniform:"):
        m = _UNIFORM.match(text)
        if not m:
            raise MixbitsError(f"policy {text!r} is not understood; expected uniform:4, uniform:w4a8 or uniform:4/8")
        w = int(m.group(1) or m.group(3))
        a = int(m.group(2) or m.group(4) or w)
        for bits, what in ((w, space.w_bits), (a, space.a_bits)):
            if bits not in what:
                raise MixbitsError(f"policy {text!r}: {bits} bits is not a candidate; expected one of {list(what)}")
        return Policy.uniform(space, w, a)
    return Policy.load(text).validate(space)


def training_space(model: nn.Module, policy: Policy | str | os.PathLike, space: SearchSpace | None = None,
                   fixed: str | Iterable[str] = "first_last", fixed_bits: Bits = FIXED_BITS, example_input=None
                   ) -> tuple[SearchSpace, Policy]:
    """The policy to train, and the narrowest space holding it (one step size per bit-width it uses).

    Any bit-width in 2..8 may be trained (uniform:8 included), whatever a search's candidates were.
    ``space`` (e.g. the one a policy was searched in) gives the quantized and fixed layers; otherwise
    they come from ``model`` with ``fixed`` and ``fixed_bits``. A fixed layer keeps the bits the policy
    gives it.
    """
    if space is not None:
        wide = SearchSpace(space.layers, tuple(range(2, 9)), tuple(range(2, 9)), dict(space.fixed))
    else:
        wide = SearchSpace.from_model(model, range(2, 9), range(2, 9), fixed, tuple(fixed_bits),
                                      example_input=example_input)
    if isinstance(policy, Policy):
        missing = [n for n in wide.layers if n not in policy.bits]
        if missing:
            raise MixbitsError(f"the policy has no bits for layers {missing[:MAX_LISTED]}; give every quantized "
                               "layer (Policy.from_rules fills a default)")
        wide = SearchSpace(wide.layers, wide.w_bits, wide.a_bits, {n: policy[n] for n in wide.fixed})
    else:
        policy = parse_policy(policy, wide)
    searchable = [policy[n] for n in wide.searchable] or [next(iter(wide.fixed.values()), FIXED_BITS)]
    narrow = SearchSpace(wide.layers, tuple(w for w, _ in searchable), tuple(a for _, a in searchable), wide.fixed)
    return narrow, policy.validate(narrow)
