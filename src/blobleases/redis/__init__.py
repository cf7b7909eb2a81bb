"""RedisStorage's parts: key names (:mod:`.keys`) and the Lua scripts
(``scripts.lua``). The backend itself is :class:`blobleases.redis_storage.RedisStorage`."""
