"""Budgets: one or several cost caps that a policy must all meet.

Text forms (``;`` joins caps into one budget, ``,`` lists alternatives, and the two combine as a
cartesian product)::

    bitops<=0.35G          bitops<=uniform:3        bitops<=uniform:w4a8      bitops<=uniform:2.5
    size<=1.2MB            size<=uniform:4          (B KB MB GB = 1000^k bytes, KiB MiB GiB = 1024^k)
    latency<=3.5ms         latency<=uniform:4       (in the latency table's unit)
    bitops<=uniform:2,uniform:3;size<=1MB           -> two budgets, each with the size cap

Internally BitOPs are counts, size is in bits and latency is in the table's unit. A uniform reference
may lie between the bit-widths (``uniform:2.5``, ``uniform:w2.5a3``): the cost of every searchable layer at
that many bits, fixed layers at their bits; see ``Cap.limit``.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

from .cost import METRICS, TIME_UNITS, LatencyTable, ModelStats, measure, require_latency_table
from .errors import MixbitsError, did_you_mean
from .space import Policy, SearchSpace

FORMS = "bitops<=0.35G, bitops<=uniform:3, bitops<=uniform:2.5, bitops<=uniform:w3a2, size<=1.2MB, latency<=3.5ms"
_BITOPS_UNITS = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_SIZE_UNITS = {"B": 1, "KB": 1e3, "kB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_CAP = re.compile(r"([A-Za-z_]+)\s*<=\s*(.*)$", re.DOTALL)
_NUMBER = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([^\d\s.]*)$")
_BITS = r"(\d+(?:\.\d*)?|\.\d+)"
_REF = re.compile(rf"uniform:(?:w?{_BITS}(?:a{_BITS})?|{_BITS}/{_BITS})$", re.IGNORECASE)
REFERENCE_BITS = (2, 8)  # the quantizer's bit-widths: a reference outside them describes no policy


def reference_policy(space: SearchSpace, w: int, a: int) -> Policy:
    """Every searchable layer at W``w``A``a``, fixed layers at their bits; not checked against candidates."""
    return Policy({n: space.fixed.get(n, (w, a)) for n in space.layers})


def cheapest_policy(space: SearchSpace) -> Policy:
    """Every searchable layer at its smallest w and a (lowest BitOPs and size), fixed layers at their bits."""
    return reference_policy(space, min(space.w_bits), min(space.a_bits))


@dataclass(frozen=True)
class Cap:
    """One limit on one metric: an absolute ``value`` (internal unit) or a ``uniform`` (w, a) reference."""

    metric: str
    value: float | None
    uniform: tuple[float, float] | None  # bits, possibly between the integer bit-widths
    text: str
    unit: str | None = None  # latency unit written in the budget, checked against the table's

    def limit(self, stats: ModelStats, space: SearchSpace, latency: LatencyTable | None = None) -> float:
        """The cap as an absolute number in the metric's internal unit."""
        if self.metric == "latency":
            require_latency_table(latency)
        if self.uniform is not None:
            return self._reference_cost(stats, space, latency)
        if self.metric == "latency" and self.unit and self.unit != latency.unit:
            return self.value * _time_factor(self.unit, latency.unit, self.text)
        return self.value


    def _reference_cost(self, stats: ModelStats, space: SearchSpace, latency: LatencyTable | None) -> float:
        """The cost with every searchable layer at the reference bits: bilinear interpolation between the
        four integer references around (w, a). BitOPs (Σ MACs·w·a) and size (Σ params·w) are bilinear in the
        shared (w, a), so this is exact for them (W2.5A2.5 costs MACs·2.5² per layer); latency is interpolated
        between the table's entries."""
        w, a = self.uniform
        total = 0.0
        for w_int, w_share in _corners(w):
            for a_int, a_share in _corners(a):
                if w_share * a_share:
                    total += w_share * a_share * measure(self.metric, stats, reference_policy(space, w_int, a_int),
                                                         latency)
        return total


