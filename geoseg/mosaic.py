"""Job-level GIS outputs: one mosaic over a job's class maps, so the whole job opens as one layer."""

from __future__ import annotations

import logging

from geoseg.store import Store, gdal_path

log = logging.getLogger(__name__)


def write_mosaic(class_maps: list[str], out: Store, name: str) -> list[str]:
    """Write ``<name>.vrt`` (one per CRS when the maps differ: ``<name>.<crs>.vrt``) into ``out``.

    Args:
        class_maps: the job's class maps (paths or URLs), in job order; later ones are drawn on top.
        out: the output folder holding them.
        name: the job's name.

    Returns:
        The paths or URLs written.
    """
    from geoseg.vrt import mosaic_vrts

    docs = mosaic_vrts([gdal_path(m) for m in class_maps], name)
    written = [out.write_text(filename, xml) for filename, xml in docs.items()]
    log.info("mosaic of %d class maps: %s", len(class_maps), ", ".join(written))
    return written
