"""The cheap policies a user would try before any search: the front's reference rows.

- ``uniform-ref``: W2A2, W3A3, W4A4; the chord through them (linear in log BitOPs) is the uniform front.
- ``mix-ref``: 2-bit weights with 3-bit activations (w2a3) and the converse (w3a2).
- ``rule-ref``: the rule of thumb of deployment tools at each budget: the first and last layers (held fixed by the
  space) and every depthwise convolution at 8 bits, every other layer at the highest uniform bits that fit.

Every reference is fine-tuned with the front's one recipe, exactly as a searched policy is.
"""

from __future__ import annotations

from mixbits import Policy, SearchSpace
from mixbits.budget import parse_budget
from mixbits.cost import ModelStats, bitops

UNIFORM_REFERENCES = ("uniform:2", "uniform:3", "uniform:4")
MIX_REFERENCES = ("uniform:w2a3", "uniform:w3a2")
RULE_BITS = 8  # what the rule gives depthwise layers, as deployment tools hold them at int8


def is_depthwise(stats: ModelStats, name: str) -> bool:
    layer = stats.layers[name]
    return layer.kind == "conv" and layer.groups > 1 and layer.groups == layer.in_shape[0]


def rule_policy(stats: ModelStats, space: SearchSpace, budget: str) -> Policy | None:
    """The deployment rule at ``budget`` (e.g. ``"bitops<=uniform:2.5"``), or None when even its 2-bit form is
    over it (its 8-bit depthwise layers cost more than the budget leaves)."""
    limit = parse_budget(budget).limits(stats, space)["bitops"]
    held = {name for name in space.searchable if is_depthwise(stats, name)}
    for bits in range(8, 1, -1):
        chosen = {name: (RULE_BITS, RULE_BITS) if name in held else (bits, bits) for name in space.searchable}
        policy = Policy({name: space.fixed.get(name) or chosen[name] for name in space.layers})
        if bitops(stats, policy) <= limit:
            return policy
    return None
