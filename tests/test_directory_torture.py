"""Torture: worker processes store, lease, drop, read and collect at random
while a supervisor SIGKILLs and restarts them (issue 4, acceptance 3).

Afterwards every lease a survivor holds reads bytes that hash to its id, the
temporary area is empty, after ``collect()`` every blob file has a row and
every row a file, and ``verify()`` is clean. ``BLOBLEASES_TORTURE_KILLS``
sets the number of kills (default 200).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from blobleases import ContentId, LeaseId
from blobleases.directory import DirectoryStorage

KILLS = int(os.environ.get("BLOBLEASES_TORTURE_KILLS", "200"))
WORKERS = 4
PAYLOADS = 24
_ANCHORS = (5, 9, 13)

_PAYLOAD_CODE = """
import hashlib

def payload(i):
    size = (0, 1, 100, 4096)[i] if i < 4 else (i * 7919) % 150_000
    block = hashlib.sha256(b"torture-%d" % i).digest()
    return (block * (size // 32 + 1))[:size]
"""

_WORKER = textwrap.dedent(_PAYLOAD_CODE) + textwrap.dedent(
    """
    import io, os, random, sys
    from blobleases import ContentId, ContentNotFound, LeaseId
    from blobleases.directory import DirectoryStorage

    root, seed, stop, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    rng = random.Random(seed)
    storage = DirectoryStorage(root, reap_interval=0.2)
    payloads = [payload(i) for i in range(count)]
    ids = [ContentId.for_bytes(p) for p in payloads]
    held = []
    readers = []

    def check(cid, data, what):
        if ContentId.for_bytes(data) != cid:
            print(f"BAD {what} {cid}", file=sys.stderr, flush=True)
            os._exit(2)

    print("ready", flush=True)
    while not os.path.exists(stop):
        op = rng.random()
        k = rng.randrange(count)
        if op < 0.25:
            lid = LeaseId.new()
            if rng.random() < 0.2:
                storage.store_file(io.BytesIO(payloads[k]), lid)
            else:
                storage.store(ids[k], payloads[k], lid)
            held.append((ids[k], lid))
        elif op < 0.4:
            lid = LeaseId.new()
            try:
                storage.lease_by_content(ids[k], lid)
                held.append((ids[k], lid))
            except ContentNotFound:
                pass
        elif op < 0.6 and held:
            cid, lid = held.pop(rng.randrange(len(held)))
            storage.advise_lease_dropped(lid, cid)
        elif op < 0.75 and held:
            cid, lid = rng.choice(held)
            check(cid, storage.get_data(cid, lid), "get_data")
        elif op < 0.88 and held:
            cid, lid = rng.choice(held)
            reader = storage.get_reader(cid, lid)
            check(cid, reader.read(), "reader")
            readers.append(reader)
            if len(readers) > 3 or rng.random() < 0.5:
                readers.pop(rng.randrange(len(readers))).close()
        elif op < 0.9:
            storage.collect()
        elif held and rng.random() < 0.5:
            cid, lid = held.pop(rng.randrange(len(held)))
            storage.advise_lease_dropped(lid, cid)
    for cid, lid in held:
        check(cid, storage.get_data(cid, lid), "survivor")
    print(f"survived {len(held)}", flush=True)
    """
)

_namespace: dict[str, object] = {}
exec(_PAYLOAD_CODE, _namespace)
payload = _namespace["payload"]


class _Worker:
    def __init__(self, root: Path, stop: Path, seed: int, logs: Path) -> None:
        self.log = open(logs / f"worker-{seed}.log", "w+")  # noqa: SIM115 - closed in finish
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(root), str(seed), str(stop), str(PAYLOADS)],
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.output = b""

    def ready(self) -> bool:
        assert self.proc.stdout is not None
        chunk = self.proc.stdout.read()
        if chunk:
            self.output += chunk
        return b"ready\n" in self.output

    def failure(self) -> str:
        self.log.seek(0)
        return f"worker exited with {self.proc.returncode}: {self.log.read()[-2000:]}"

    def finish(self, timeout: float) -> str:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            assert self.proc.stdout is not None
            os.set_blocking(self.proc.stdout.fileno(), True)
            self.output += self.proc.stdout.read() or b""
            self.proc.stdout.close()
        return self.output.decode()


@pytest.mark.slow
def test_sigkill_torture(tmp_path: Path) -> None:
    root = tmp_path / "store"
    stop = tmp_path / "stop"
    logs = tmp_path / "logs"
    logs.mkdir()
    storage = DirectoryStorage(root, reap_interval=0.2)
    anchors = []
    for i in _ANCHORS:  # the supervisor is a survivor too
        lid = LeaseId.new()
        anchors.append((storage.store_bytes(payload(i), lid), lid))  # type: ignore[operator]
    rng = random.Random(20261125)
    seeds = iter(range(1, 1_000_000))
    workers = [_Worker(root, stop, next(seeds), logs) for _ in range(WORKERS)]
    kills = 0
    give_up = time.monotonic() + 600  # a hang fails instead of running forever
    try:
        while kills < KILLS:
            assert time.monotonic() < give_up, f"only {kills} kills"
            time.sleep(rng.uniform(0.0, 0.08))
            i = rng.randrange(WORKERS)
            worker = workers[i]
            if worker.proc.poll() is not None:
                pytest.fail(worker.failure())
            if not worker.ready():
                continue
            worker.proc.send_signal(signal.SIGKILL)
            worker.finish(timeout=60)
            assert worker.proc.returncode == -signal.SIGKILL, worker.failure()
            worker.log.close()
            kills += 1
            workers[i] = _Worker(root, stop, next(seeds), logs)
        # let the survivors get going, then stop them: each checks its leases
        while not all(w.ready() for w in workers):
            assert time.monotonic() < give_up
            for w in workers:
                if w.proc.poll() is not None:
                    pytest.fail(w.failure())
            time.sleep(0.05)
        time.sleep(0.5)
        stop.touch()
        for worker in workers:
            output = worker.finish(timeout=120)
            assert worker.proc.returncode == 0, worker.failure()
            assert re.search(r"survived \d+", output), output
    finally:
        stop.touch()
        for worker in workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()
            worker.log.close()

    for cid, lid in anchors:
        assert ContentId.for_bytes(storage.get_data(cid, lid)) == cid
    storage.collect()
    assert os.listdir(root / "tmp") == []
    on_disk = {
        f"{path.parent.parent.name}-{path.name}"
        for path in (root / "blobs").rglob("*")
        if not path.is_dir()
    }
    assert on_disk == {str(cid) for cid in storage.iter_content()}
    stats = storage.stats()
    assert (stats.leases, stats.readers, stats.processes) == (3, 0, 1)
    assert stats.blobs == len({cid for cid, _ in anchors})
    report = storage.verify()
    assert not report, report
    for (cid, lid), i in zip(anchors, _ANCHORS, strict=True):
        assert storage.get_data(cid, lid) == payload(i)  # type: ignore[operator]
    storage.close()
