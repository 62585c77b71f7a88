"""Building blocks every command shares: a model from its config, a quantized model from a policy, and
any trained model rebuilt from its checkpoint alone.

A checkpoint's ``extra`` holds a *model card*: the model factory and its arguments, the search space,
the policy and the quantizer options. That is all ``load_trained`` needs, so ``mixbits eval`` or an
exporter never has to be told how a run was configured.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig, QuantConfig, read_yaml
from .data import DataConfig
from .data.batches import one_batch
from .data.layout import build, describe, first_tensor
from .errors import MixbitsError
from .models import create
from .quant import apply_policy, initialize_steps, quantize_model
from .quant.attention import prepare_model
from .space import Policy, SearchSpace
from .space import training_space as space_training_space
from .train import load_checkpoint, load_model_state
from .utils import read_text


@dataclass
class ModelCard:
    """How to rebuild a model: the factory, its arguments, and (if quantized) the space and policy."""

    name: str
    num_classes: int
    in_chans: int
    kwargs: dict
    input_shape: tuple[int, ...]  # one sample's
    space: SearchSpace | None = None
    policy: Policy | None = None
    per_channel: bool = False
    input_dtype: str = "float32"  # "int64" for token ids
    # Several inputs (a tuple or dict batch): their layout (mixbits.data.layout); input_shape and input_dtype then
    # describe the first tensor. None for one input tensor.
    input_layout: dict | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "num_classes": self.num_classes, "in_chans": self.in_chans, "kwargs": self.kwargs,
                "input_shape": list(self.input_shape), "per_channel": self.per_channel, "input_dtype": self.input_dtype,
                "input_layout": self.input_layout, "space": self.space.to_dict() if self.space else None,
                "policy": self.policy.to_dict() if self.policy else None}

    @classmethod
    def from_dict(cls, d: dict) -> ModelCard:
        return cls(d["name"], d["num_classes"], d["in_chans"], dict(d["kwargs"]), tuple(d["input_shape"]),
                   SearchSpace.from_dict(d["space"]) if d.get("space") else None,
                   Policy.from_dict(d["policy"]) if d.get("policy") else None, bool(d.get("per_channel", False)),
                   str(d.get("input_dtype", "float32")), d.get("input_layout"))

    def layout(self) -> dict:
        """The layout of the model's inputs (see mixbits.data.layout)."""
        return self.input_layout or {"shape": list(self.input_shape), "dtype": self.input_dtype}

    def example_input(self, rows: int = 1, generator: torch.Generator | None = None):
        """An input of the model's layout, shapes and dtypes with ``rows`` samples: zeros (token id 0 for a token
        model), or standard normal floats drawn from ``generator``. A tensor, or a tuple or dict of them."""
        return build(self.layout(), rows, generator)

    def record_input(self, example) -> None:
        """Take the input layout, shapes and dtypes from a batch of the training data."""
        layout = describe(example)
        first = first_tensor(layout)
        self.input_shape, self.input_dtype = tuple(first["shape"]), first["dtype"]
        self.input_layout = None if "shape" in layout else layout

    def float_model(self) -> nn.Module:
        """The float model, its attention split into quantizable projections (mixbits.quant.prepare_model)."""
        model = create(self.name, num_classes=self.num_classes, in_chans=self.in_chans, **self.kwargs)
        prepare_model(model)
        return model


def float_card(cfg: ModelConfig, num_classes: int, in_chans: int, image_size: tuple[int, int]) -> ModelCard:
    return ModelCard(cfg.name, num_classes, in_chans, dict(cfg.kwargs), (in_chans, *image_size))


def search_space(model: nn.Module, quant: QuantConfig, example_input=None) -> SearchSpace:
    """The configured space; ``example_input`` finds the layers that read the input (the "first" ones)."""
    return SearchSpace.from_model(model, quant.w_bits, quant.a_bits, _fixed(quant), tuple(quant.fixed_bits),
                                  example_input=example_input)


def training_space(model: nn.Module, quant: QuantConfig, policy_spec: str,
                   example_input=None) -> tuple[SearchSpace, Policy]:
    """The policy to train and the narrowest space holding it (see :func:`mixbits.space.training_space`)."""
    return space_training_space(model, policy_spec, fixed=_fixed(quant), fixed_bits=tuple(quant.fixed_bits),
                                example_input=example_input)


def _fixed(quant: QuantConfig):
    return quant.fixed if isinstance(quant.fixed, str) else list(quant.fixed)


def quantized_model(card: ModelCard, float_model: nn.Module, calibration: torch.Tensor | None,
                    init: str = "fitted") -> nn.Module:
    """``float_model`` quantized to the card's space and set to its policy; its steps initialised by ``init`` on the
    ``calibration`` batch (none when trained weights and steps are loaded next)."""
    if card.space is None:
        return float_model
    model = quantize_model(float_model, card.space, per_channel=card.per_channel, inplace=True)
    if card.policy is not None:
        apply_policy(model, card.policy)
    if calibration is not None:
        initialize_steps(model, one_batch(calibration), init)
    return model


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the checkpoint.pt inside a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise MixbitsError(f"no checkpoint at {str(path)!r}; give a checkpoint.pt or the run directory holding one")
    return path


def read_card(saved: dict, source: Path) -> ModelCard:
    card = saved.get("extra", {}).get("model_card")
    if not isinstance(card, dict):
        raise MixbitsError(f"{source} holds no model card; it was not written by `mixbits train` or `mixbits search`")
    return ModelCard.from_dict(card)


def load_trained(path: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, ModelCard, dict]:
    """(model with trained weights, its card, the raw checkpoint) from a checkpoint file or run directory."""
    source = resolve_checkpoint(path)
    saved = load_checkpoint(source)
    card = read_card(saved, source)
    model = quantized_model(card, card.float_model(), calibration=None)
    load_model_state(model, saved["model"], str(source))
    if card.policy is not None:
        apply_policy(model, card.policy)
    return model.to(device), card, saved


def saved_data_config(run: str | os.PathLike, data_dir: str | None = None) -> DataConfig:
    """The data settings a run was trained with (its config.yaml's ``data`` section), ``data_dir`` applied.

    A run without config.yaml gets the defaults; a config.yaml that is unreadable, not a mapping or holds
    a malformed ``data`` section is one error naming the file.
    """
    config_file = resolve_checkpoint(run).parent / "config.yaml"
    data = DataConfig()
    if config_file.is_file():
        where = f"run config {str(config_file)!r}"
        saved = read_yaml(read_text(config_file, "run config"), where) or {}
        fields = saved.get("data", {}) if isinstance(saved, dict) else None
        if not isinstance(fields, dict):
            raise MixbitsError(f"{where} must be a mapping with a 'data' section, as `mixbits train` writes it; "
                               "repair or remove it (without it the default data settings are used)")
        data = DataConfig(**{k: v for k, v in fields.items() if k in DataConfig.__dataclass_fields__})
    if data_dir:
        data.root = data_dir
    return data
