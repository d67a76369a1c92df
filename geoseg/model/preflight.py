"""Preflight: does a scene fit a model's contract? Checked before any model work, on the scene's header alone."""

from __future__ import annotations

from dataclasses import dataclass

from geoseg.errors import BundleError
from geoseg.io.raster import SceneInfo
from geoseg.model.contract import Contract

__all__ = ["Preflight", "check_scene"]


@dataclass
class Preflight:
    """The outcome of checking a bundle against one scene: which scene bands feed the model."""

    band_indexes: list[int]
    warnings: list[str]


def _bands_by_name(contract: Contract, scene: SceneInfo) -> list[int] | None:
    """Scene band numbers whose descriptions are the model's band names (any case), or None."""
    where = {(d or "").strip().casefold(): i + 1 for i, d in enumerate(scene.descriptions) if d}
    idx = [where.get(name.strip().casefold()) for name in contract.input.bands]
    return [i for i in idx if i is not None] if all(idx) else None


def _training_scene_bands(contract: Contract) -> int | None:
    """How many bands the training scenes had, when the contract says or its indexes imply it.

    Recorded as ``input.scene_bands`` by training; for older bundles, recorded indexes ``1..n`` that
    training chose by default (no ``data.bands`` in the training config) mean scenes of ``n`` bands.
    Indexes chosen explicitly (``[4, 3, 2]``, or ``data.bands`` set) say nothing about the count.
    """
    spec = contract.input
    if spec.scene_bands is not None:
        return spec.scene_bands
    if spec.band_indexes is None or spec.band_indexes != list(range(1, len(spec.bands) + 1)):
        return None
    training = contract.metadata.get("training")
    config = training.get("config") if isinstance(training, dict) else None
    data = config.get("data") if isinstance(config, dict) else None
    if isinstance(data, dict) and data.get("bands"):
        return None
    return len(spec.bands)


def _ambiguous_bands(contract: Contract, scene: SceneInfo, trained_on: int | None = None) -> list[int]:
    need = contract.in_channels
    first = ",".join(str(i) for i in contract.input.default_indexes)
    had = f", was trained on scenes of {trained_on}" if trained_on is not None else ""
    raise BundleError(
        f"{scene.path}: has {scene.count} bands but model {contract.name!r} takes {need} "
        f"({', '.join(contract.input.bands)}){had} and the scene's band names do not say which; choose them "
        f"with --bands (e.g. --bands {first}), or name the scene's bands like the model's"
    )


def check_scene(contract: Contract, scene: SceneInfo, bands: list[int] | None = None) -> Preflight:
    """Check that a scene fits the contract before any model work.

    Args:
        contract: the model contract.
        scene: the scene as described by :func:`geoseg.io.raster.inspect_scene`.
        bands: 1-based scene band numbers feeding the model inputs in order (the ``--bands`` flag);
            default: the contract's ``input.band_indexes``, else bands 1..n.

    Raises:
        BundleError: band count or numbers that do not fit.
    """
    need = contract.in_channels
    names = ", ".join(contract.input.bands)
    if scene.dtype.startswith("complex"):
        raise BundleError(f"{scene.path}: has complex values ({scene.dtype}), which no model takes; convert it to "
                          "real bands first (the amplitude of SAR data: gdal_translate with a VRT pixel function "
                          "'mod', or gdal_translate -ot Float32 for the real part)")
    if bands is not None:
        if len(bands) != need:
            raise BundleError(
                f"{scene.path}: --bands gives {len(bands)} band(s) but model {contract.name!r} takes {need} "
                f"({names}); give {need} comma-separated scene band numbers"
            )
        idx = list(bands)
    else:
        idx = contract.input.default_indexes
        data_bands = scene.count - (1 if scene.alpha_band else 0)
        trained_on = _training_scene_bands(contract)
        if (contract.input.band_indexes is None and data_bands > need) or (
                trained_on is not None and data_bands > trained_on):
            idx = _bands_by_name(contract, scene) or _ambiguous_bands(contract, scene, trained_on)
    bad = [i for i in idx if not 1 <= i <= scene.count]
    if bad:
        hint = ",".join(["1"] * need) if scene.count == 1 else ",".join(str(min(i, scene.count)) for i in idx)
        raise BundleError(
            f"{scene.path}: has {scene.count} band(s) but model {contract.name!r} reads band(s) "
            f"{','.join(map(str, idx))} for its inputs ({names}); map scene bands to model inputs "
            f"with --bands, e.g. --bands {hint}"
        )
    warnings: list[str] = []
    unused = [i for i in range(1, scene.count + 1) if i not in idx and i != scene.alpha_band]
    if unused:
        warnings.append(f"{scene.path}: model {contract.name!r} reads band(s) {','.join(map(str, idx))}; "
                        f"band(s) {','.join(map(str, unused))} are not used")
    want = contract.input.pixel_size
    have = scene.pixel_size_m
    if want and have and not 0.5 <= have / want <= 2.0:
        warnings.append(
            f"{scene.path}: pixel size {have:.3g} m is far from the {want:.3g} m model {contract.name!r} "
            "was trained at; expect poor results (resample the scene, or use a model trained at this scale)"
        )
    if contract.input.dtype and scene.dtype != contract.input.dtype:
        warnings.append(
            f"{scene.path}: dtype {scene.dtype} differs from the {contract.input.dtype} model "
            f"{contract.name!r} was trained on; its normalisation may not fit"
        )
    return Preflight(idx, warnings)
