"""Moved to :mod:`blobleases.redis.protocol`; these names stay importable here."""

from .redis.protocol import (
    BULK_MIN,
    BULK_READ_SIZE,
    command_packer,
    connection_class,
    parser_class,
)

__all__ = ["BULK_MIN", "BULK_READ_SIZE", "command_packer", "connection_class", "parser_class"]