def _corners(bits: float) -> list[tuple[int, float]]:
    """The integer bit-widths around ``bits`` with their interpolation weights (one corner when integral)."""
    low = math.floor(bits)
    share = bits - low
    return [(low, 1.0)] if share == 0 else [(low, 1.0 - share), (low + 1, share)]


def _time_factor(given: str, table: str, text: str) -> float:
    if given in TIME_UNITS and table in TIME_UNITS:
        return TIME_UNITS[given] / TIME_UNITS[table]
    raise MixbitsError(f"budget {text!r} is in {given!r} but the latency table is in {table!r}; "
                       f"write the budget in {table!r}")


@dataclass(frozen=True)
class Budget:
    """Caps that must all hold; at most one per metric."""

    caps: tuple[Cap, ...]

    @property
    def text(self) -> str:
        return ";".join(c.text for c in self.caps)

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(c.metric for c in self.caps)

    def limits(self, stats: ModelStats, space: SearchSpace, latency: LatencyTable | None = None) -> dict[str, float]:
        return {c.metric: c.limit(stats, space, latency) for c in self.caps}

    def slack(self, stats: ModelStats, policy: Policy, space: SearchSpace,
              latency: LatencyTable | None = None) -> dict[str, float]:
        """limit - measured per metric; negative means the cap is violated."""
        return {m: lim - measure(m, stats, policy, latency) for m, lim in self.limits(stats, space, latency).items()}

    def satisfied(self, stats: ModelStats, policy: Policy, space: SearchSpace,
                  latency: LatencyTable | None = None) -> bool:
        limits = self.limits(stats, space, latency)
        # relative tolerance so a uniform reference policy meets its own float latency cap
        return all(measure(m, stats, policy, latency) <= lim + 1e-9 * abs(lim) for m, lim in limits.items())

    def __str__(self) -> str:
        return self.text


# parsing ------------------------------------------------------------------------------------------
def _bad(text: str, why: str) -> MixbitsError:
    return MixbitsError(f"budget {text!r} is not understood: {why}; accepted forms: {FORMS} "
                        "(';' joins caps, ',' lists budgets)")


def _parse_value(metric: str, value: str, whole: str) -> Cap:
    text = f"{metric}<={value}"
    ref = _REF.match(value)
    if ref:
        w = float(ref.group(1) or ref.group(3))
        a = float(ref.group(2) or ref.group(4) or w)
        low, high = REFERENCE_BITS
        if not (low <= w <= high and low <= a <= high):
            raise _bad(whole, f"uniform reference bits must be in {low}..{high} (the bit-widths a layer can run at), "
                              f"got W{w:g}A{a:g}; choose a reference in that range or give an absolute limit")
        return Cap(metric, None, (w, a), text)
    num = _NUMBER.match(value)
    if not num:
        raise _bad(whole, f"{value!r} is neither a number nor uniform:<bits>")
    x, unit = float(num.group(1)), num.group(2)
    if not math.isfinite(x) or x <= 0:
        raise _bad(whole, f"the limit must be a positive number, got {value!r}")
    if metric == "bitops":
        if unit.upper() not in _BITOPS_UNITS:
            raise _bad(whole, f"BitOPs suffix {unit!r} unknown; use K, M, G, T or none")
        return Cap(metric, x * _BITOPS_UNITS[unit.upper()], None, text)
    if metric == "size":
        if unit not in _SIZE_UNITS:
            raise _bad(whole, f"size needs a unit, one of {', '.join(_SIZE_UNITS)}; got {unit or 'none'!r}")
        return Cap(metric, x * _SIZE_UNITS[unit] * 8, None, text)
    return Cap(metric, x, None, text, unit or None)


