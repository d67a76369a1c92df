"""Remote locations: URL schemes, the paths GDAL opens, the endpoint and credentials settings shared by GDAL
and fsspec, and the one-line errors for what the storage layer raises. Used by :mod:`geoseg.io.store` and
:mod:`geoseg.io.raster`.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from geoseg.errors import InputError, StorageError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# GDAL virtual file systems by URL scheme; http(s) keep their scheme after /vsicurl/
_GDAL_PREFIX = {
    "s3": "/vsis3/",
    "s3a": "/vsis3/",
    "gs": "/vsigs/",
    "gcs": "/vsigs/",
    "az": "/vsiaz/",
    "abfs": "/vsiaz/",
    "abfss": "/vsiaz/",
}
_TRUE = {"1", "yes", "true", "on"}
_S3_HINT = (
    "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE (AWS_NO_SIGN_REQUEST=YES for a public "
    "bucket), check the bucket name, and set AWS_ENDPOINT_URL for a non-AWS endpoint"
)


def _scheme(location: str) -> str | None:
    match = _SCHEME.match(location)
    return match.group(1).lower() if match else None


def is_remote(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URL of a remote file system (any ``scheme://`` other than ``file://``).

    Args:
        location: a local path or a URL.

    Returns:
        ``True`` for ``s3://``, ``gs://``, ``https://`` and the like; ``False`` for paths and ``file://``.
    """
    scheme = _scheme(os.fspath(location))
    return scheme is not None and scheme != "file"


def local_path(location: str) -> str:
    """``location`` without a ``file://`` prefix."""
    if _scheme(location) == "file":
        return location[len("file://") :] or "/"
    return location


def gdal_path(url: str | os.PathLike[str]) -> str:
    """The path GDAL (and so rasterio) opens for ``url``.

    ``s3://b/k`` becomes ``/vsis3/b/k``, ``gs://`` becomes ``/vsigs/``, ``az://`` becomes ``/vsiaz/``,
    ``http(s)://...`` becomes ``/vsicurl/http(s)://...``; local paths (and ``file://``) come back as a
    plain path string. Open remote paths inside ``rasterio.Env(**gdal_remote_options())`` so that GDAL
    reaches the same endpoint as fsspec.

    Args:
        url: a local path or a URL.

    Returns:
        A path string for GDAL.

    Raises:
        InputError: for a scheme GDAL has no virtual file system for.
    """
    text = os.fspath(url)
    scheme = _scheme(text)
    if scheme is None or scheme == "file":
        return local_path(text)
    if scheme in ("http", "https"):
        return "/vsicurl/" + text
    if scheme in _GDAL_PREFIX:
        return _GDAL_PREFIX[scheme] + text.split("://", 1)[1]
    raise InputError(
        f"{text}: GDAL cannot open {scheme}:// URLs; use s3://, gs://, az://, http(s):// or a local path"
    )


