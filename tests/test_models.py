"""Model zoo: every registered model builds, runs forward/backward, and has the published size."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from mixbits import MixbitsError
from mixbits.models import MODELS, create, list_models
from mixbits.models.vit import TinyViT
from mixbits.quant.attention import prepare_model

IMAGENET_STYLE = {"resnet18", "resnet50", "mobilenetv2"}
SIZED = {"vit_tiny"}  # built for one image size (learned positions)
# Weights that are not a layer's: normalisation scales, a transformer's class token and positions.
UNQUANTIZED_PARAMETERS = (nn.BatchNorm2d, nn.LayerNorm, TinyViT)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.cache
def default_model(name: str, num_classes: int = 10) -> nn.Module:
    """One shared instance per (name, num_classes) for the read-only tests; building ResNet-50 is not free."""
    torch.manual_seed(0)
    return create(name, num_classes=num_classes, in_chans=3)


def sweep_cases():
    """(name, in_chans, kwargs, image size) for every registered model; ImageNet-style ones kept small."""
    for name in list_models():
        for in_chans in (1, 3):
            if name in IMAGENET_STYLE:
                # Exercise both stems: the ImageNet one at 64 px, the small-input one at 16 px.
                kwargs, size = ({}, 64) if in_chans == 3 else ({"small_input": True}, 16)
            else:
                kwargs, size = {}, (32 if in_chans == 3 else 16)
            if name in SIZED:
                kwargs = {"image_size": size}
            yield pytest.param(name, in_chans, kwargs, size, id=f"{name}-c{in_chans}")


@pytest.mark.parametrize("name, in_chans, kwargs, size", list(sweep_cases()))
def test_forward_backward(name, in_chans, kwargs, size):
    torch.manual_seed(0)
    model = create(name, num_classes=7, in_chans=in_chans, **kwargs)
    out = model(torch.randn(2, in_chans, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for param_name, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {param_name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {param_name} has a non-finite gradient"
    assert sum(float(p.grad.abs().sum()) for p in model.parameters()) > 0


@pytest.mark.parametrize("name", list_models())
def test_no_shared_modules_and_only_swappable_weight_layers(name):
    model = copy.deepcopy(default_model(name))
    prepare_model(model)  # attention's packed projections become Linear layers
    all_entries = list(model.named_modules(remove_duplicate=False))
    assert len(all_entries) == len(dict(model.named_modules())), "a module object is reused under two names"
    weight_layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert weight_layers, "expected at least one Conv2d/Linear"
    for m in model.modules():
        # Every other learnable weight must live in a Conv2d or Linear, so the quantizers can swap it.
        if not isinstance(m, (nn.Conv2d, nn.Linear, *UNQUANTIZED_PARAMETERS)):
            assert not list(m.parameters(recurse=False)), f"{type(m).__name__} owns parameters"


@pytest.mark.parametrize("name", list_models())
def test_docstring_first_line_describes_model(name):
    assert MODELS.describe()[name]


@pytest.mark.parametrize(
    "name, num_classes, expected",
    [
        ("resnet20", 10, 269_722),
        ("resnet32", 10, 464_154),
        ("resnet56", 10, 853_018),
        ("resnet18", 1000, 11_689_512),
        ("resnet50", 1000, 25_557_032),
        ("mobilenetv2", 1000, 3_504_872),
    ],
)
def test_published_param_counts(name, num_classes, expected):
    assert num_params(default_model(name, num_classes)) == expected


def test_small_cnn_is_small_and_accepts_tiny_inputs():
    model = create("small_cnn", num_classes=10, in_chans=3)
    assert num_params(model) < 100_000
    for size in (8, 13, 40):
        assert model(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_unknown_model_lists_valid_names():
    with pytest.raises(MixbitsError) as info:
        create("nope")
    for name in list_models():
        assert name in str(info.value)


def test_unknown_kwarg_is_refused_naming_the_options():
    expected = r"resnet20 takes no option 'depth'; its options: shortcut, width\. Did you mean 'width'\?"
    with pytest.raises(MixbitsError, match=expected):
        create("resnet20", depth=7)


def test_bad_num_classes_is_rejected():
    with pytest.raises(MixbitsError):
        create("small_cnn", num_classes=0)


def cifar_resnet_params(blocks_per_stage, widths, in_chans=3, num_classes=10, shortcut="A"):
    """Closed-form parameter count of a CIFAR ResNet: 3x3 convs, 2 params per BN channel, linear head."""
    total = 9 * in_chans * widths[0] + 2 * widths[0]
    prev = widths[0]
    for stage_index, c in enumerate(widths):
        total += blocks_per_stage * (18 * c * c + 4 * c) + 9 * prev * c - 9 * c * c
        if shortcut == "B" and stage_index > 0:  # stride-2 transitions project even at equal widths
            total += prev * c + 2 * c
        prev = c
    return total + widths[-1] * num_classes + num_classes


def test_closed_form_matches_resnet20():
    assert cifar_resnet_params(3, (16, 32, 64)) == 269_722


def test_shortcut_b_adds_two_projection_convs():
    base = num_params(create("resnet20"))
    option_b = num_params(create("resnet20", shortcut="B"))
    # 1x1 conv + BN at the two stage transitions: 16->32 and 32->64.
    assert option_b - base == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert num_params(create("resnet20", shortcut="b")) == option_b
    with pytest.raises(MixbitsError):
        create("resnet20", shortcut="C")


@pytest.mark.parametrize("width, widths", [(0.5, (8, 16, 32)), (2.0, (32, 64, 128)), (0.1, (4, 4, 6))])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_width_scales_channels(width, widths, shortcut):
    model = create("resnet20", width=width, shortcut=shortcut)
    assert num_params(model) == cifar_resnet_params(3, widths, shortcut=shortcut)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_cifar_option_a_handles_non_doubling_widths():
    model = create("resnet20", width=0.3)  # 5/10/19 channels: the pad is not half the output width
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_mobilenetv2_width_and_small_input():
    full = num_params(default_model("mobilenetv2", 1000))
    half = num_params(create("mobilenetv2", num_classes=1000, width=0.5))
    assert half < full
    assert num_params(create("mobilenetv2", num_classes=1000, small_input=True)) == full
    convs = [m for m in create("mobilenetv2", width=0.5).modules() if isinstance(m, nn.Conv2d)]
    depthwise = [m for m in convs if m.groups > 1]
    assert len(depthwise) == 17  # one per inverted residual block
    assert all(m.groups == m.in_channels == m.out_channels and m.kernel_size == (3, 3) for m in depthwise)


def test_resnet_small_input_stem():
    model = create("resnet18", small_input=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert num_params(model) == num_params(default_model("resnet18")) - 64 * 3 * (49 - 9)


def test_torchvision_layer_names():
    resnet18_keys = set(default_model("resnet18").state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer2.0.downsample.0.weight", "layer4.1.bn2.bias", "fc.weight"} <= (
        resnet18_keys
    )
    resnet50_keys = set(default_model("resnet50").state_dict())
    assert {"layer1.0.downsample.1.weight", "layer3.5.conv3.weight", "fc.bias"} <= resnet50_keys
    mobilenet_keys = set(default_model("mobilenetv2").state_dict())
    assert {
        "features.0.0.weight",
        "features.1.conv.0.0.weight",
        "features.1.conv.1.weight",
        "features.2.conv.1.0.weight",
        "features.2.conv.3.running_mean",
        "features.18.0.weight",
        "classifier.1.weight",
    } <= mobilenet_keys


def test_creation_is_deterministic_under_seed():
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = create("resnet20").eval()
        outputs.append(model(torch.ones(1, 3, 32, 32)))
    assert torch.equal(outputs[0], outputs[1])
