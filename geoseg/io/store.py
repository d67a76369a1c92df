"""The one place where finished files are published, to a local folder or to object storage.

A :class:`Store` is a folder given as a local path or as a URL (``s3://bucket/prefix``). Keys are
``/``-separated names relative to it. Nothing is ever visible under a final name before it is whole:

* local: the file is built in a hidden temporary folder beside its final path (``.{name}.tmp-XXXX``)
  and moved into place with :func:`os.replace`;
* remote: the file is built locally and uploaded whole (one PUT, or a multipart upload that becomes
  visible only when it completes).

Remote access goes through fsspec (s3fs for ``s3://``). Every failure of the storage layer, whatever
library raised it, leaves this module as a one-line :class:`~geoseg.errors.StorageError` that names the
URL, what could not be done and what to try.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from geoseg.errors import InputError, StorageError
from geoseg.io.remote import (
    bucket_missing,
    gdal_path,
    gdal_remote_options,
    is_remote,
    local_path,
    s3_storage_options,
    storage_error,
    storage_errors,
)
from geoseg.io.staging import STAGING_NAME, full_disk_as_error, sweep_dead, umask_mode, unique_suffix

__all__ = [
    "Store",
    "gdal_path",
    "gdal_remote_options",
    "is_remote",
    "local_workdir",
    "s3_storage_options",
]

log = logging.getLogger(__name__)

def _clean_key(key: str) -> str:
    """``key`` as ``a/b/c``; rejects keys that would leave the store."""
    parts = [p for p in key.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InputError(f"{key!r}: store keys cannot contain '..'; give a name relative to the store")
    return "/".join(parts)


def _local_only(path: str | os.PathLike[str], what: str) -> Path:
    if is_remote(path):
        raise InputError(f"{os.fspath(path)}: {what} must be a local path, not a URL")
    return Path(local_path(os.fspath(path)))


class Store:
    """A folder that is a local path or an object-storage URL. Keys are '/'-separated relative names.

    Creating a store touches nothing; :meth:`prepare` creates the local folder or checks the bucket.

    Attributes:
        location: the folder as given, normalised: no trailing slash, ``file://`` removed.
        remote: whether ``location`` is a URL (``s3://``, ``gs://``, ...).
    """

    location: str
    remote: bool

    def __init__(self, location: str | os.PathLike[str]) -> None:
        text = os.fspath(location)
        self.remote = is_remote(text)
        if self.remote:
            scheme, rest = text.split("://", 1)
            rest = rest.strip("/")
            if not rest:
                raise InputError(f"{text}: no bucket in the URL; write it as {scheme}://bucket/prefix")
            self.location = f"{scheme.lower()}://{rest}"
        else:
            text = local_path(text)
            if not text:
                raise InputError("an empty path is not a store location; give a folder path or a URL")
            stripped = text.rstrip("/" + os.sep)
            self.location = stripped or text[:1]
        self._fs: Any = None

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Store) and other.location == self.location

    def __hash__(self) -> int:
        return hash(self.location)

    def __getstate__(self) -> dict[str, Any]:
        # a file-system client holds sockets and an event loop; workers build their own
        state = dict(self.__dict__)
        state["_fs"] = None
        return state

    # -- addressing ---------------------------------------------------------------------------------

    def url(self, key: str = "") -> str:
        """The location of ``key``: joined with ``/`` for a remote store, ``os.path.join`` for a local one.

        Args:
            key: a ``/``-separated name relative to the store; ``""`` is the store itself.

        Raises:
            InputError: when ``key`` contains ``..``.
        """
        clean = _clean_key(key)
        if not clean:
            return self.location
        if self.remote:
            return f"{self.location}/{clean}"
        return os.path.join(self.location, *clean.split("/"))

    def _local(self, key: str) -> Path:
        return Path(self.url(key))

    @property
    def _filesystem(self) -> Any:
        """The fsspec file system of a remote store, built on first use; listings are never cached."""
        if self._fs is None:
            if not self.remote:
                raise InputError(f"{self.location}: a local store has no fsspec file system")
            import fsspec

            protocol = self.location.split("://", 1)[0]
            options: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}
            if protocol in ("s3", "s3a"):
                options.update(s3_storage_options())
            with storage_errors(self.location, "access", remote=True):
                self._fs = fsspec.filesystem(protocol, **options)
        return self._fs

    # -- queries ------------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        """Whether a file or a non-empty sub-folder ``key`` exists (always asks the storage, no cache).

        Raises:
            StorageError: when the storage cannot be asked (credentials, network).
        """
        url = self.url(key)
        if not self.remote:
            return os.path.lexists(url)
        with storage_errors(url, "read", remote=True):
            self._filesystem.invalidate_cache(url)
            return bool(self._filesystem.exists(url))

    def list(self, key: str = "") -> list[str]:
        """The names directly inside the sub-folder ``key``: files and sub-folders, sorted.

        Temporary names this module leaves while it stages files are not listed.

        Returns:
            Names without a trailing slash; ``[]`` when ``key`` is absent or is a file.

        Raises:
            StorageError: when the folder or bucket cannot be listed.
        """
        url = self.url(key)
        if not self.remote:
            try:
                names = os.listdir(url)
            except (FileNotFoundError, NotADirectoryError):
                return []
            except OSError as exc:
                raise storage_error(url, "list", exc, remote=False) from exc
        else:
            fs = self._filesystem
            with storage_errors(url, "list", remote=True):
                fs.invalidate_cache(url)
                own = fs._strip_protocol(url).rstrip("/")
                try:
                    entries = fs.ls(url, detail=False)
                except FileNotFoundError as exc:
                    if bucket_missing(exc):
                        raise
                    return []
            paths = [str(e).rstrip("/") for e in entries]
            if paths == [own]:  # ls of a file lists the file itself
                return []
            names = [p.rsplit("/", 1)[-1] for p in paths if p != own]
        return sorted({n for n in names if n and not STAGING_NAME.match(n)})

    def read_text(self, key: str) -> str | None:
        """The UTF-8 text of the file ``key``, or ``None`` when it does not exist.

        Raises:
            StorageError: when the file exists but cannot be read, or the bucket is missing.
        """
        url = self.url(key)
        if not self.remote:
            try:
                return Path(url).read_text(encoding="utf-8")
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise storage_error(url, "read", exc, remote=False) from exc
        with storage_errors(url, "read", remote=True):
            try:
                data = self._filesystem.cat_file(url)
            except FileNotFoundError as exc:
                if bucket_missing(exc):
                    raise
                return None
        return bytes(data).decode("utf-8")

    # -- publishing ---------------------------------------------------------------------------------

    def write_text(self, key: str, text: str) -> str:
        """Write ``text`` (UTF-8) as the file ``key``, whole: readers see the old file or the new one.

        Returns:
            The URL (or path) of the file.

        Raises:
            StorageError: when it cannot be written.
        """
        url = self.url(key)
        if self.remote:
            with storage_errors(url, "write", remote=True):
                self._filesystem.pipe_file(url, text.encode("utf-8"))
            return url
        with self.staged_file(key) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return url

    def publish(self, local_file: str | os.PathLike[str], key: str) -> str:
        """Make the finished ``local_file`` the file ``key``, whole; the local file is consumed.

        Local store: :func:`os.replace` when on the same file system, otherwise a copy to a hidden
        temporary file beside the destination, then :func:`os.replace`. Remote store: one upload (a single
        PUT or a multipart upload, visible only once complete), then the local file is deleted.

        Args:
            local_file: a finished local file.
            key: its name in the store.

        Returns:
            The URL (or path) of the published file.

        Raises:
            InputError: when ``local_file`` is a URL.
            StorageError: when ``local_file`` is not a file, or the destination cannot be written.
        """
        src = _local_only(local_file, "the file to publish")
        url = self.url(key)
        if not _clean_key(key):
            raise InputError(f"{url}: publish needs a key naming the file inside the store")
        if not src.is_file():
            raise StorageError(
                f"{src}: cannot publish as {url} (not a file); write the file before publishing it"
            )
        if self.remote:
            with storage_errors(url, "write", remote=True):
                self._filesystem.put_file(str(src), url)
            src.unlink()
            log.debug("uploaded %s to %s", src, url)
            return url
        dest = Path(url)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(src, dest)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                tmp = dest.with_name(f".{dest.name}.tmp-{unique_suffix()}")
                try:
                    shutil.copyfile(src, tmp)
                    shutil.copymode(src, tmp)
                    os.replace(tmp, dest)
                finally:
                    tmp.unlink(missing_ok=True)
                src.unlink()
        except OSError as exc:
            raise storage_error(url, "write", exc, remote=False) from exc
        log.debug("published %s", dest)
        return url

    def fetch(self, key: str, dest: str | os.PathLike[str]) -> Path:
        """Copy the file ``key`` to the local file ``dest`` (whole: via a temporary file beside it).

        Returns:
            ``dest`` as a :class:`~pathlib.Path`.

        Raises:
            InputError: when ``dest`` is a URL.
            StorageError: when ``key`` does not exist or cannot be read, or ``dest`` cannot be written.
        """
        target = _local_only(dest, "the fetch destination")
        url = self.url(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{unique_suffix()}")
        try:
            if self.remote:
                with storage_errors(url, "read", remote=True):
                    self._filesystem.get_file(url, str(tmp))
            else:
                try:
                    shutil.copyfile(url, tmp)
                except OSError as exc:
                    raise storage_error(url, "read", exc, remote=False) from exc
            try:
                os.replace(tmp, target)
            except OSError as exc:
                raise storage_error(str(target), "write", exc, remote=False) from exc
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def remove(self, key: str) -> None:
        """Remove the file or the whole sub-folder ``key``; nothing happens when it is absent.

        Raises:
            InputError: for an empty key (removing the whole store is refused).
            StorageError: when it cannot be removed.
        """
        url = self.url(key)
        if not _clean_key(key):
            raise InputError(
                f"{url}: remove needs a key inside the store; refusing to remove the store itself"
            )
        if self.remote:
            with storage_errors(url, "write", remote=True):
                self._filesystem.invalidate_cache(url)
                if self._filesystem.exists(url):
                    self._filesystem.rm(url, recursive=True)
            return
        try:
            if os.path.isdir(url) and not os.path.islink(url):
                shutil.rmtree(url)
            else:
                os.unlink(url)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise storage_error(url, "write", exc, remote=False) from exc

    def prepare(self) -> None:
        """Make the store usable: create a local folder, or check that a bucket answers (one list call).

        Raises:
            StorageError: when the folder cannot be created, or the bucket is missing, unreachable or
                refuses the credentials.
        """
        if not self.remote:
            try:
                os.makedirs(self.location, exist_ok=True)
            except OSError as exc:
                raise storage_error(self.location, "write", exc, remote=False) from exc
            return
        fs = self._filesystem
        with storage_errors(self.location, "list", remote=True):
            if self.location.startswith(("s3://", "s3a://")):
                bucket, _, prefix = fs._strip_protocol(self.location).partition("/")
                fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
            else:
                with contextlib.suppress(FileNotFoundError):
                    fs.ls(self.location, detail=False)

    # -- staging ------------------------------------------------------------------------------------

    def _staging_folder(self, key: str, what: str) -> tuple[Path, str]:
        """A new hidden folder in which ``key`` is built, and the final name of ``key``."""
        clean = _clean_key(key)
        if not clean:
            raise InputError(f"{self.location}: {what} needs a key naming an entry inside the store")
        name = clean.rsplit("/", 1)[-1]
        if self.remote:
            return Path(tempfile.mkdtemp(prefix=f"geoseg-{name}.tmp-")), name
        final = self._local(clean)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            sweep_dead(final.parent, f".{name}.tmp-")
            while True:
                # not mkdtemp: its 0700 mode would stay on a published folder; mkdir honours the umask
                folder = final.parent / f".{name}.tmp-{unique_suffix()}"
                with contextlib.suppress(FileExistsError):
                    folder.mkdir()
                    return folder, name
        except OSError as exc:
            raise storage_error(str(final), "write", exc, remote=False) from exc

    @contextlib.contextmanager
    def staged_file(self, key: str) -> Iterator[Path]:
        """A local path to write ``key`` to; published as ``key`` when the block ends normally.

        The path does not exist yet and has the final file name (so drivers that go by the extension
        work); it lies in a hidden folder ``.{name}.tmp-XXXX`` beside the final file for a local store, in
        :func:`tempfile.gettempdir` for a remote one. Anything else written into that folder (GDAL
        sidecars) is discarded. When the block raises, the staged file is removed and ``key`` is left as
        it was.

        Yields:
            The local path to write.

        Raises:
            StorageError: when nothing was written to the path, or publishing fails.
        """
        folder, name = self._staging_folder(key, "staged_file")
        try:
            with full_disk_as_error(self.location, folder):  # measured before the partial file goes
                path = folder / name
                yield path
                if not path.is_file():
                    raise StorageError(
                        f"{self.url(key)}: cannot write (nothing was written to the staged file "
                        f"{path}); write the file inside the 'with' block"
                    )
                umask_mode(path)
                self.publish(path, key)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @contextlib.contextmanager
    def staged_dir(self, key: str) -> Iterator[Path]:
        """A local empty folder to fill; it becomes the sub-folder ``key`` when the block ends normally.

        Local store: the old folder is replaced whole (renamed aside, the new one moved in, the old one
        deleted). Remote store: the old objects under ``key`` are removed, then every file is uploaded
        (each object whole; the folder as a whole is not atomic on object storage). When the block raises,
        the staged folder is removed and ``key`` is left as it was.

        Yields:
            The local folder to fill.

        Raises:
            StorageError: when publishing fails.
        """
        folder, name = self._staging_folder(key, "staged_dir")
        try:
            with full_disk_as_error(self.location, folder):
                yield folder
                if self.remote:
                    self._upload_tree(folder, key)
                else:
                    for f in folder.rglob("*"):
                        if f.is_file():
                            umask_mode(f)
                    self._replace_dir(folder, self._local(key))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _upload_tree(self, folder: Path, key: str) -> None:
        clean = _clean_key(key)
        self.remove(clean)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            self.publish(path, f"{clean}/{rel}")
        log.debug("uploaded folder %s", self.url(clean))

    def _replace_dir(self, folder: Path, dest: Path) -> None:
        old = dest.with_name(f".{dest.name}.old-{unique_suffix()}")
        try:
            if os.path.lexists(dest):
                os.replace(dest, old)
            try:
                os.replace(folder, dest)
            except OSError:
                if os.path.lexists(old):
                    os.replace(old, dest)  # put the old one back
                raise
        except OSError as exc:
            raise storage_error(str(dest), "write", exc, remote=False) from exc
        finally:
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            elif os.path.lexists(old):
                os.unlink(old)
        log.debug("published folder %s", dest)


def parent_and_name(location: str | os.PathLike[str]) -> tuple[Store, str]:
    """The store holding the file ``location`` (a path or URL) and the file's name in it."""
    folder, _, name = os.fspath(location).replace("\\", "/").rstrip("/").rpartition("/")
    return Store(folder or "."), name


def local_workdir(store: Store, name: str) -> Path:
    """A local scratch folder for building the outputs of ``store``; created if needed.

    Beside the outputs (hidden ``.geoseg-work-<name>``) for a local store, so that finished files move
    into place without a copy; under :func:`tempfile.gettempdir` for a remote store (named after
    ``name`` and the store's URL, so two stores never share one).

    Args:
        store: the store the outputs go to.
        name: a short name for the job (a file-name-safe string).

    Returns:
        The folder.

    Raises:
        StorageError: when it cannot be created.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "job"
    if store.remote:
        digest = hashlib.sha1(store.location.encode("utf-8")).hexdigest()[:10]
        folder = Path(tempfile.gettempdir()) / f"geoseg-work-{safe}-{digest}"
    else:
        folder = Path(store.location) / f".geoseg-work-{safe}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(str(folder), "write", exc, remote=False) from exc
    return folder


def staged_directory(dst: Path) -> contextlib.AbstractContextManager[Path]:
    """A hidden temporary folder beside ``dst`` that replaces ``dst`` whole only if the block succeeds."""
    store = Store(dst.parent)
    store.prepare()
    return store.staged_dir(dst.name)


def staged_file(dst: Path) -> contextlib.AbstractContextManager[Path]:
    """A temporary path beside ``dst`` that becomes ``dst`` whole only if the block succeeds."""
    store = Store(dst.parent)
    store.prepare()
    return store.staged_file(dst.name)
