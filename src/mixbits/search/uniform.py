"""The baseline every mixed policy must beat: the highest uniform bit-width that fits the budget."""

from __future__ import annotations

from ..errors import MixbitsError
from .base import SEARCHERS, SearchContext, SearchResult, cheapest_fitting_uniform


@SEARCHERS.register("uniform")
def uniform_search(ctx: SearchContext) -> SearchResult:
    """Uniform LSQ QAT: every searchable layer at the highest W{b}A{b} within the budget."""
    if ctx.options:
        raise MixbitsError(f"search method 'uniform' takes no options, got {sorted(ctx.options)}")
    policies, trace = [], []
    for budget in ctx.budgets:
        policy = cheapest_fitting_uniform(ctx, budget)
        if policy is None:
            raise MixbitsError(f"no uniform policy of the space fits budget {budget}; the lowest shared bit-width "
                               f"is {min(set(ctx.space.w_bits) & set(ctx.space.a_bits), default=None)}")
        policies.append(policy)
        trace.append({"budget": budget.text, "bits": policy[ctx.space.searchable[0]], **ctx.cost(policy)})
    return SearchResult("uniform", list(ctx.budgets), policies, trace=trace)