def _endpoint_url() -> str | None:
    """The S3 endpoint URL the AWS tools would use, from the environment (``None``: AWS itself)."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    gdal_endpoint = os.environ.get("AWS_S3_ENDPOINT", "").strip()
    if gdal_endpoint:
        if "://" in gdal_endpoint:
            return gdal_endpoint
        https = os.environ.get("AWS_HTTPS", "YES").strip().lower() not in {"no", "false", "off", "0"}
        return ("https://" if https else "http://") + gdal_endpoint
    return None


def gdal_remote_options() -> dict[str, str]:
    """GDAL config options that make ``/vsis3/`` reach the endpoint fsspec uses.

    GDAL does not read ``AWS_ENDPOINT_URL``; from it (or ``AWS_ENDPOINT_URL_S3``), e.g.
    ``http://127.0.0.1:5000``, this derives ``AWS_S3_ENDPOINT=127.0.0.1:5000``, ``AWS_HTTPS=NO`` and
    ``AWS_VIRTUAL_HOSTING=FALSE``. Options the user already set in the environment are left to GDAL,
    and nothing is added when ``AWS_S3_ENDPOINT`` is set already. Credentials, region, profile and
    ``AWS_NO_SIGN_REQUEST`` are read by GDAL from the environment itself.

    Returns:
        Options for ``rasterio.Env(**options)``; ``{}`` when there is nothing to add.
    """
    endpoint = next(
        (
            os.environ[n].strip()
            for n in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
            if os.environ.get(n, "").strip()
        ),
        None,
    )
    if endpoint is None or os.environ.get("AWS_S3_ENDPOINT"):
        return {}
    parts = urlsplit(endpoint if "://" in endpoint else "https://" + endpoint)
    derived = {
        "AWS_S3_ENDPOINT": parts.netloc,
        "AWS_HTTPS": "NO" if parts.scheme == "http" else "YES",
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }
    return {key: value for key, value in derived.items() if key not in os.environ}


def s3_storage_options() -> dict[str, Any]:
    """Keyword arguments for ``s3fs.S3FileSystem`` derived from the usual environment variables.

    The endpoint comes from ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` or GDAL's ``AWS_S3_ENDPOINT``
    (with ``AWS_HTTPS=NO`` meaning ``http://``); ``AWS_NO_SIGN_REQUEST=YES`` gives anonymous access;
    ``AWS_REGION`` or ``AWS_DEFAULT_REGION`` sets the region. Credentials are left to botocore's usual
    chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance roles).

    Returns:
        A possibly empty dict of s3fs options.
    """
    options: dict[str, Any] = {}
    endpoint = _endpoint_url()
    if endpoint:
        options["endpoint_url"] = endpoint
    if os.environ.get("AWS_NO_SIGN_REQUEST", "").strip().lower() in _TRUE:
        options["anon"] = True
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bucket_missing(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "nosuchbucket" in text or "bucket does not exist" in text


def _reason_and_hint(exc: BaseException, remote: bool) -> tuple[str, str]:
    """A short reason for ``exc`` and what the user can do about it."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if not remote:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _one_line(str(exc))
        return reason, "check that the folder exists and is writable, and that the disk has free space"
    if names & {"NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError"}:
        return "no credentials found", _S3_HINT
    if bucket_missing(exc):
        return (
            "the bucket does not exist",
            "check the bucket name (and AWS_ENDPOINT_URL for a non-AWS endpoint)",
        )
    if isinstance(exc, FileNotFoundError):
        return "no such object", "check the key and the bucket name"
    if isinstance(exc, PermissionError) or ("ClientError" in names and "denied" in str(exc).lower()):
        return (
            f"access denied: {_one_line(str(exc), 80)}",
            "check the credentials' permissions on this bucket (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "or AWS_PROFILE) and AWS_ENDPOINT_URL for a non-AWS endpoint",
        )
    if names & {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ClientConnectorError",
        "ConnectionError",
        "TimeoutError",
        "FSTimeoutError",
    } or isinstance(exc, ConnectionError | TimeoutError):
        where = _endpoint_url() or "the AWS endpoint"
        return (
            f"cannot reach {where}",
            "check the network and AWS_ENDPOINT_URL (set it for a non-AWS endpoint)",
        )
    if isinstance(exc, ImportError) or (isinstance(exc, ValueError) and "protocol" in str(exc).lower()):
        return _one_line(str(exc), 100), "install the fsspec driver for this scheme (s3fs, gcsfs, adlfs)"
    return f"{type(exc).__name__}: {_one_line(str(exc), 100)}", _S3_HINT


def storage_error(url: str, action: str, exc: BaseException, remote: bool) -> StorageError:
    """The one-line error for a failed ``action`` (``read``, ``write``, ``list``) on ``url``."""
    reason, hint = _reason_and_hint(exc, remote)
    return StorageError(f"{url}: cannot {action} ({reason}); {hint}")


@contextlib.contextmanager
def storage_errors(url: str, action: str, remote: bool) -> Iterator[None]:
    """Turn whatever the storage layer raises into a :class:`StorageError` for ``url``."""
    try:
        yield
    except (StorageError, InputError):
        raise
    except Exception as exc:  # fsspec, s3fs, aiohttp and botocore share no base class
        raise storage_error(url, action, exc, remote) from exc
