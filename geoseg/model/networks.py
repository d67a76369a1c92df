"""Network registry: every segmentation-models-pytorch architecture by name, plus ``conv1x1``.

``conv1x1`` (a single 1x1 convolution) is a per-pixel linear model: it trains in seconds and makes a
tiled prediction that can be checked exactly against the whole-image one, so tests use it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from geoseg.errors import BundleError, ConfigError, unknown_name
from geoseg.model.contract import ArchSpec, Contract, PretrainedSource, input_divisor

log = logging.getLogger(__name__)


def first_output(logits: Any) -> torch.Tensor:
    """The logits of a network that may return ``(mask, label)`` (smp models with an auxiliary head)."""
    return logits[0] if isinstance(logits, (tuple, list)) else logits

Builder = Callable[[ArchSpec, int, int, str | None], nn.Module]


def _smp_builder(arch: str) -> Builder:
    def build(spec: ArchSpec, in_channels: int, out_channels: int, weights: str | None) -> nn.Module:
        import segmentation_models_pytorch as smp

        return smp.create_model(  # type: ignore[no-any-return]
            arch, encoder_name=spec.encoder or "resnet34", encoder_weights=weights,
            in_channels=in_channels, classes=out_channels, **spec.params,
        )

    return build


def is_local_file(weights: str) -> bool:
    return weights.endswith((".pth", ".pt", ".safetensors", ".ckpt")) or os.sep in weights or os.path.isfile(weights)


def _first_conv_key(encoder: nn.Module) -> str | None:
    """The state-dict key of the encoder's first convolution (the one that sees the input bands)."""
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{name}.weight"
    return None


def load_encoder_weights(net: nn.Module, path: str, band_names: list[str] | None = None) -> PretrainedSource:
    """Pretrained encoder weights from a local file (:mod:`geoseg.model.pretrained` says which files).

    With band names on both sides (the file's ``bands`` metadata and ``band_names``, the network's input
    bands in order) the first convolution is built band by band: a band the file has takes its filter, a band
    it lacks is initialised as smp initialises extra bands. Otherwise a first convolution pretrained on another
    number of bands is adapted as smp adapts ImageNet weights (summed to one band, or cycled and rescaled).

    Returns:
        Where the encoder came from, for the bundle's contract.

    Raises:
        ConfigError: naming ``model.encoder_weights`` when the file is missing, unreadable, does not fit the
            encoder, or shares no band with ``band_names``.
    """
    from geoseg.model.pretrained import first_conv_for_bands, match_bands, read_encoder_file

    key = "model.encoder_weights"
    weights = read_encoder_file(path)
    state = dict(weights.state)
    encoder: nn.Module = net.encoder  # type: ignore[assignment]
    own = encoder.state_dict()
    first = _first_conv_key(encoder)
    matched: list[str | None] | None = None
    if band_names and weights.bands and first in state and first in own and state[first].ndim == 4 \
            and state[first].shape[1] == len(weights.bands):
        sources = match_bands(band_names, weights)
        state[first] = first_conv_for_bands(state[first], sources)
        matched = [", ".join(weights.bands[j] for j in src) or None for src in sources]
        log.info("bands from %s: %s", os.path.basename(path),
                 ", ".join(f"{b} <- {m or 'initialised'}" for b, m in zip(band_names, matched, strict=True)))
    else:
        for k, v in list(state.items()):
            mine = own.get(k)
            if mine is not None and v.ndim == 4 and mine.ndim == 4 and v.shape[1] != mine.shape[1] \
                    and v.shape[0] == mine.shape[0] and v.shape[2:] == mine.shape[2:]:
                state[k] = _adapt_first_conv(v, mine.shape[1])
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if bad or len(missing) == len(own):
        what = f"shapes differ at {bad[0]} ({tuple(state[bad[0]].shape)} vs {tuple(own[bad[0]].shape)})" if bad \
            else "none of its keys is a weight of this encoder"
        made = f", made for {weights.encoder}" if weights.encoder else ""
        raise ConfigError(f"{key} {path!r}: does not fit encoder {type(encoder).__name__} ({what}{made}); give "
                          "weights of the same model.encoder")
    encoder.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    log.info("encoder weights from %s (%d tensors%s)", path, len(own) - len(missing),
             f"; {len(missing)} of the encoder's left at random, e.g. {missing[0]}" if missing else "")
    if unexpected:
        log.info("%d tensors of %s are not in the encoder (ignored), e.g. %s", len(unexpected), path, unexpected[0])
    return weights.source(matched)


def _adapt_first_conv(weight: torch.Tensor, bands: int) -> torch.Tensor:
    """smp's rule for pretrained first convolutions on another number of input bands."""
    if bands == 1:
        return weight.sum(dim=1, keepdim=True)
    have = weight.shape[1]
    idx = torch.arange(bands) % have
    return weight[:, idx] * (have / bands)


def _conv1x1(spec: ArchSpec, in_channels: int, out_channels: int, weights: str | None) -> nn.Module:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, **spec.params)


