"""The ``blobleases`` command line (SPEC section 5).

``blobleases [--store URL] [--json] [--debug] COMMAND``: put, get, cat, ls,
stat, leases, drop, collect, verify, stats and demo; why, top and metrics
(SPEC section 9) are in :mod:`blobleases.cli_ops`. The store defaults to
``$BLOBLEASES_STORE``, else the user cache directory. A user mistake (an
unknown or malformed id, a missing file, an unusable store) prints one line
on stderr and exits 1; usage errors exit 2, as click does; ``--debug`` adds
the traceback.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import enum
import functools
import io
import json
import os
import re
import secrets
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from . import __version__
from .content_id import ContentId, new_hasher, observe_hashing
from .errors import BlobLeaseError, ContentNotFound, IntegrityError, StorageError
from .lease_id import LeaseId
from .manager import BlobManager
from .reader import BlobReader
from .reports import BlobInfo, LeaseInfo
from .storage import BlobStorage
from .urls import open_storage

__all__ = ["app", "main", "parse_size", "parse_ttl"]

# Typer raises click's exceptions; recent typer vendors its own click, so find
# the classes through typer's public BadParameter rather than importing click.
_UsageError: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError"
)
_ClickException: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
)

#: Files at least this large get a progress bar when stderr is a terminal.
PROGRESS_THRESHOLD = 4 * 1024 * 1024
#: verify and collect show progress on stores of PROGRESS_THRESHOLD bytes or this many blobs.
PROGRESS_BLOBS = 1000
_CHUNK = 1 << 20

HELP = """\
A content-addressed blob store with leases: store big immutable bytes once,
share them between processes by content id, and nothing leaks.

The store is --store URL, else $BLOBLEASES_STORE, else the user cache
directory. URLs: a directory path or file:///path, shm://NAME (RAM-backed),
temp://, memory://, redis://host:port.
"""

EXAMPLES = """\
\b
Examples:
  blobleases demo                   the whole system at work (temporary store)
  blobleases put model.bin          store a file: prints content id, lease id
  blobleases put --ttl 2h out.tar   a lease that ends in two hours
  tar c src | blobleases put -      store standard input
  blobleases get CID -o out.bin     write a blob to a file, atomically
  blobleases cat CID | wc -c        write a blob to standard output
  blobleases ls --json              every blob, as JSON
  blobleases drop LEASE             end a lease; unreferenced content goes
  blobleases verify --repair        rehash every blob, remove broken ones
  blobleases why CID                who holds a blob, and why it is kept
  blobleases top                    a live view of the store (q quits)
  blobleases --store /data/blobs stats

