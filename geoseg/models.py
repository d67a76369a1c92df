"""Network registry: every segmentation-models-pytorch architecture by name, plus ``conv1x1``.

``conv1x1`` (a single 1x1 convolution) is a per-pixel linear model: it trains in seconds and makes a
tiled prediction that can be checked exactly against the whole-image one, so tests use it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from geoseg.bundle import ArchSpec, Contract
from geoseg.errors import BundleError, unknown_name

Builder = Callable[[ArchSpec, int, int, str | None], nn.Module]


def _smp_builder(arch: str) -> Builder:
    def build(spec: ArchSpec, in_channels: int, out_channels: int, weights: str | None) -> nn.Module:
        import segmentation_models_pytorch as smp

        return smp.create_model(
            arch, encoder_name=spec.encoder or "resnet34", encoder_weights=weights,
            in_channels=in_channels, classes=out_channels, **spec.params,
        )

    return build


def _conv1x1(spec: ArchSpec, in_channels: int, out_channels: int, weights: str | None) -> nn.Module:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, **spec.params)


_SMP_ARCHS = (
    "unet", "unetplusplus", "manet", "linknet", "fpn", "pspnet", "deeplabv3", "deeplabv3plus", "pan",
    "upernet", "segformer", "dpt",
)
ARCHITECTURES: dict[str, Builder] = {name: _smp_builder(name) for name in _SMP_ARCHS}
ARCHITECTURES["conv1x1"] = _conv1x1


def architecture_names() -> list[str]:
    return sorted(ARCHITECTURES)


def create_network(spec: ArchSpec, in_channels: int, out_channels: int,
                   encoder_weights: str | None = None) -> nn.Module:
    """Build a network from its spec.

    Args:
        spec: architecture, encoder and extra keyword arguments.
        in_channels: number of input bands.
        out_channels: number of logit channels.
        encoder_weights: pretrained encoder weights to fetch (for example ``"imagenet"``); ``None`` for
            random initialisation, which is what loading a bundle uses before reading its own weights.

    Raises:
        UnknownNameError: the architecture is not registered (the message lists the valid names).
        BundleError: the architecture rejects the arguments (for example an unknown encoder).
    """
    key = spec.architecture.lower().replace("-", "").replace("_", "")
    if key not in ARCHITECTURES:
        raise unknown_name("architecture", spec.architecture, architecture_names())
    try:
        return ARCHITECTURES[key](spec, in_channels, out_channels, encoder_weights)
    except (KeyError, ValueError, TypeError) as exc:
        raise BundleError(f"cannot build {spec.architecture} with encoder {spec.encoder!r}: {exc}") from None


def build_network(contract: Contract) -> nn.Module:
    """Build the (untrained) network a contract describes."""
    return create_network(contract.model, contract.in_channels, contract.out_channels, None)


def input_divisor(spec: ArchSpec) -> int:
    """The number a chip's height and width must be a multiple of for this network."""
    if spec.architecture.lower() == "conv1x1":
        return 1
    depth = int(spec.params.get("encoder_depth", 5))
    return 2**depth


__all__ = ["ARCHITECTURES", "architecture_names", "create_network", "build_network", "input_divisor"]
