"""Where a :class:`~blobleases.postgres_storage.PostgresStorage` keeps its
bytes: an S3-compatible object store or a directory every host mounts.

A tier stores whole blobs under a key made from the content id only
(``<prefix>/<algorithm>/<first two hex>/<hex>``), never overwrites one
with other bytes, and knows nothing of leases: the index decides when a
key may be written or deleted. Every tier guarantees:

* :meth:`BlobTier.put` makes the object appear whole or not at all (a
  crash or a server stopped mid-upload leaves nothing visible under the
  key); it does not replace an object already there (``If-None-Match: *``
  on S3 for blobs sent in one request, a hard link on a filesystem): it
  returns False then, having written nothing;
* :meth:`BlobTier.list_keys` yields every key with its size in ascending
  order of the content id it names (``str(cid)``, bytewise; keys that name
  none may come anywhere), holding a bounded part of the listing at a time
  (S3 pages are sorted by key; a directory is walked one sorted directory at
  a time), so the index can merge it with its rows in bounded memory;
* :meth:`BlobTier.read_range` returns exactly the bytes asked for, or
  raises :class:`ObjectMissing` (no object) / :class:`ObjectShort` (fewer
  bytes than asked); with ``exact=False``, those up to the object's end;
* every other failure is a :class:`~blobleases.errors.StorageError`.

The S3 client is boto3: on the local SeaweedFS it moved 16 MiB PUT+GET as
fast as obstore (within the noise of a loaded machine, both about 110-240
MiB/s), and obstore cannot be used in a forked child (its Rust runtime's
threads do not survive fork: every call there hangs), which this store
must support.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

from . import gil_free
from .content_id import ContentId
from .errors import StorageError

__all__ = [
    "BlobTier",
    "DirectoryTier",
    "ObjectMissing",
    "ObjectShort",
    "S3Tier",
    "open_tier",
]

#: Blobs larger than this go up in a multipart upload of parts this large.
MULTIPART_PART = 8 << 20


class ObjectMissing(StorageError):
    """The tier has no object under the key."""


class ObjectShort(StorageError):
    """The object under the key has fewer bytes than the index says."""


class BlobTier(Protocol):
    """What the index needs of a blob tier (see the module docstring)."""

    url: str

    def key(self, cid: ContentId) -> str: ...

    def put(self, key: str, parts: Iterable[Any], size: int) -> bool: ...

    def read_range(self, key: str, offset: int, length: int, *, exact: bool = True) -> bytes: ...

    def iter_object(self, key: str, size: int) -> Iterator[bytes]: ...

    def size_of(self, key: str) -> int | None: ...

    def delete(self, key: str) -> None: ...

    def list_keys(self) -> Iterator[tuple[str, int]]: ...

    def cid_of(self, key: str) -> ContentId | None: ...

    def after_fork(self) -> None: ...

    def close(self) -> None: ...


def _object_key(prefix: str, cid: ContentId) -> str:
    hexd = cid.hex
    return f"{prefix}{cid.algorithm}/{hexd[:2]}/{hexd}"


def _cid_from_key(prefix: str, key: str) -> ContentId | None:
    if not key.startswith(prefix):
        return None
    parts = key[len(prefix) :].split("/")
    if len(parts) != 3 or parts[1] != parts[2][:2]:
        return None
    try:
        return ContentId.parse(f"{parts[0]}-{parts[2]}")
    except ValueError:
        return None


class S3Tier:
    """Blobs in an S3 bucket: ``s3://bucket/prefix``, the endpoint from
    ``?endpoint=`` or ``AWS_ENDPOINT_URL``, the region from ``?region=`` or
    ``AWS_REGION``, credentials from the usual AWS environment variables
    (never from the url, which is shown and pickled)."""

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme.lower() != "s3" or not parts.netloc:
            raise ValueError(f"blobs {url!r}: expected s3://bucket/prefix")
        self.bucket = parts.netloc
        prefix = parts.path.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(options) - {"endpoint", "region"})
        if unknown:
            raise ValueError(f"blobs {url!r}: unknown option(s) {', '.join(unknown)}")
        self.endpoint = options.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL") or None
        self.region = (
            options.get("region")
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        shown = {k: v for k, v in options.items() if v}
        query = f"?{urlencode(shown)}" if shown else ""
        self.url = f"s3://{self.bucket}/{prefix}{query}" if prefix else f"s3://{self.bucket}{query}"
        self.timeout = timeout
        try:
            import boto3
            import botocore.config
            import botocore.exceptions
        except ImportError as exc:  # pragma: no cover - without the extra
            raise ImportError(
                "the s3:// blob tier needs boto3: pip install 'blobleases[postgres]'"
            ) from exc
        self._boto3 = boto3
        self._config = botocore.config.Config(
            s3={"addressing_style": "path"} if self.endpoint else {},
            retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=min(timeout, 10.0),
            read_timeout=timeout,
            max_pool_connections=16,
        )
        self._client_error = botocore.exceptions.ClientError
        self._boto_error = botocore.exceptions.BotoCoreError
        self._pid = -1
        self._s3: Any = None
        self._lock = threading.Lock()
        #: Keys per ListObjectsV2 request (at most 1000 on S3).
        self.list_page_size = 1000
        self._client()

    def _client(self) -> Any:
        """This process's boto3 client for this endpoint, region and
        credentials (shared by the tiers of a process: making one costs tens
        of milliseconds; a forked child makes its own and never touches the
        parent's pooled sockets)."""
        if self._pid == os.getpid():
            return self._s3
        with self._lock:
            if self._pid != os.getpid():
                if self._s3 is not None:
                    _INHERITED_CLIENTS.append(self._s3)
                ident = (
                    os.getpid(),
                    self.endpoint,
                    self.region,
                    self.timeout,
                    os.environ.get("AWS_ACCESS_KEY_ID"),
                    os.environ.get("AWS_SECRET_ACCESS_KEY"),
                    os.environ.get("AWS_SESSION_TOKEN"),
                    os.environ.get("AWS_PROFILE"),
                )
                with _CLIENTS_LOCK:
                    client = _CLIENTS.get(ident)
                    if client is None:
                        client = _CLIENTS[ident] = self._new_client()
                self._s3 = client
                self._pid = os.getpid()
        return self._s3

    def _new_client(self) -> Any:
        try:
            return self._boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint, region_name=self.region, config=self._config
            )
        except Exception as exc:
            raise StorageError(f"blobs {self.url}: {exc}") from exc

    def key(self, cid: ContentId) -> str:
        return _object_key(self.prefix, cid)

    def cid_of(self, key: str) -> ContentId | None:
        return _cid_from_key(self.prefix, key)

    def _code(self, exc: BaseException) -> str:
        if isinstance(exc, self._client_error):
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return str(error.get("Code") or status or "")
        return ""

    def _fail(self, what: str, key: str, exc: BaseException) -> StorageError:
        if self._code(exc) in ("NoSuchKey", "404", "NotFound"):
            return ObjectMissing(f"s3://{self.bucket}/{key} is missing ({what})")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return StorageError(f"s3 {what} of s3://{self.bucket}/{key}: {type(exc).__name__}: {first}")

    def put(self, key: str, parts: Iterable[Any], size: int) -> bool:
        s3 = self._client()
        try:
            if size <= MULTIPART_PART:
                body = b"".join(gil_free.to_bytes(p) for p in parts) if size else b""
                # An empty PUT on a connection of the shared pool leaves
                # SeaweedFS stalling that connection's next request until the
                # read timeout (measured: the next PUT took read_timeout, then
                # its retry got 412): it goes over a connection of its own.
                one = s3 if size else self._new_client()
                try:
                    one.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
                except self._client_error as exc:
                    if self._code(exc) in (
                        "PreconditionFailed",
                        "412",
                        "ConditionalRequestConflict",
                    ):
                        return False
                    raise
                finally:
                    if one is not s3:
                        with contextlib.suppress(Exception):
                            one.close()
                return True
            # Multipart (no conditional create): the parts become visible only
            # when the upload completes. The key names the content, so an
            # object already there holds the same bytes: left as it is.
            if self.size_of(key) == size:
                return False
            upload = s3.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
            try:
                done = []
                for number, part in enumerate(_rechunk(parts, MULTIPART_PART), 1):
                    reply = s3.upload_part(
                        Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=number, Body=part
                    )
                    done.append({"ETag": reply["ETag"], "PartNumber": number})
                s3.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": done}
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
                raise
            return True
        except StorageError:
            raise
        except (self._client_error, self._boto_error) as exc:
            raise self._fail("upload", key, exc) from exc

    def read_range(self, key: str, offset: int, length: int, *, exact: bool = True) -> bytes:
        if length <= 0:
            return b""
        try:
            reply = self._client().get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}"
            )
            data = bytes(reply["Body"].read())
        except (self._client_error, self._boto_error) as exc:
            if self._code(exc) in ("InvalidRange", "416"):
                raise ObjectShort(f"s3://{self.bucket}/{key} is shorter than expected") from exc
            raise self._fail("ranged read", key, exc) from exc
        if exact and len(data) != length:
            raise ObjectShort(
                f"s3://{self.bucket}/{key}: {len(data)} bytes at offset {offset}, not {length}"
            )
        return data

    def iter_object(self, key: str, size: int) -> Iterator[bytes]:
        try:
            reply = self._client().get_object(Bucket=self.bucket, Key=key)
            yield from reply["Body"].iter_chunks(4 << 20)
        except (self._client_error, self._boto_error) as exc:
            raise self._fail("read", key, exc) from exc

    def size_of(self, key: str) -> int | None:
        try:
            return int(self._client().head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except (self._client_error, self._boto_error) as exc:
            if self._code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self._fail("head", key, exc) from exc

    def delete(self, key: str) -> None:
        try:
            self._client().delete_object(Bucket=self.bucket, Key=key)
        except (self._client_error, self._boto_error) as exc:
            if self._code(exc) in ("NoSuchKey", "404", "NotFound"):
                return
            raise self._fail("delete", key, exc) from exc

    def list_keys(self) -> Iterator[tuple[str, int]]:
        try:
            pages = (
                self._client()
                .get_paginator("list_objects_v2")
                .paginate(
                    Bucket=self.bucket,
                    Prefix=self.prefix,
                    PaginationConfig={"PageSize": self.list_page_size},
                )
            )
            for page in pages:
                for item in page.get("Contents", []):
                    yield str(item["Key"]), int(item["Size"])
        except (self._client_error, self._boto_error) as exc:
            raise self._fail("list", self.prefix, exc) from exc

    def after_fork(self) -> None:
        self._lock = threading.Lock()

    def close(self) -> None:
        self._s3 = None  # the client is shared by the process's tiers
        self._pid = -1


#: boto3 clients inherited across fork: kept referenced, never used, in the child.
_INHERITED_CLIENTS: list[Any] = []
#: This process's boto3 clients by (pid, endpoint, region, timeout, credentials).
_CLIENTS: dict[tuple[Any, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _forget_clients() -> None:
    global _CLIENTS_LOCK
    _INHERITED_CLIENTS.extend(_CLIENTS.values())
    _CLIENTS.clear()
    _CLIENTS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_clients)


def _rechunk(parts: Iterable[Any], size: int) -> Iterator[bytes]:
    """The bytes of ``parts`` in pieces of about ``size`` (at least ``size``
    but the last), so memory stays bounded by a few parts whatever the
    source gives."""
    pending: list[bytes] = []
    held = 0
    for part in parts:
        pending.append(gil_free.to_bytes(part))
        held += len(pending[-1])
        if held >= size:
            yield b"".join(pending)
            pending, held = [], 0
    if pending:
        yield b"".join(pending)


def _next_read(left: int, size: int, chunk: int = 4 << 20) -> int:
    """How much to read of an object expected to hold ``size`` bytes (0:
    unknown) with ``left`` of them still to come."""
    if left > 0:
        return min(left, chunk)
    return 1 if left == 0 and size else chunk


class DirectoryTier:
    """Blobs as files under a directory every host mounts (``blobs=`` a
    path or ``file:///path``). A blob is written to ``tmp/`` beside the
    blobs and hard-linked into place (which fails if the name exists: the
    filesystem's conditional create), so a name never shows partial bytes."""

    def __init__(self, url: str, *, durable: bool = False) -> None:
        if url.startswith("file://"):
            parts = urlsplit(url)
            if parts.netloc not in ("", "localhost"):
                raise ValueError(f"blobs {url!r}: file urls must name a local path")
            path = parts.path
        else:
            path = url
        if not path or not os.path.isabs(path):
            raise ValueError(f"blobs {url!r}: a directory tier needs an absolute path")
        self.root = os.path.normpath(path)
        self.url = self.root
        self.durable = durable
        self.prefix = ""
        try:
            os.makedirs(os.path.join(self.root, "tmp"), mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"blobs {self.root!r}: cannot create: {exc.strerror}") from exc

    def key(self, cid: ContentId) -> str:
        return _object_key("", cid)

    def cid_of(self, key: str) -> ContentId | None:
        return _cid_from_key("", key)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def put(self, key: str, parts: Iterable[Any], size: int) -> bool:
        target = self._path(key)
        tmp = os.path.join(
            self.root, "tmp", f"{os.getpid()}.{secrets.token_hex(8)}.{os.path.basename(key)}"
        )
        try:
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                for part in parts:
                    view = memoryview(part)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
            if self.durable:
                dfd = os.open(os.path.dirname(target), os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            return True
        except OSError as exc:
            raise StorageError(f"cannot write {target!r}: {exc.strerror}") from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def read_range(self, key: str, offset: int, length: int, *, exact: bool = True) -> bytes:
        if length <= 0:
            return b""
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError as exc:
            raise ObjectMissing(f"{self._path(key)} is missing") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {self._path(key)!r}: {exc.strerror}") from exc
        try:
            data = os.pread(fd, length, offset)
        except OSError as exc:
            raise StorageError(f"cannot read {self._path(key)!r}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        if exact and len(data) != length:
            raise ObjectShort(f"{self._path(key)}: {len(data)} bytes at {offset}, not {length}")
        return data

    def iter_object(self, key: str, size: int) -> Iterator[bytes]:
        try:
            with open(self._path(key), "rb") as f:
                # reads of what is left of the expected size (a buffer of a
                # whole chunk for each small blob would dominate verify()'s
                # memory), then one byte to see whether there is more
                left = size
                while True:
                    piece = f.read(_next_read(left, size))
                    if not piece:
                        break
                    left -= len(piece)
                    yield piece
        except FileNotFoundError as exc:
            raise ObjectMissing(f"{self._path(key)} is missing") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {self._path(key)!r}: {exc.strerror}") from exc

    def size_of(self, key: str) -> int | None:
        try:
            return os.stat(self._path(key), follow_symlinks=False).st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot stat {self._path(key)!r}: {exc.strerror}") from exc

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot delete {self._path(key)!r}: {exc.strerror}") from exc

    def list_keys(self) -> Iterator[tuple[str, int]]:
        return self._walk("")

    def _walk(self, rel: str) -> Iterator[tuple[str, int]]:
        """The files under ``rel``, each directory's entries sorted by name
        (so keys come in ascending order: ``/`` sorts before every character
        of an algorithm or a hex digest), one directory listed at a time."""
        path = os.path.join(self.root, rel) if rel else self.root
        try:
            with os.scandir(path) as it:
                entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot list {path!r}: {exc.strerror}") from exc
        for name, is_dir in entries:
            key = f"{rel}/{name}" if rel else name
            if is_dir:
                if key == "tmp":
                    self._clean_tmp()
                else:
                    yield from self._walk(key)
                continue
            with contextlib.suppress(OSError):
                yield key, os.stat(os.path.join(self.root, key), follow_symlinks=False).st_size

    def _clean_tmp(self) -> None:
        """Remove leftovers of writers that died: older than an hour."""
        tmp = os.path.join(self.root, "tmp")
        with contextlib.suppress(OSError), os.scandir(tmp) as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    if time.time() - entry.stat(follow_symlinks=False).st_mtime > 3600:
                        os.unlink(entry.path)

    def after_fork(self) -> None:
        pass

    def close(self) -> None:
        pass


def open_tier(url: str, *, timeout: float = 30.0, durable: bool = False) -> BlobTier:
    """The tier ``blobs=`` names: ``s3://bucket/prefix`` or a directory."""
    if not isinstance(url, str):
        raise TypeError(f"blobs must be a str, not {type(url).__name__}")
    if not url:
        raise ValueError("blobs must name s3://bucket/prefix or a directory")
    if url.lower().startswith("s3://"):
        return S3Tier(url, timeout=timeout)
    if "://" in url and not url.startswith("file://"):
        raise ValueError(f"blobs {url!r}: expected s3://bucket/prefix or a directory path")
    return DirectoryTier(url, durable=durable)
