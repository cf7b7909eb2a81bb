"""DirectoryStorage: the embedded default store, shared by many processes.

Layout under the root (mode 0700, files 0600)::

    format                  marker: this directory is a blobleases store
    index.sqlite3           the SQLite index (WAL), see :mod:`.schema`
    lock                    writers queue on an flock of it (see _WriterLock)
    owners/<token>          one per process using the store: the process
                            holds an fcntl lock on it while it lives (see
                            :class:`~blobleases.liveness.OwnerLock`)
    reserve                 space kept back so that freeing works on a full
                            filesystem (see _frees)
    blobs/sha256/ab/<hex>   one file per blob, named by its validated content id
    tmp/<token>-<random>.tmp
                            blobs being written; the name tells which process
                            (its owner token) writes it, so leftovers of dead
                            writers are recognised and removed

How the pieces stay consistent across processes and crashes:

* every change to the index is one ``BEGIN IMMEDIATE`` transaction;
* a new blob is written to ``tmp/``, then, inside the transaction that adds
  its row, renamed into place: file and row appear together;
* a blob file is unlinked only after the transaction that deleted its row
  has committed, by a second transaction that checks, under the same write
  lock, that no newer row names the file (a store that raced the delete has
  then re-created the row and its file stays);
* a crash between the two leaves an orphaned file, which ``collect()``
  removes (again checking under the write lock);
* long work (collect, repair, reaping thousands of leases) commits in
  slices of a few milliseconds, letting the write lock go in between, and
  each slice leaves the index consistent;
* every wait for another process (the writer flock, SQLite's lock, another
  thread's transaction) ends after ``lock_timeout`` with StorageError
  naming what it waited for and the pid holding it (from /proc/locks).

Leases and reader holds record their owner: for a process's own leases and
readers its owner token, whose lock file the kernel keeps locked exactly as
long as the process lives, so liveness is judged the same from any pid
namespace (containers sharing a volume) and pid reuse cannot fool it; for
leases taken on behalf of another pid (``LeaseId.new(pid=...)``), that pid
and its start time, judged only by processes of the pid namespace that
recorded them. Owners found dead are reaped by any process at most every
``reap_interval`` seconds (the last reap time is shared through the index)
and always by ``collect()``. ``advise_of_pid`` and ``advise_pid_terminated``
act on pids of the caller's own pid namespace only.

Choices where the contract is silent:

* A deleted index is refused (StorageError naming
  :meth:`DirectoryStorage.rebuild_index`), never silently recreated: the
  leases it recorded cannot be recovered, and processes that still have the
  old index open would keep using it. ``rebuild_index`` re-indexes the blob
  files that hash right, as unreferenced content.
* Content whose only leases expired counts as absent at once (leasing it
  raises ContentNotFound); its row goes at the next expiry pass (any write,
  read-only introspection, reap or collect, and the close of a handle or
  the exit of its process, which end at most a few thousand leases).
* Accesses for LRU eviction are written to the index in batches (at most a
  second late, and before any eviction or ``stat()`` in this process).
* One SQLite connection per handle and process, serialized by a lock; file
  reads and writes happen outside the lock.
* A reader still open when its storage is closed keeps its hold until its
  process ends (the store is not reachable to release it).
* The caller must not change a buffer while it is being stored: it is
  hashed and written as given, without a copy.
* A store this process cannot write (read-only filesystem or permissions)
  opens read-only instead of being refused: listing, reading and
  ``verify()`` work; every change raises StorageError saying it is
  read-only. Its leases and reader holds live in the process only (the
  store cannot record them), so they cannot keep the bytes from a writer
  elsewhere (a store mounted read-only here, writable there).
* A handle keeps at most a small share of the process's descriptor limit
  (4 to 256) of shard directory fds, least recently used closed first.
* Through a corrupted index nothing is repaired: ``verify()`` reports it in
  ``index_errors`` (and checks nothing else); other operations raise
  StorageError naming the index.
* A lease or reader released (by the garbage collector, a signal handler)
  while its thread is inside a transaction of the same store is released
  right after that transaction lets the writer lock go.
* The reserve is 1/16 of the filesystem, between 64 KiB and 1 MiB: room
  for the transactions that free space. It is given back only to work that
  frees (a store on a full filesystem fails and leaves it), and made again
  once there is room. Threads sharing one handle also wait for each other
  on the handle's lock, each wait on another process bounded as above.

The package, one concept per module: :mod:`.layout` (the root, its
directories and descriptors, blob and temporary files), :mod:`.locks` (the
writer lock, owner locks, fork and exit), :mod:`.schema` (the SQLite
tables), :mod:`.index` (the connection, statements and write transactions),
:mod:`.leases` (lease and hold rows, expiry, reaping), :mod:`.maintenance`
(reports, collect, verify) and :mod:`.storage` (:class:`DirectoryStorage`,
whose backend methods call those layers).
"""

from __future__ import annotations

from .layout import default_root
from .storage import DirectoryStorage

__all__ = ["DirectoryStorage", "default_root"]
