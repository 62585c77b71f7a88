"""Quantize a model at a policy, evaluate it, export it, and take a subnet out of a one-shot supernet.

Each verb takes a plain ``nn.Module`` and never changes it: the quantized model is a copy.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable

import torch
from torch import nn

from ..data.batches import Batches, first_input, one_batch
from ..errors import MixbitsError
from ..export import pack_model
from ..layer_types import kept_float
from ..quant import apply_policy, initialize_steps, quant_layers, quantize_model
from ..quant.attention import prepare_model
from ..quant.pair_bn import PairBatchNorm, collapse_pair_bn
from ..rundir import claim_output_dir
from ..search import SearchResult
from ..space import Policy, SearchSpace, training_space
from ..train import SUBNET_BN_BATCHES, recalibrate_bn
from ..train import evaluate as evaluate_loader
from ..train.evaluate import LossFn
from ..utils import atomic_write_text, staged_files
from .arguments import check_device, check_model, check_optional_callable, check_path

PolicySpec = Policy | str | os.PathLike


def prepared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every nn.MultiheadAttention has quantizable linear projections."""
    if quant_layers(model):
        raise MixbitsError(f"{type(model).__name__} is already quantized; pass the float model")
    model = copy.deepcopy(model)
    prepare_model(model)
    return model


def quantize(model: nn.Module, policy: PolicySpec, example_input, *, space: SearchSpace | None = None,
             per_channel: bool = False, init: str = "fitted") -> nn.Module:
    """A quantized copy of the float ``model`` at ``policy``, its steps set on ``example_input``, in eval mode.

    ``policy`` is a :class:`Policy`, ``"uniform:4"``, ``"uniform:w8a8"`` or a policy JSON path. Any bit-width
    in 2..8 works, whatever a search's candidates were: the quantizers hold exactly the bits the policy
    uses. ``space`` (a search's) says which layers are quantized and which are held fixed; by default
    every Conv2d/Linear, with the first and last fixed. ``init``: ``"fitted"`` (default) sets each step to the
    one that minimises the rounding error on ``example_input``, where every search starts too; ``"lsq"`` uses
    LSQ's initial step, which clips heavy-tailed layers (``quant/fit.py``).
    """
    qmodel, _ = _quantized(prepared_copy(check_model(model)), policy, example_input, space, per_channel, init)
    return qmodel.eval()


def _quantized(model: nn.Module, policy: PolicySpec, example_input, space: SearchSpace | None,
               per_channel: bool, init: str = "fitted") -> tuple[nn.Module, Policy]:
    """``model`` (prepared, modified in place) quantized at ``policy``, its steps initialised by ``init``."""
    train_space, policy = training_space(model, policy, space, example_input=example_input)
    qmodel = quantize_model(model, train_space, per_channel=per_channel, inplace=True)
    # At the policy first: a fitted activation step sees its input as the earlier layers quantize it.
    apply_policy(qmodel, policy)
    with torch.no_grad():
        initialize_steps(qmodel, one_batch(example_input), init)
    return qmodel, policy


def evaluate(model: nn.Module, data: Iterable, *, loss_fn: LossFn | None = None,
             device: str | torch.device = "cpu") -> dict:
    """``{"top1", "loss", "samples"}`` of ``model`` over ``(inputs, targets)`` batches (cross-entropy), or
    ``{"loss", "samples"}`` with ``loss_fn(model, batch)`` for any other task."""
    check_model(model)
    check_optional_callable(loss_fn, "loss_fn")
    check_device(device)
    return evaluate_loader(model, Batches(data, "data"), device, loss_fn=loss_fn)


