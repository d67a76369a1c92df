"""Resume: what a job has finished, recorded beside its outputs.

Two records, both in the output folder (local or object storage), so that any machine can resume a job:

- ``geoseg-manifest.json``: the finished scenes, each with the fingerprint of the settings that made it
  and its output files. Written by the job's driver after a scene's outputs are all published, never before.
- ``.geoseg-staging/<stem>/``: a scene being made. ``settings.json`` holds its fingerprint; ``classes/``,
  ``probabilities/`` and ``confidence/`` hold finished strips, each published whole, so a strip file *is* the record that the
  strip is done. The folder is removed once the scene is in the manifest.

The resume rule: the same command run again skips every scene in the manifest with the same fingerprint
(and its files present), reuses the staged strips of a scene under the same fingerprint, and discards
staging made under other settings. Outputs that exist without a record are refused unless ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from geoseg.errors import OutputExistsError
from geoseg.io.remote import storage_error
from geoseg.io.store import Store
from geoseg.predict.units import SETTINGS_FILE, STAGED_KINDS, STAGING, ScenePlan, parse_strip

log = logging.getLogger(__name__)

MANIFEST = "geoseg-manifest.json"


class Manifest:
    """The finished scenes of an output folder (see the module docstring). Only the driver writes it."""

    def __init__(self, output_dir: str):
        self.store = Store(output_dir)
        text = self.store.read_text(MANIFEST)
        try:
            data = json.loads(text) if text else {}
        except json.JSONDecodeError:
            log.warning("%s: unreadable manifest; finished scenes will be recomputed", self.store.url(MANIFEST))
            data = {}
        self.scenes: dict[str, dict[str, Any]] = data.get("scenes", {}) if isinstance(data, dict) else {}

    def is_done(self, plan: ScenePlan) -> bool:
        """Whether ``plan``'s scene was finished under the same fingerprint and its files are all there."""
        rec = self.scenes.get(plan.stem)
        if rec is None or rec.get("fingerprint") != plan.fingerprint:
            return False
        return all(self.store.exists(name) for name in rec.get("files", []))

    def record(self, plan: ScenePlan, files: list[str]) -> None:
        """Record a finished scene (``files``: its output names in the folder) and write the manifest."""
        self.scenes[plan.stem] = {"scene": plan.scene, "fingerprint": plan.fingerprint, "files": files,
                                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.store.write_text(MANIFEST, json.dumps({"geoseg_manifest": 1, "scenes": self.scenes}, indent=1) + "\n")


def staging_matches(plan: ScenePlan) -> bool:
    """Whether the scene has staging made under the same fingerprint (an interrupted run of this job)."""
    return Store(plan.staging).read_text(SETTINGS_FILE) == plan.fingerprint


def prepare_staging(plan: ScenePlan) -> bool:
    """Make the scene's staging folder ready; returns whether an earlier run's strips are reused.

    Staging made under another fingerprint is removed; temporary files of a killed run are removed.
    """
    stage = Store(plan.staging)
    if staging_matches(plan):
        for kind in STAGED_KINDS:
            for name in stage.list(kind):
                if parse_strip(name) is None:
                    stage.remove(f"{kind}/{name}")
        return bool(stage.list("classes"))
    Store(plan.output_dir).remove(f"{STAGING}/{plan.stem}")
    stage.prepare()
    stage.write_text(SETTINGS_FILE, plan.fingerprint)
    return False


def drop_staging(plan: ScenePlan) -> None:
    """Remove a scene's staging folder, and the staging root when it is left empty."""
    root = Store(plan.output_dir)
    root.remove(f"{STAGING}/{plan.stem}")
    if not root.list(STAGING):
        root.remove(STAGING)


def stale_staging(out: Store, stems: set[str]) -> list[str]:
    """Staging folders in ``out`` of scenes other than ``stems``: unfinished scenes of earlier, killed runs.

    They are kept (running their command again resumes them); the job reports them so they are not
    forgotten. Returns their locations.
    """
    return [out.url(f"{STAGING}/{name}") for name in out.list(STAGING) if name not in stems]


LOCK = ".geoseg.lock"  # in a local output folder while a job writes into it


@contextlib.contextmanager
def folder_lock(out: Store) -> Iterator[None]:
    """Refuse a second job writing into the same local output folder at the same time.

    An advisory ``flock`` on ``<folder>/.geoseg.lock``: the operating system releases it when the process
    ends, however it ends (SIGKILL included), so a killed run never blocks the next one. Object storage
    has no such lock; there, one driver per output prefix is the user's rule (docs/limits.md).

    Raises:
        OutputExistsError: another live process holds the folder.
    """
    try:
        import fcntl
    except ImportError:  # not on a POSIX system
        yield
        return
    if out.remote:
        yield
        return
    path = Path(out.url(LOCK))
    try:
        f = open(path, "a+")  # noqa: SIM115 (held for the whole block)
    except OSError as exc:  # the first write into the folder: a read-only or foreign folder ends here
        raise storage_error(out.location, "write", exc, remote=False) from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        who = f.read().strip() or "another process"
        f.close()
        raise OutputExistsError(f"{out.location}: another geoseg run ({who}) is writing into this folder; wait "
                                "for it to end, or write into another folder") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        f.close()
