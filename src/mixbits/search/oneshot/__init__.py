"""One-shot weight-coupling mixed-precision search, retraining-free (Tang et al. 2024, seed 002).

Train one weight-sharing supernet, then find one policy per budget by an inference-only greedy walk;
the policies run on the supernet's weights without retraining. Modules, one job each:

- ``options``: the options dataclass and its validation;
- ``bit_scheduler``: policy sampling, the unstable-weight criterion (Eq. 6) and Top-K freezing (Eq. 7);
- ``idm``: information distortion mitigation (Eq. 8);
- ``supernet``: the objective and hooks run by ``mixbits.train.fit`` (K sampled policies, fair decay);
- ``searcher``: ``--method oneshot``: supernet, scoring, greedy walks (``search/greedy.py``, with the
  neighbours replaying the blocks they share with the current policy: ``search/prefix.py``).

From the paper: shared latent weights with one LSQ step per weight bit-width (the quantization core);
K uniformly sampled policies per step with accumulated gradients (Eq. 2); the unstable-weight criterion
with ε = 0.25 and s(b) = 1/2^(b-1) (Eq. 6); Top-K freezing of the selected layers' smallest weight
bit-width for a period, K decreasing on a cosine (Eq. 7); the rectified, channel-normalised feature
alignment with learnable affine when a layer runs at its smallest bit-width (Eq. 8); no weight decay for
low-bit weights; the bidirectional greedy search with J = L̄_val + λ·BitOPs̄ (min-max normalised), λ = 1.5,
stopping once the budget holds (Eq. 9); candidates {2..6}, first and last layers at 8 bits (the space);
weight decay 2.5e-5.

Ours (each an option, see ``options.py`` and docs/search.md): the largest policy as the teacher of
in-place distillation (½·CE + ½·KL) for the sampled ones, run forward only (the released code also trains
it with CE: ``largest: train``); the mean of the trained passes' losses; freezing events at fractions of
training (first after 10 %, then every 10 %), K from
0.5·L to 0.2·L (the released code's ratios); IDM on the layer's own output, target detached with an
identity affine, distance divided by sqrt(elements per sample), floor Q = 0, weight 0.1; "low-bit" for
fair decay = the smallest candidate weight bit-width, decay scaled by the share of non-low-bit passes;
per-policy BatchNorm statistics by default: each score normalises with the statistics of the 1024 scored
validation images themselves (``score_bn: batch``; ``recalibrate`` re-estimates running statistics on
training batches first, twice the forwards; ``pair`` is the released code's one BatchNorm per bit-width
pair, ``quant.pair_bn``), and every returned policy is recalibrated on 32 training batches before it is
tested; one sampled policy per step, the largest and the smallest on every 2nd step; the supernet starts from
MSE-fitted steps; after each walk a fill raises w or a one step at a time while the budget holds; the walk
starts at the highest candidates, never revisits a policy, goes descending-only after 2x the descents
to the bottom, and moves up to 10 % of the layers a step (``stride``: the step's next-best descents);
J's cost term is the budget's own metric (Σ cost/cap: BitOPs/cap equals the paper's normalised BitOPs),
so size and latency budgets work too; budgets with the same cost term share one walk; the walk's steps and
the fill are screened on 128 of the scored images; ``keep_weights`` lets a fine-tune start from the supernet.
"""

from . import searcher  # noqa: F401  (registers "oneshot")
