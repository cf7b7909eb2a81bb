"""The pure policy rules (blobleases.policy_rules) read a backend's lazy
cursors only as far as they need."""

from __future__ import annotations

from collections.abc import Iterator

from blobleases import policy_rules


def test_over_retain_budget_reads_only_as_far_as_needed() -> None:
    # PostgresStorage locks each retained blob the trim reads (a lazy
    # cursor): one read past the victims would lock a blob it keeps
    pulled: list[str] = []

    def oldest_first() -> Iterator[tuple[str, int]]:
        for key in "abcd":
            pulled.append(key)
            yield key, 100

    assert policy_rules.over_retain_budget(400, 250, oldest_first()) == ["a", "b"]
    assert pulled == ["a", "b"]
    assert policy_rules.over_retain_budget(250, 250, oldest_first()) == []
    assert pulled == ["a", "b"]
