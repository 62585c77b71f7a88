"""Which layers keep a narrow input container: those the whole graph runs with under onnxruntime's defaults.

A one-layer probe (``qdq.choose_types``) cannot see the ops between an activation and the next layer.
onnxruntime's default optimisations move a QuantizeLinear backwards across MaxPool, Reshape and
the like and then run that op on the integer codes, or fold a Clip into the QuantizeLinear; some of
those kernels and rewrites do not take 2- or 4-bit types, and the session refuses the graph. So the
whole graph is loaded and run once as deployed; when it is refused, the layers whose narrow input
type causes it are found by bisection and carried in int8/uint8 with a Clip instead (the same levels).
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import AdvisedError
from .qdq import LayerSpec, QTypes, widened

# The reason onnxruntime's default session refuses a graph built with these types, or None when it runs it.
Refusal = Callable[[dict[str, QTypes]], "str | None"]


def settle_types(types: dict[str, QTypes], specs: dict[str, LayerSpec], refusal: Refusal,
                 opset: int) -> tuple[dict[str, QTypes], list[str]]:
    """(types the whole graph runs with, the layers whose input was widened to an 8-bit container)."""
    if refusal(types) is None:
        return types, []
    wide = {name: widened(t, specs[name]) for name, t in types.items()}
    narrow = [name for name in types if wide[name] != types[name]]
    reason = refusal(wide)
    if reason is not None:
        raise AdvisedError(f"onnxruntime refuses the exported graph at opset {opset} under its default "
                           f"optimisations, even with every layer input in an 8-bit container: {reason}",
                           [("opset=13", "--opset 13")] if opset != 13 else [])

    def accepted(group: list[str]) -> list[str]:
        """The layers of ``group`` that may keep their narrow type (each alone; halves tried first)."""
        if refusal({**wide, **{name: types[name] for name in group}}) is None:
            return group
        if len(group) == 1:
            return []
        half = len(group) // 2
        return accepted(group[:half]) + accepted(group[half:])

    half = len(narrow) // 2  # the whole group is refused already: start with its halves
    keep = accepted(narrow[:half]) + accepted(narrow[half:]) if half else []
    settled = {**wide, **{name: types[name] for name in keep}}
    if keep and refusal(settled) is not None:  # accepted apart but not together: widen them all
        settled, keep = wide, []
    return settled, [name for name in narrow if name not in keep]