\b
CID is a content id, sha256-<64 hex>; LEASE a lease id, lease:pid=N,UUID.
Errors print one line on stderr and exit 1 (2 for usage errors).
"""


# ---------------------------------------------------------------------------
# state shared by the root callback and the commands


class CliError(Exception):
    """A user mistake: reported as one line on stderr, exit status 1."""


@dataclass
class _State:
    store: str | None = None
    json: bool = False
    debug: bool = False
    url: str | None = None
    storage: BlobStorage | None = None
    exit_code: int = 0

    def close(self) -> None:
        storage, self.storage = self.storage, None
        if storage is not None:
            with contextlib.suppress(Exception):
                storage.close()


_state = _State()


def _use(store: str | None, json_output: bool) -> None:
    """Merge a command's own --store/--json with the root's."""
    if store is not None:
        _state.store = store
    if json_output:
        _state.json = True


def _store_url() -> str:
    if _state.store:
        return _state.store
    env = os.environ.get("BLOBLEASES_STORE")
    if env:
        return env if "://" in env else os.path.expanduser(env)
    from .directory import default_root

    return str(default_root())


def _storage(*, create: bool = False) -> BlobStorage:
    """The store named by --store, $BLOBLEASES_STORE or the default root,
    opened once per invocation. Only ``put`` creates it (``create``): every
    other command on a path that holds no store fails and creates nothing.
    A store this process cannot write opens read-only."""
    if _state.storage is None:
        url = _store_url()
        _state.url = url
        try:
            _state.storage = open_storage(url, create=create)
        except (ImportError, BlobLeaseError, OSError, ValueError, TypeError) as exc:
            raise CliError(f"cannot open store {url!r}: {_one_line(exc)}") from exc
    return _state.storage


# ---------------------------------------------------------------------------
# parsing and formatting

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhdw])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_ttl(text: str | float) -> float:
    """Seconds from ``30``, ``30s``, ``10m``, ``2h``, ``1d``, ``1w`` or a sum
    such as ``1h30m``; raises typer.BadParameter (a usage error) otherwise."""
    if isinstance(text, (int, float)):
        text = str(text)
    value = text.strip().lower()
    seconds: float | None = None
    try:
        seconds = float(value)
    except ValueError:
        pos, total = 0, 0.0
        for match in _DURATION_PART.finditer(value):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        else:
            if pos == len(value) and pos > 0:
                seconds = total
    if seconds is None:
        raise typer.BadParameter(
            f"{text!r} is not a duration (use e.g. 30s, 10m, 2h, 1d or plain seconds)"
        )
    if not (0 < seconds < float("inf")):
        raise typer.BadParameter(f"{text!r}: a ttl must be a positive duration")
    return seconds


_SIZE = re.compile(r"(\d+(?:\.\d*)?)\s*([kmgt]?)(i?b?)")


def parse_size(text: str | int) -> int:
    """Bytes from ``65536``, ``64k``, ``64KiB``, ``1M``, ``1MB`` (K, M, G, T
    are powers of 1024 unless written KB, MB...: powers of 1000)."""
    if isinstance(text, int):
        text = str(text)
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None:
        raise typer.BadParameter(f"{text!r} is not a size (use e.g. 65536, 64KiB, 1MiB)")
    number, prefix, suffix = match.groups()
    base = 1000 if suffix == "b" and prefix else 1024
    scale = base ** " kmgt".index(prefix or " ")
    size = int(float(number) * scale)
    if size < 1:
        raise typer.BadParameter(f"{text!r}: the size must be at least 1 byte")
    return size


def human_size(n: int) -> str:
    """``1.5 MiB``-style sizes (exact bytes below 1 KiB)."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def _when(ts: float | None) -> str:
    if ts is None:
        return "never"
    return datetime.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")


def _relative(ts: float | None) -> str:
    if ts is None:
        return "never"
    delta = ts - time.time()
    if delta <= 0:
        return "now"
    secs = int(delta + 0.5)
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if secs >= size or (unit == "s" and not parts):
            parts.append(f"{secs // size}{unit}")
            secs %= size
    return "in " + " ".join(parts[:2])