def _parse_group(group: str, whole: str) -> tuple[str, list[Cap]]:
    """``metric<=v1,v2,...`` -> the metric and one cap per value."""
    m = _CAP.match(group.strip())
    if not m:
        raise _bad(whole, f"{group.strip()!r} has no '<metric><=<limit>'")
    metric = m.group(1).lower()
    if metric not in METRICS:
        raise _bad(whole, f"unknown metric {metric!r}{did_you_mean(metric, METRICS)} (valid: {', '.join(METRICS)})")
    caps = []
    for item in m.group(2).split(","):
        item = item.strip()
        inner = _CAP.match(item)
        if inner:  # "bitops<=1G,bitops<=2G" repeats the metric; another metric needs ';'
            if inner.group(1).lower() != metric:
                raise _bad(whole, f"{item!r} follows a comma; join caps on different metrics with ';'")
            item = inner.group(2).strip()
        if not item:
            raise _bad(whole, "an empty limit")
        caps.append(_parse_value(metric, item, whole))
    return metric, caps


def parse_budgets(text: str) -> list[Budget]:
    """Every budget a string describes: the cartesian product of the ``;``-joined cap lists."""
    if not isinstance(text, str) or not text.strip():
        raise _bad(str(text), "it is empty")
    groups = [_parse_group(g, text) for g in text.split(";")]
    metrics = [m for m, _ in groups]
    repeated = sorted({m for m in metrics if metrics.count(m) > 1})
    if repeated:
        raise _bad(text, f"metric {repeated[0]!r} is capped twice in one budget; list alternatives with ','")
    return [Budget(tuple(caps)) for caps in itertools.product(*(caps for _, caps in groups))]


def parse_budget(text: str) -> Budget:
    """Exactly one budget; a list form (commas) is an error here."""
    budgets = parse_budgets(text)
    if len(budgets) != 1:
        raise MixbitsError(f"expected one budget but {text!r} describes {len(budgets)} "
                           f"({', '.join(b.text for b in budgets)}); give a single value per metric")
    return budgets[0]


# feasibility --------------------------------------------------------------------------------------
def _fmt(metric: str, x: float, latency: LatencyTable | None) -> str:
    if metric == "bitops":
        return f"{x / 1e9:.3g} G BitOPs"
    if metric == "size":
        return f"{x / 8e3:.3g} KB"
    return f"{x:.4g} {latency.unit if latency else ''}".rstrip()


def _fastest_policy(space: SearchSpace, latency: LatencyTable) -> Policy:
    """Each layer at its lowest-latency candidate (tables need not be monotone in bits)."""
    latency.check_covers(space)
    bits = {}
    for n in space.layers:
        w_ok, a_ok = space.candidates(n)
        bits[n] = min(((w, a) for w in w_ok for a in a_ok), key=lambda wa, n=n: latency.entry(n, *wa))
    return Policy(bits)


def check_feasible(budget: Budget, stats: ModelStats, space: SearchSpace, latency: LatencyTable | None = None) -> None:
    """Raise when even the cheapest policy in the space breaks a cap of ``budget``."""
    problems = []
    for cap in budget.caps:
        limit = cap.limit(stats, space, latency)
        if cap.metric == "latency":
            policy = _fastest_policy(space, latency)
            what = "fastest policy in the space (every layer at its fastest candidate bits)"
        else:
            policy = cheapest_policy(space)
            what = (f"cheapest policy in the space (W{min(space.w_bits)}A{min(space.a_bits)} on every searchable "
                    "layer, first/fixed layers at their bits)")
        cost = measure(cap.metric, stats, policy, latency)
        if cost > limit + 1e-9 * abs(limit):
            problems.append(f"the {what} needs {_fmt(cap.metric, cost, latency)} but {cap.text} allows "
                            f"{_fmt(cap.metric, limit, latency)}")
    if problems:
        raise MixbitsError(f"budget {budget.text} is infeasible: " + "; ".join(problems)
                           + "; raise the budget or allow lower bit-widths")
