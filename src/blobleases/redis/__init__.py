"""RedisStorage in parts (the class itself: :mod:`blobleases.redis_storage`):

- :mod:`.keys`: key, meta field and value names (the store's layout version);
- :mod:`.scripts`: the Lua of ``scripts.lua`` (each rule that decides a
  policy of SPEC section 3 names the ``policy_rules`` function it mirrors);
- :mod:`.heartbeat`: this process's heartbeat and the host id;
- :mod:`.eviction`: making room under ``max_bytes`` (plan, claims, reserve);
- :mod:`.chunks`: blobs in chunks, range reads checked against the upload;
- :mod:`.repair`: ``collect()`` and ``verify()``;
- :mod:`.client`: urls and redis-py errors as blobleases errors;
- :mod:`.protocol`: RESP with fewer copies of blob chunks.
"""

try:
    import redis  # noqa: F401
except ImportError as _exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "RedisStorage needs the redis client: pip install 'blobleases[redis]'"
    ) from _exc