def _one_line(exc: BaseException) -> str:
    """An exception as one line: OSErrors as 'strerror: filename'."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        if exc.filename is not None:
            text = f"{text}: {os.fsdecode(exc.filename)!r}"
        if exc.filename2 is not None:
            text = f"{text} -> {os.fsdecode(exc.filename2)!r}"
    else:
        text = str(exc).strip() or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _out() -> Console:
    # Not a terminal: wide enough that tables never wrap ids mid-way.
    wide = None if sys.stdout.isatty() else 400
    return Console(highlight=False, width=wide, soft_wrap=False)


def _print_table(table: Table) -> None:
    """A table on stdout; when piped, without trailing blanks on its lines."""
    if sys.stdout.isatty():
        Console(highlight=False).print(table)
        return
    console = Console(file=io.StringIO(), width=400, highlight=False, color_system=None)
    with console.capture() as capture:
        console.print(table)
    for line in capture.get().splitlines():
        sys.stdout.write(line.rstrip() + "\n")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")
    sys.stdout.flush()


def _info_json(info: BlobInfo) -> dict[str, Any]:
    return {
        "content_id": str(info.content_id),
        "size": info.size,
        "leases": info.lease_count,
        "readers": info.reader_count,
        "created": info.created,
        "last_access": info.last_access,
    }


def _lease_json(info: LeaseInfo) -> dict[str, Any]:
    return {
        "lease_id": str(info.lease_id),
        "content_id": str(info.content_id),
        "pid": info.pid,
        "detached": info.detached,
        "expires_at": info.expires_at,
    }


def _content_id(text: str) -> ContentId:
    return ContentId.parse(text.strip())


# ---------------------------------------------------------------------------
# progress


def _want_progress(total: int | None) -> bool:
    return total is not None and total >= PROGRESS_THRESHOLD and sys.stderr.isatty()


def _new_progress() -> Progress:
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
        redirect_stdout=False,
        redirect_stderr=False,
    )


@contextlib.contextmanager
def _store_progress(storage: BlobStorage, action: str) -> Iterator[None]:
    """On a terminal, for a large store: a bar of the bytes rehashed while
    ``action`` is "verifying" (verify() hashes every byte), a spinner while
    it is "collecting" (how much collect() will do is not known ahead)."""
    size = None
    if sys.stderr.isatty():
        with contextlib.suppress(BlobLeaseError, OSError):
            st = storage.stats()
            if st.bytes >= PROGRESS_THRESHOLD or st.blobs >= PROGRESS_BLOBS:
                size = st
    if size is None:
        yield
        return
    what = f"{action} {_plural(size.blobs, 'blob')}"
    if action != "verifying":
        with Progress(
            SpinnerColumn(),
            TextColumn(f"[bold blue]{what}, {human_size(size.bytes)}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        ) as spinner:
            spinner.add_task(action, total=None)
            yield
        return
    progress = _new_progress()
    task = progress.add_task(what, total=size.bytes)
    with progress, observe_hashing(functools.partial(progress.advance, task)):
        yield


class _CountingReader(io.RawIOBase):
    """A binary file wrapper that reports every byte read to ``advance``."""

    def __init__(self, raw: IO[bytes], advance: Callable[[int], None]) -> None:
        super().__init__()
        self._raw = raw
        self._advance = advance

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer)  # type: ignore[attr-defined]
        if n:
            self._advance(n)
        return int(n or 0)


# ---------------------------------------------------------------------------
# the application

app = typer.Typer(
    name="blobleases",
    help=HELP,
    epilog=EXAMPLES,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        metavar="URL",
        help="The store: a directory, file://, shm://NAME, temp://, memory:// or redis:// URL "
        "(default: $BLOBLEASES_STORE, else the user cache directory).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
CidArg = Annotated[str, typer.Argument(help="The content id (sha256-<hex>).")]


def _version_callback(value: bool) -> None:
    if value:
        sys.stdout.write(f"blobleases {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    store: StoreOpt = None,
    json_output: JsonOpt = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            help="Print the version and exit.",
            callback=_version_callback,
            is_eager=True,
        ),
    ] = False,
) -> None:
    _state.store = store
    _state.json = json_output
    _state.debug = debug


@app.command()
def put(
    files: Annotated[
        list[str],
        typer.Argument(metavar="FILE", help="Files to store; '-' reads standard input."),
    ],
    ttl: Annotated[
        float | None,
        typer.Option(
            "--ttl",
            metavar="DURATION",
            parser=parse_ttl,
            help="End the lease after this long: 30s, 10m, 2h, 1d or plain seconds "
            "(default: never; drop it with 'blobleases drop').",
        ),
    ] = None,
    store: StoreOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Store files; print content ids and lease ids.

    Prints one line per file: content id, lease id, file name. The lease is
    detached (it does not end when this command exits): it lasts until
    'blobleases drop LEASE' or its --ttl. Identical content is stored once.
    """
    _use(store, json_output)
    if files.count("-") > 1:
        raise CliError("'-' (standard input) can be given only once")
    for name in files:  # check every file before storing anything
        if name != "-":
            _check_readable(name)
    storage = _storage(create=True)
    results: list[dict[str, Any]] = []
    pending: list[str] = []
    progress: Progress | None = None
    try:
        manager = BlobManager(storage)
        for name in files:
            source, size = _open_source(name)
            with contextlib.ExitStack() as stack:
                if source is not sys.stdin.buffer:
                    stack.callback(source.close)
                feed: IO[bytes] = source
                if _want_progress(size):
                    if progress is None:
                        progress = _new_progress()
                        progress.start()
                    task = progress.add_task(f"storing {Path(name).name}", total=size)
                    feed = _counting(source, progress, task)
                # A detached lease: never ended by this process exiting.
                lease = manager.store_file(feed, ttl=ttl, detached=True)
            cid, lid = lease.content_id, lease.lease_id
            expires = None if ttl is None else time.time() + ttl
            entry = {
                "file": name,
                "content_id": str(cid),
                "lease_id": str(lid),
                "size": lease.size,
                "expires_at": expires,
            }
            results.append(entry)
            if not _state.json:
                pending.append(f"{cid}  {lid}  {name}\n")
                if progress is None:  # while a bar is live, lines wait for it to end
                    sys.stdout.write("".join(pending))
                    sys.stdout.flush()
                    pending.clear()
    finally:
        if progress is not None:
            progress.stop()
        if pending:
            sys.stdout.write("".join(pending))
            sys.stdout.flush()
    if _state.json:
        _print_json(results)


