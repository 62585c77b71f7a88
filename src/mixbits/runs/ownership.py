"""What a configured run checks before it writes: that it owns its directory, and that a resume asks for
the run that was started.

A run directory is held by one process for the run's life (:func:`mixbits.rundir.claim_output_dir`); under
torchrun rank 0 holds it and every rank gets its verdict. A resume compares the whole configuration asked
for with the run's config.yaml and refuses any difference, naming each changed setting: a run resumed at
another policy, budget, method or data recipe would report a mix of two runs as one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..config import RunConfig, read_yaml
from ..errors import MixbitsError
from ..rundir import changed_settings, claim_output_dir, flat_settings, settings_differ
from ..train import DistContext, broadcast_object
from ..utils import read_text

CONFIG = "config.yaml"
# Settings a resume may change: where things are and how fast they run, never what is computed.
RESUME_MAY_CHANGE = {"out", "device", "data.root", "train.checkpoint_every", "train.compile", "quant.fused"}


@contextlib.contextmanager
def owned_run(cfg: RunConfig, job: str, ctx: DistContext, *, force: bool, resume: bool) -> Iterator[Path]:
    """``cfg.out`` held as ``job``'s for the block (rank 0 holds it; every rank raises what rank 0 found), and on
    resume checked against the configuration the run was started with."""
    run_dir = Path(cfg.out)
    with contextlib.ExitStack() as stack:
        problem = None
        if ctx.is_main():
            try:
                stack.enter_context(claim_output_dir(run_dir, job, force=force, resume=resume))
            except MixbitsError as e:
                problem = e
        shared = broadcast_object(None if problem is None else str(problem))
        if problem is not None:
            raise problem
        if shared is not None:
            raise MixbitsError(shared)
        if resume:
            check_same_config(cfg, run_dir)
        yield run_dir


def check_same_config(cfg: RunConfig, run_dir: Path) -> None:
    """Refuse a resume of ``run_dir`` whose settings differ from its config.yaml, naming every changed setting."""
    path = run_dir / CONFIG
    if not path.is_file():
        return  # a run that never got as far as its config: the checkpoint checks (train settings) still apply
    where = f"{str(path)!r}"
    recorded = read_yaml(read_text(path, "run config"), where)
    if not isinstance(recorded, dict):
        raise MixbitsError(f"run config {where} is not a mapping of settings; it was not written by mixbits, "
                           "so this run cannot be resumed: start a new one with another --out")
    asked = flat_settings(cfg.to_dict(), whole={"model.kwargs", "search.options"})
    changes = changed_settings(flat_settings(recorded, whole={"model.kwargs", "search.options"}), asked,
                               RESUME_MAY_CHANGE)
    if changes:
        raise MixbitsError(f"cannot resume {str(run_dir)!r}: {settings_differ(changes)} from the run's {CONFIG} "
                           f"(recorded -> asked): {', '.join(changes)}; resume with the "
                           f"recorded settings (`--out {run_dir} --resume` alone reads them), or start a new run "
                           "with another --out")
