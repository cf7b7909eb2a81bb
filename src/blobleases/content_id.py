"""Content ids: the algorithm and digest that name a blob by what it holds."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Final

from . import ingest
from .errors import InvalidContentId

__all__ = ["ALGORITHMS", "ContentId", "Hasher", "as_buffer", "new_hasher", "observe_hashing"]

ALGORITHMS: Final = ("sha256", "blake3")
DIGEST_SIZE: Final = 32
_PARSE = re.compile(r"(sha256|blake3)[-:]([0-9a-fA-F]{64})")


class _InvalidContentIdType(InvalidContentId, TypeError):
    """Raised when ``ContentId.parse`` is given something that is not a str."""


class Hasher:
    """The small protocol shared by hashlib and blake3 hash objects."""

    def update(self, data: Any, /) -> Any:  # pragma: no cover - protocol only
        raise NotImplementedError

    def digest(self) -> bytes:  # pragma: no cover - protocol only
        raise NotImplementedError


def check_algorithm(algorithm: object) -> str:
    """Return ``algorithm`` if it is a supported name, else raise naming it."""
    if not isinstance(algorithm, str):
        raise TypeError(f"algorithm must be a str, not {type(algorithm).__name__}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
    return algorithm


#: Called with the size of every buffer hashed in this context (see observe_hashing).
_HASH_OBSERVER: contextvars.ContextVar[Callable[[int], None] | None] = contextvars.ContextVar(
    "blobleases_hash_observer", default=None
)


@contextlib.contextmanager
def observe_hashing(observe: Callable[[int], None]) -> Iterator[None]:
    """Within the block, in this thread (and context), ``observe(n)`` is
    called after each update of a hasher made by :func:`new_hasher` with the
    ``n`` bytes hashed: how the CLI shows the progress of ``verify()``,
    which rehashes every byte of a store."""
    token = _HASH_OBSERVER.set(observe)
    try:
        yield
    finally:
        _HASH_OBSERVER.reset(token)


class _ObservedHasher:
    """A hasher that reports the bytes of each update."""

    __slots__ = ("_hasher", "_observe")

    def __init__(self, hasher: Any, observe: Callable[[int], None]) -> None:
        self._hasher = hasher
        self._observe = observe

    def update(self, data: Any, /) -> None:
        self._hasher.update(data)
        self._observe(memoryview(data).nbytes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hasher, name)


def new_hasher(algorithm: str = "sha256") -> Any:
    """A fresh incremental hasher for ``algorithm`` (blake3 needs the extra)."""
    check_algorithm(algorithm)
    observe = _HASH_OBSERVER.get()
    if observe is not None:
        return _ObservedHasher(_new_hasher(algorithm), observe)
    return _new_hasher(algorithm)


def _new_hasher(algorithm: str) -> Any:
    if algorithm == "sha256":
        return hashlib.sha256()
    try:
        import blake3
    except ImportError as exc:
        raise ValueError(
            "algorithm 'blake3' needs the optional extra: pip install 'blobleases[blake3]'"
        ) from exc
    # One thread: blake3's own thread pool (max_threads=AUTO) does not
    # survive fork, so a forked child of a process that hashed with it hangs
    # in its next hash. One thread already hashes 8 MiB in about 1.3 ms, and
    # DirectoryStorage overlaps it with the write on another core.
    return blake3.blake3()


class _NotContiguous(TypeError, ValueError):
    """A buffer that is not C-contiguous (a TypeError, and a ValueError as
    it always was)."""


#: Field names in a struct format (``T{<d:name:}``), which may hold any letter.
_FIELD_NAMES = re.compile(r":[^:]*:")


def as_buffer(data: object, name: str = "data") -> memoryview:
    """A flat read-only byte view of a C-contiguous bytes-like object,
    without copying. Buffers of Python objects (numpy object arrays: their
    bytes are pointers) and buffers that are not C-contiguous (Fortran
    order, transposed, strided) raise TypeError."""
    if isinstance(data, str):
        raise TypeError(f"{name} must be bytes-like, not str (encode it first)")
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be bytes-like, not {type(data).__name__}") from None
    if "O" in _FIELD_NAMES.sub("", view.format):
        raise TypeError(
            f"{name} is a buffer of Python objects (format {view.format!r}, e.g. a numpy "
            "object array): its bytes are pointers; pickle it (blobleases.dumps) instead"
        )
    if not view.c_contiguous:
        raise _NotContiguous(
            f"{name} must be a C-contiguous buffer: copy it first (numpy.ascontiguousarray(a) "
            "or bytes(memoryview(a))), or pass the object through blobleases.dumps, "
            "which handles every memory layout"
        )
    if view.nbytes == 0:
        return memoryview(b"")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view.toreadonly()


@dataclass(frozen=True, order=True, slots=True)
class ContentId:
    """The id of a blob: its hash ``algorithm`` and ``digest``.

    ``str(cid)`` is canonical (``sha256-<64 lowercase hex>``) and always
    round-trips through :meth:`parse`.
    """

    algorithm: str
    digest: bytes
    _hash: int = field(init=False, repr=False, compare=False)
    _text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_algorithm(self.algorithm)
        if not isinstance(self.digest, bytes):
            raise TypeError(f"digest must be bytes, not {type(self.digest).__name__}")
        if len(self.digest) != DIGEST_SIZE:
            raise ValueError(f"digest must be {DIGEST_SIZE} bytes, not {len(self.digest)}")
        # Ids key every lease table: hash once, not on every lookup.
        object.__setattr__(self, "_hash", hash((self.algorithm, self.digest)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[ContentId], tuple[str, bytes]]:
        return (ContentId, (self.algorithm, self.digest))

    @property
    def hex(self) -> str:
        """The digest as 64 lowercase, zero-padded hex digits."""
        return self.digest.hex()

    def __str__(self) -> str:
        try:
            return self._text
        except AttributeError:
            text = f"{self.algorithm}-{self.digest.hex()}"
            object.__setattr__(self, "_text", text)
            return text

    def __repr__(self) -> str:
        return f"ContentId({str(self)!r})"

    @classmethod
    def parse(cls, text: str) -> ContentId:
        """Parse ``sha256-<hex>`` or ``sha256:<hex>`` (blake3 likewise), exactly."""
        if not isinstance(text, str):
            raise _InvalidContentIdType(
                f"content id must be a str, not {type(text).__name__}: {text!r}"
            )
        match = _PARSE.fullmatch(text)
        if match is None:
            raise InvalidContentId(
                f"invalid content id {text!r}: expected 'sha256-' followed by 64 hex digits"
            )
        return cls(match.group(1), bytes.fromhex(match.group(2)))

    @classmethod
    def for_bytes(cls, data: object, algorithm: str = "sha256") -> ContentId:
        """The id of a bytes-like object (bytes, bytearray, memoryview, numpy), no copy."""
        view = as_buffer(data)
        hasher = new_hasher(algorithm)
        hasher.update(view)
        return cls(algorithm, hasher.digest())

    def matches(self, data: Any) -> bool:
        """Whether ``data`` (a contiguous bytes-like object) hashes to this id."""
        hasher = new_hasher(self.algorithm)
        hasher.update(data)
        return bool(hasher.digest() == self.digest)

    @classmethod
    def for_file(
        cls, source: str | os.PathLike[str] | IO[bytes], algorithm: str = "sha256"
    ) -> ContentId:
        """The id of a file's bytes, read as a stream in constant memory."""
        hasher = new_hasher(algorithm)
        if not isinstance(source, (str, os.PathLike, io.IOBase)) and not hasattr(source, "read"):
            raise TypeError(f"source must be a path or a binary file, not {type(source).__name__}")
        with ingest.open_source(source) as f:
            ingest.copy(f, hasher)
        return cls(algorithm, hasher.digest())

    @classmethod
    def coerce(cls, value: object, name: str = "content_id") -> ContentId:
        """``value`` if it is a ContentId, parsed if it is text, else TypeError."""
        if isinstance(value, ContentId):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        raise TypeError(f"{name} must be a ContentId or str, not {type(value).__name__}")