def _check_readable(name: str) -> None:
    path = Path(name)
    if not path.exists():
        raise CliError(f"no such file: {name!r}")
    if path.is_dir():
        raise CliError(f"{name!r} is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise CliError(f"cannot read {name!r}: permission denied")


def _open_source(name: str) -> tuple[IO[bytes], int | None]:
    if name == "-":
        return sys.stdin.buffer, None
    try:
        f = open(name, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        raise CliError(f"cannot read {name!r}: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(f.fileno())
    except OSError:
        return f, None
    return f, st.st_size if st.st_size > 0 else None


def _counting(source: IO[bytes], progress: Progress, task: TaskID) -> IO[bytes]:
    def advance(n: int) -> None:
        progress.advance(task, n)

    return io.BufferedReader(_CountingReader(source, advance), buffer_size=_CHUNK)


@contextlib.contextmanager
def _leased_reader(cid_text: str) -> Iterator[tuple[ContentId, BlobReader]]:
    """A lease on the content (held for the duration of the read) and a reader."""
    cid = _content_id(cid_text)
    storage = _storage()
    with BlobManager(storage).get_by_content_id(cid) as lease, lease.get_reader() as reader:
        yield cid, reader


def _copy_verified(
    reader: BlobReader,
    cid: ContentId,
    write: Callable[[memoryview], object],
    advance: Callable[[int], None] | None = None,
) -> int:
    """Copy the blob to ``write`` in chunks, hashing on the way; IntegrityError
    if the bytes do not hash to ``cid`` or their length is wrong."""
    hasher = new_hasher(cid.algorithm)
    buf = bytearray(min(_CHUNK, max(reader.size, 1)))
    view = memoryview(buf)
    total = 0
    while True:
        n = reader.readinto(view)
        if not n:
            break
        chunk = view[:n]
        hasher.update(chunk)
        write(chunk)
        total += n
        if advance is not None:
            advance(n)
    if total != reader.size or hasher.digest() != cid.digest:
        raise IntegrityError(f"the stored bytes of {cid} are corrupted (run 'blobleases verify')")
    return total


def _write_stdout(cid_text: str) -> None:
    with _leased_reader(cid_text) as (cid, reader):
        if _state.json:
            data = bytearray()
            _copy_verified(reader, cid, data.extend)
            _print_json(
                {
                    "content_id": str(cid),
                    "size": len(data),
                    "encoding": "base64",
                    "data": base64.b64encode(bytes(data)).decode("ascii"),
                }
            )
            return
        out = sys.stdout.buffer
        progress: Progress | None = None
        advance: Callable[[int], None] | None = None
        # a bar on the terminal's stderr while the bytes go to a file or pipe
        if _want_progress(reader.size) and not sys.stdout.isatty():
            progress = _new_progress()
            progress.start()
            advance = functools.partial(
                progress.advance, progress.add_task(f"reading {str(cid)[:19]}…", total=reader.size)
            )
        try:
            _copy_verified(reader, cid, out.write, advance)
        finally:
            if progress is not None:
                progress.stop()
        out.flush()


@app.command()
def get(
    cid: CidArg,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Write to FILE (atomically: a temporary file beside it, then renamed).",
        ),
    ] = None,
    store: StoreOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Write a blob to a file or standard output.

    Takes a lease for the duration of the read and checks the bytes against
    the content id. With -o the file appears only once complete and verified.
    """
    _use(store, json_output)
    if output is None or output == "-":
        _write_stdout(cid)
        return
    target = Path(output)
    if target.is_dir():
        raise CliError(f"output {output!r} is a directory; name a file")
    with _leased_reader(cid) as (content_id, reader):
        size = _atomic_write(target, reader, content_id)
    if _state.json:
        _print_json({"content_id": str(content_id), "size": size, "output": str(target)})
    else:
        sys.stdout.write(f"wrote {size} bytes ({human_size(size)}) of {content_id} to {output}\n")


def _atomic_write(target: Path, reader: BlobReader, cid: ContentId) -> int:
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise CliError(f"cannot write {str(target)!r}: {exc.strerror or exc}") from exc
    progress: Progress | None = None
    try:
        with open(fd, "wb") as f:
            advance: Callable[[int], None] | None = None
            if _want_progress(reader.size):
                progress = _new_progress()
                progress.start()
                task = progress.add_task(f"writing {target.name}", total=reader.size)
                advance = functools.partial(progress.advance, task)
            size = _copy_verified(reader, cid, f.write, advance)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        if progress is not None:
            progress.stop()
    return size


@app.command()
def cat(
    cid: CidArg,
    store: StoreOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Write a blob to standard output.

    Checks the bytes against the content id (exit 1 if they do not match).
    With --json, prints the bytes in base64 inside a JSON object.
    """
    _use(store, json_output)
    _write_stdout(cid)


class SortKey(enum.StrEnum):
    id = "id"
    size = "size"
    created = "created"
    access = "access"


_SORT_KEYS: dict[str, Callable[[BlobInfo], Any]] = {
    "id": lambda info: info.content_id,
    "size": lambda info: (info.size, info.content_id),
    "created": lambda info: (info.created, info.content_id),
    "access": lambda info: (info.last_access, info.content_id),
}


@app.command("ls")
def ls_(
    sort: Annotated[
        SortKey,
        typer.Option(
            "--sort",
            case_sensitive=False,
            help="Sort by content id, size, creation or last access time.",
        ),
    ] = SortKey.id,
    reverse: Annotated[bool, typer.Option("--reverse", "-r", help="Reverse the order.")] = False,
    store: StoreOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """List the blobs, with sizes and lease counts."""
    _use(store, json_output)
    storage = _storage()
    infos: list[BlobInfo] = []
    for cid in storage.iter_content():
        with contextlib.suppress(ContentNotFound):  # deleted since the snapshot
            infos.append(storage.stat(cid))
    infos.sort(key=_SORT_KEYS[sort.value], reverse=reverse)
    if _state.json:
        _print_json([_info_json(info) for info in infos])
        return
    out = _out()
    if not infos:
        out.print(f"no blobs in {_state.url}")
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("CONTENT ID", no_wrap=True, overflow="fold")
    table.add_column("SIZE", justify="right", no_wrap=True)
    table.add_column("LEASES", justify="right")
    table.add_column("READERS", justify="right")
    table.add_column("CREATED", no_wrap=True)
    for info in infos:
        table.add_row(
            str(info.content_id),
            human_size(info.size),
            str(info.lease_count),
            str(info.reader_count),
            _when(info.created),
        )
    _print_table(table)
    total = sum(info.size for info in infos)
    out.print(f"{_plural(len(infos), 'blob')}, {human_size(total)}")


@app.command()
def stat(
    cid: CidArg,
    store: StoreOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Show one blob: size, leases, readers, times.

    The lease count does not include the lease this command holds while it
    looks; for a directory store the blob's file path is shown too.
    """
    _use(store, json_output)
    content_id = _content_id(cid)
    storage = _storage()
    with BlobManager(storage).get_by_content_id(content_id) as lease:
        info = storage.stat(content_id)
        holders = [
            h
            for h in storage.iter_leases()
            if h.content_id == content_id and h.lease_id != lease.lease_id
        ]
        blob_path = getattr(storage, "blob_path", None)
        path = str(blob_path(content_id)) if callable(blob_path) else None
    # This command's own lease is not counted.
    result = _info_json(info)
    result["leases"] = max(info.lease_count - 1, 0)
    result["path"] = path
    result["lease_ids"] = [str(h.lease_id) for h in sorted(holders, key=lambda h: str(h.lease_id))]
    if _state.json:
        _print_json(result)
        return
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(no_wrap=True, overflow="fold")
    table.add_row("content id", str(content_id))
    table.add_row("size", f"{info.size} bytes ({human_size(info.size)})")
    table.add_row("leases", str(result["leases"]))
    table.add_row("readers", str(info.reader_count))
    table.add_row("created", _when(info.created))
    table.add_row("last access", _when(info.last_access))
    if path is not None:
        table.add_row("path", path)
    for lid in result["lease_ids"]:
        table.add_row("lease", lid)
    _print_table(table)


@app.command()
def leases(
    pid: Annotated[
        int | None,
        typer.Option("--pid", metavar="N", min=1, help="Only the leases of process N."),
    ] = None,
    store: StoreOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """List the held leases (of one process with --pid)."""
    _use(store, json_output)
    storage = _storage()
    held = [h for h in storage.iter_leases() if pid is None or h.pid == pid]
    held.sort(key=lambda h: (h.pid, str(h.content_id), str(h.lease_id)))
    if _state.json:
        _print_json([_lease_json(h) for h in held])
        return
    out = _out()
    if not held:
        out.print("no leases" + (f" of pid {pid}" if pid is not None else ""))
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("LEASE ID", no_wrap=True, overflow="fold")
    table.add_column("CONTENT ID", no_wrap=True, overflow="fold")
    table.add_column("PID", justify="right")
    table.add_column("DETACHED")
    table.add_column("EXPIRES", no_wrap=True)
    for h in held:
        expiry = (
            "never"
            if h.expires_at is None
            else f"{_when(h.expires_at)} ({_relative(h.expires_at)})"
        )
        table.add_row(
            str(h.lease_id), str(h.content_id), str(h.pid), "yes" if h.detached else "no", expiry
        )
    _print_table(table)


@app.command()
def drop(
    lease: Annotated[str, typer.Argument(metavar="LEASE", help="The lease id (lease:pid=N,UUID).")],
    store: StoreOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """End a lease; unreferenced content is deleted.

    Content left with no lease and no open reader is deleted at once (unless
    the store's retention keeps it).
    """
    _use(store, json_output)
    lid = LeaseId.parse(lease.strip())
    storage = _storage()
    matches = [h for h in storage.iter_leases() if h.lease_id == lid]
    if not matches:
        raise CliError(f"no such lease: {lid} (never made, or already dropped, expired or reaped)")
    dropped: list[dict[str, Any]] = []
    for h in matches:
        storage.advise_lease_dropped(lid, h.content_id)
        dropped.append(
            {"content_id": str(h.content_id), "content_deleted": not storage.contains(h.content_id)}
        )
    if _state.json:
        _print_json({"lease_id": str(lid), "dropped": dropped})
        return
    for entry in dropped:
        fate = "content deleted" if entry["content_deleted"] else "content still held (or retained)"
        sys.stdout.write(f"dropped {lid} on {entry['content_id']}: {fate}\n")


@app.command()
def collect(store: StoreOpt = None, json_output: JsonOpt = False) -> None:
    """Reap dead and expired leases; free content.

    Ends the leases of processes that died and leases past their ttl,
    deletes unreferenced content and leftovers of crashed writers.
    """
    _use(store, json_output)
    storage = _storage()
    with _store_progress(storage, "collecting"):
        report = storage.collect()
    if _state.json:
        _print_json(asdict(report))
        return
    sys.stdout.write(
        f"reaped {report.leases_reaped} leases and {report.readers_reaped} reader holds "
        f"of {report.processes_reaped} dead processes; deleted {report.blobs_deleted} blobs, "
        f"freed {human_size(report.bytes_freed)}"
        + (
            f"; removed {report.files_removed} stray files and {report.rows_removed} stale rows"
            if report.files_removed or report.rows_removed
            else ""
        )
        + "\n"
    )


@app.command()
def verify(
    repair: Annotated[
        bool,
        typer.Option("--repair", help="Remove corrupted, missing and orphaned data."),
    ] = False,
    store: StoreOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Rehash every blob; report what is broken.

    Reports corrupted, missing and orphaned data; --repair removes it (leases
    on removed content then get LeaseExpired, never wrong bytes). Exits 1 if something is wrong and was not repaired.
    """
    _use(store, json_output)
    storage = _storage()
    with _store_progress(storage, "verifying"):
        report = storage.verify(repair=repair)
    if _state.json:
        _print_json(
            {
                "ok": not report,
                "checked": report.checked,
                "corrupted": [str(c) for c in report.corrupted],
                "missing": [str(c) for c in report.missing],
                "orphaned": list(report.orphaned),
                "repaired": report.repaired,
                "index_errors": list(report.index_errors),
            }
        )
    else:
        for e in report.index_errors:
            sys.stdout.write(f"index      {e}\n")
        for c in report.corrupted:
            sys.stdout.write(f"corrupted  {c}\n")
        for c in report.missing:
            sys.stdout.write(f"missing    {c}\n")
        for o in report.orphaned:
            sys.stdout.write(f"orphaned   {o}\n")
        if not report:
            sys.stdout.write(f"checked {report.checked} blobs: all intact\n")
        else:
            found = (
                f"{len(report.corrupted)} corrupted, {len(report.missing)} missing, "
                f"{len(report.orphaned)} orphaned"
            )
            action = "removed" if report.repaired else "run 'blobleases verify --repair' to remove"
            if report.index_errors:
                found = f"the index is corrupted ({len(report.index_errors)} problems)"
                action = "nothing was checked or repaired through it"
            sys.stdout.write(f"checked {report.checked} blobs: {found}; {action}\n")
    sys.stdout.flush()
    if report and not report.repaired:
        _state.exit_code = 1


@app.command()
def stats(store: StoreOpt = None, json_output: JsonOpt = False) -> None:
    """Totals: blobs, bytes, leases, dedup hits."""
    _use(store, json_output)
    storage = _storage()
    st = storage.stats()
    result = {"store": storage.url, **asdict(st)}
    if _state.json:
        _print_json(result)
        return
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(no_wrap=True, overflow="fold")
    table.add_row("store", storage.url)
    table.add_row("blobs", str(st.blobs))
    table.add_row("bytes", f"{st.bytes} ({human_size(st.bytes)})")
    table.add_row("leases", str(st.leases))
    table.add_row("readers", str(st.readers))
    table.add_row("processes", str(st.processes))
    table.add_row("dedup hits", str(st.dedup_hits))
    if st.retained_blobs:
        table.add_row("retained", f"{st.retained_blobs} blobs, {human_size(st.retained_bytes)}")
    _print_table(table)


@app.command()
def demo(
    workers: Annotated[
        int, typer.Option("--workers", metavar="N", min=2, max=64, help="Worker processes.")
    ] = 4,
    blobs: Annotated[
        int,
        typer.Option(
            "--blobs", metavar="N", min=4, help="Blobs the producer stores (a quarter duplicates)."
        ),
    ] = 48,
    size: Annotated[
        int,
        typer.Option(
            "--size", metavar="BYTES", parser=parse_size, help="Bytes per blob (e.g. 65536, 1MiB)."
        ),
    ] = 1 << 20,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            metavar="URL",
            help="Run on this store instead of a temporary directory store.",
            show_default=False,
        ),
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Show the whole system at work, checked.

    A producer stores blobs (with duplicates); worker processes lease them by
    content id and verify them; one worker is SIGKILLed mid-work, its leases
    are reaped and the content only it held is collected, while every other
    lease still reads verified bytes. Runs on a temporary directory store
    unless --store is given. Exits 1 if an invariant fails.
    """
    from . import demo as demo_module

    _use(None, json_output)
    if blobs < 2 * workers:
        raise typer.BadParameter(
            f"must be at least twice --workers ({workers}), not {blobs}",
            param_hint="'--blobs'",
        )
    url = store if store is not None else _state.store  # never $BLOBLEASES_STORE
    config = demo_module.DemoConfig(workers=workers, blobs=blobs, size=size, store=url)
    try:
        console = None if _state.json else Console(highlight=False)
        result = demo_module.run_demo(config, console=console)
    except (BlobLeaseError, OSError, ValueError) as exc:
        if url is not None:
            raise CliError(f"demo on store {url!r}: {_one_line(exc)}") from exc
        raise
    if _state.json:
        _print_json(result.to_json())
    if not result.ok:
        failed = "; ".join(inv.name for inv in result.failed)
        sys.stderr.write(f"blobleases demo: invariant failed: {failed}\n")
        _state.exit_code = 1


# ---------------------------------------------------------------------------
# entry point


def _report(exc: BaseException, message: str) -> int:
    if _state.debug:
        traceback.print_exception(exc)
    sys.stderr.write(f"blobleases: error: {message}\n")
    sys.stderr.flush()
    return 1


def _is_redis_error(exc: BaseException) -> bool:
    redis = sys.modules.get("redis.exceptions")
    return redis is not None and isinstance(exc, redis.RedisError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    global _state
    _state = _State()
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        args = ["--help"]
    _state.debug = "--debug" in args
    try:
        try:
            rv = app(args=args, prog_name="blobleases", standalone_mode=False)
        finally:
            _state.close()
    except typer.Abort:
        sys.stderr.write("blobleases: aborted\n")
        return 1
    except Exception as exc:
        if isinstance(exc, _UsageError):
            exc.show()  # type: ignore[attr-defined]
            return int(exc.exit_code)  # type: ignore[attr-defined]
        if isinstance(exc, _ClickException):
            return _report(exc, _one_line(exc))
        return _handle(exc)
    except KeyboardInterrupt:
        sys.stderr.write("blobleases: interrupted\n")
        return 130
    if isinstance(rv, int) and rv:
        return rv
    return _state.exit_code


def _handle(exc: Exception) -> int:
    """Report an error of a command as one line on stderr; returns the status."""
    if isinstance(exc, BrokenPipeError):
        # The reader of our output went away (e.g. `blobleases cat X | head`).
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1
    if isinstance(exc, CliError):
        return _report(exc, str(exc))
    where = f"store {_state.url}: " if _state.url else ""
    if isinstance(exc, StorageError) or _is_redis_error(exc):
        return _report(exc, where + _one_line(exc))
    if isinstance(exc, (BlobLeaseError, OSError, ValueError, TypeError, ImportError)):
        return _report(exc, _one_line(exc))
    hint = "" if _state.debug else " (rerun with --debug for the traceback)"
    return _report(exc, f"internal error: {type(exc).__name__}: {_one_line(exc)}{hint}")


# why, top and metrics (SPEC section 9) register themselves on ``app``.
from . import cli_ops  # noqa: E402, F401