def export(model: nn.Module, out_dir: str | os.PathLike, example_input, *, opset: int | None = None,
           formats: Iterable[str] = ("onnx", "packed"), check: bool = True, check_inputs=None,
           force: bool = False) -> dict:
    """Write a quantized model to ``out_dir``: model.onnx (checked with onnxruntime on ``check_inputs``,
    default ``example_input``), model.mxb (bit-packed weights), policy.json and export_report.json.

    ``example_input`` is a batch of the model's inputs: a tensor of any shape and dtype (images, token
    ids, vectors, sequences), or a tuple or dict of tensors (positional or keyword arguments). The check
    compares every output the model returns: top-1 agreement where the first output is class scores
    (N, classes), relative error for any output; ``check=False`` skips it. Nothing is left in ``out_dir``
    when the export fails. ``out_dir`` must be new, empty or an earlier ``mixbits.export``'s: files another
    job wrote are replaced only with ``force=True`` (as ``mixbits export --force``), and one process writes
    it at a time. Returns the report. ``load_packed(path, model=float_model)`` reads model.mxb back into
    your model.
    """
    from ..export import export_onnx

    check_model(model)
    check_path(out_dir, "out_dir", optional=False)
    formats = list(formats)
    unknown = [f for f in formats if f not in ("onnx", "packed")]
    if unknown or not formats:
        raise MixbitsError(f"formats={formats!r} is not understood; use a list of 'onnx' and 'packed'")
    layers = quant_layers(model)
    if not layers:
        raise MixbitsError(f"{type(model).__name__} is not quantized; export the model mixbits.quantize or "
                           "mixbits.finetune returned")
    policy = Policy({name: layer.bits for name, layer in layers.items()})
    model = model.eval()
    report: dict = {"model": type(model).__name__, "policy": policy.describe()}
    with claim_output_dir(out_dir, "export", force=force, flag="out_dir") as out, staged_files(out) as stage:
        policy.save(stage / "policy.json")  # the files move in together at the end, or none of them
        if "onnx" in formats:
            checked = None
            if check:
                checked = check_inputs if check_inputs is not None else one_batch(example_input)
            report["onnx"] = export_onnx(model, example_input, stage / "model.onnx", opset=opset,
                                         check_inputs=checked).to_dict()
        if "packed" in formats:
            report["packed"] = pack_model(model, stage / "model.mxb", input_shape=example_input).to_dict()
        report["kept_float"] = kept_float(model, layers)
        for fmt, name in (("onnx", "model.onnx"), ("packed", "model.mxb")):
            if fmt in report:  # where the file lands, not where it was staged
                report[fmt]["path"] = str(out / name)
        atomic_write_text(stage / "export_report.json", json.dumps(report, indent=2) + "\n")
    return report


def subnet(result: SearchResult, index: int = 0, *, policy: Policy | None = None, bn_data: Iterable | None = None,
           bn_batches: int = SUBNET_BN_BATCHES, device: str | torch.device = "cpu") -> nn.Module:
    """Policy ``index`` of a retraining-free search (one-shot) on the supernet's own weights, no fine-tune;
    ``policy``: this policy instead (e.g. one of ``result.info["random_baseline"]["policies"]``).

    A copy of the supernet set to the policy, with BatchNorm statistics re-estimated on ``bn_batches``
    batches of ``bn_data`` (the training data; a subnet's statistics differ from the supernet's). A supernet
    trained with one BatchNorm per bit-width pair (``score_bn: pair``) uses the policy's own statistics
    instead; the subnet then holds them as plain BatchNorm layers.
    """
    if not isinstance(result, SearchResult):
        raise MixbitsError(f"result must be the SearchResult mixbits.search returned, got {type(result).__name__}")
    if not result.retraining_free or result.model is None:
        raise MixbitsError(f"the {result.method!r} search has no trained supernet to run policies on; fine-tune "
                           "its policies with mixbits.finetune, or search with method='oneshot'")
    if not 0 <= index < len(result.policies):
        raise MixbitsError(f"index {index} is out of range; the search found {len(result.policies)} policies")
    if policy is not None:
        policy.validate(result.space)
    model = copy.deepcopy(result.model)
    apply_policy(model, policy if policy is not None else result.policies[index])
    if any(isinstance(m, PairBatchNorm) for m in model.modules()):
        return collapse_pair_bn(model).eval()
    if bn_data is not None:
        recalibrate_on_first_batches(model, Batches(bn_data, "bn_data"), bn_batches, device)
    return model.eval()


def recalibrate_on_first_batches(model: nn.Module, batches: Batches, count: int, device) -> None:
    """Re-estimate ``model``'s BatchNorm statistics on the first ``count`` batches of epoch 0: the same batches
    whatever epoch a search or fine-tune left the loader at."""
    batches.set_epoch(0)
    recalibrate_bn(model, batches, count, device=device)


def example_of(data: Iterable, example_input) -> torch.Tensor:
    return example_input if example_input is not None else first_input(data)
