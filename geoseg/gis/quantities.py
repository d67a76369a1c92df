"""Lengths and areas with units, as the options ``min_area``, ``simplify`` and ``mmu`` are given, and the one
check of ``--connectivity``: what the GIS options of predict, vectorize and the sieve mean."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from geoseg.errors import InputError


@dataclass(frozen=True)
class Quantity:
    """A length or area with its unit: ``px`` (pixels), ``m`` / ``m2`` (metres), or ``crs`` (CRS units)."""

    value: float
    unit: str


_AREA_UNITS = {"px": ("px", 1.0), "pixel": ("px", 1.0), "pixels": ("px", 1.0), "m2": ("m2", 1.0),
               "m^2": ("m2", 1.0), "m²": ("m2", 1.0), "sqm": ("m2", 1.0), "ha": ("m2", 1e4),
               "km2": ("m2", 1e6), "km²": ("m2", 1e6)}
_LENGTH_UNITS = {"px": ("px", 1.0), "pixel": ("px", 1.0), "pixels": ("px", 1.0), "m": ("m", 1.0),
                 "km": ("m", 1e3), "crs": ("crs", 1.0), "": ("crs", 1.0)}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([^\s0-9].*?)?\s*$")


def parse_min_area(value: float | int | str | Quantity | None) -> Quantity | None:
    """Parse a minimum polygon area: ``"40px"``, ``"200m2"``, ``"0.5ha"``, ``"1km2"``.

    A plain number (or a string without unit) is in **pixels**, so it means the same in any CRS (EPSG:4326
    included); give ``m2`` for ground area.

    Raises:
        InputError: not a non-negative number with a known unit.
    """
    return _parse(value, _AREA_UNITS, "px", "--min-area", "40px, 200m2, 0.5ha or 1km2")


def parse_mmu(value: float | int | str | Quantity | None) -> Quantity | None:
    """Parse a minimum mapping unit (the sieve's threshold): ``"12px"``, ``"5000m2"``, ``"0.5ha"``, ``"1km2"``.

    The same units as :func:`parse_min_area`; a plain number is pixels.

    Raises:
        InputError: not a non-negative number with a known unit.
    """
    return _parse(value, _AREA_UNITS, "px", "--mmu", "12px, 5000m2, 0.5ha or 1km2")


def parse_simplify(value: float | int | str | Quantity | None) -> Quantity | None:
    """Parse a simplification tolerance: ``"1m"``, ``"0.5px"``, or a plain number in CRS units.

    Raises:
        InputError: not a non-negative number with a known unit.
    """
    return _parse(value, _LENGTH_UNITS, "crs", "--simplify", "1.0 (CRS units), 1m or 0.5px")


def _parse(value: Any, units: dict[str, tuple[str, float]], default: str, what: str,
           examples: str) -> Quantity | None:
    if value is None or isinstance(value, Quantity):
        return value
    if isinstance(value, bool):
        raise InputError(f"{what} {value!r} is not a number; use e.g. {examples}")
    if isinstance(value, (int, float)):
        number, unit, scale = float(value), default, 1.0
    else:
        m = _NUMBER.match(str(value))
        key = (m.group(2) or "").strip().lower() if m else None
        if m is None or key not in units and key != "":
            raise InputError(f"{what} {value!r} is not understood; use e.g. {examples}")
        unit, scale = units[key] if key else (default, 1.0)
        number = float(m.group(1))
    if not math.isfinite(number) or number < 0:
        raise InputError(f"{what} {value!r} must be a non-negative number; use e.g. {examples}")
    return Quantity(number * scale, unit)


def check_connectivity(connectivity: int) -> int:
    """The one check of ``--connectivity``."""
    if connectivity not in (4, 8):
        raise InputError(f"--connectivity {connectivity!r}: must be 4 or 8 (pixels joined by sides, or sides and "
                         "corners)")
    return connectivity