@functools.lru_cache(maxsize=1)
def _smp_architectures() -> tuple[str, ...]:
    """smp's own registry of architectures (``dpt`` and any later one included where the installed smp has it)."""
    import segmentation_models_pytorch as smp

    mapping = getattr(smp, "MODEL_ARCHITECTURES_MAPPING", None)
    if mapping:
        return tuple(mapping)
    base = smp.base.SegmentationModel  # older smp: its model classes
    return tuple(sorted(n.lower() for n, c in vars(smp).items() if isinstance(c, type) and issubclass(c, base)
                        and c is not base))


def _architectures() -> dict[str, Builder]:
    archs: dict[str, Builder] = {name: _smp_builder(name) for name in _smp_architectures()}
    archs["conv1x1"] = _conv1x1
    return archs


def architecture_names() -> list[str]:
    return sorted(_architectures())


def create_network(spec: ArchSpec, in_channels: int, out_channels: int,
                   encoder_weights: str | None = None, band_names: list[str] | None = None) -> nn.Module:
    """Build a network from its spec.

    Args:
        spec: architecture, encoder and extra keyword arguments.
        in_channels: number of input bands.
        out_channels: number of logit channels.
        encoder_weights: pretrained encoder weights: a name smp downloads (``"imagenet"``) or a local file
            (:func:`load_encoder_weights`); ``None`` for random initialisation, which is what loading a bundle
            uses before reading its own weights.
        band_names: the input bands' names in order, matched to a weights file's bands.

    Returns:
        The network; with pretrained weights, its attribute ``geoseg_pretrained`` (a
        :class:`geoseg.model.contract.PretrainedSource`) says where they came from.

    Raises:
        UnknownNameError: the architecture is not registered (the message lists the valid names).
        BundleError: the architecture rejects the arguments (for example an unknown encoder).
        ConfigError: a local weights file that cannot be used.
    """
    key = spec.architecture.lower().replace("-", "").replace("_", "")
    archs = _architectures()
    if key not in archs:
        raise unknown_name("architecture", spec.architecture, architecture_names())
    local = encoder_weights is not None and is_local_file(encoder_weights)
    try:
        net = archs[key](spec, in_channels, out_channels, None if local else encoder_weights)
    except ConfigError:
        raise
    except (KeyError, ValueError, TypeError) as exc:
        raise BundleError(f"cannot build {spec.architecture} with encoder {spec.encoder!r}: {exc}") from None
    if encoder_weights is not None and hasattr(net, "encoder"):
        source = load_encoder_weights(net, encoder_weights, band_names) if local else PretrainedSource(
            file=encoder_weights, encoder=spec.encoder, pretrained_on=f"{encoder_weights} (smp download)")
        net.geoseg_pretrained = source  # type: ignore[assignment]  # recorded in the contract
    return net


def build_network(contract: Contract) -> nn.Module:
    """Build the (untrained) network a contract describes, without the modules it never calls."""
    net = create_network(contract.model, contract.in_channels, contract.out_channels, None)
    drop_modules(net, contract.model.unused)
    return net


def drop_modules(net: nn.Module, names: list[str]) -> None:
    """Replace the named submodules by ``nn.Identity`` (their parameters leave the state dict)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        if not hasattr(parent, child):
            raise BundleError(f"the network has no module {name!r} to drop; the contract's model.unused does not "
                              "fit its architecture")
        setattr(parent, child, nn.Identity())


def unused_modules(net: nn.Module, in_channels: int, size: int) -> list[str]:
    """The outermost submodules holding weights that one forward pass of a ``size`` px chip never calls.

    smp builds every encoder stage whatever ``encoder_depth`` is: at depth 3 a resnet34 U-Net uses 1.4 M of
    its 21.4 M parameters. The list is checked: without those modules the network must give the same
    output, else nothing is dropped.
    """
    called: set[str] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: called.add(name))
             for name, m in net.named_modules() if name]
    was_training = net.training
    net.eval()
    x = torch.randn(1, in_channels, size, size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            ref = first_output(net(x))
    finally:
        for h in hooks:
            h.remove()
    # a container (ModuleList, ModuleDict) is never called itself: a module is in use when it or any module
    # inside it was called
    used = {name.rsplit(".", k)[0] for name in called for k in range(name.count(".") + 1)}
    names: list[str] = []
    for name, m in net.named_modules():
        if not name or name in used or any(name.startswith(n + ".") for n in names):
            continue
        if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
            names.append(name)
    if names:
        import copy

        trial = copy.deepcopy(net)
        drop_modules(trial, names)
        with torch.no_grad():
            try:
                same = torch.equal(first_output(trial(x)), ref)
            except Exception:  # a module used other than by calling it: keep everything
                same = False
        if not same:
            log.info("could not drop the network's unused modules (%s); keeping them", ", ".join(names[:3]))
            names = []
    net.train(was_training)
    return names


# ---------------------------------------------------------------------------------- the network of a config


__all__ = ["architecture_names", "build_network", "create_network", "drop_modules", "first_output", "input_divisor",
           "is_local_file", "unused_modules"]
