"""Who may create, open, seal or delete which names, and how much they may hold.

Strategy: the config's ordered rules are resolved once (user and group names
to ids) into plain data, and a decision is a first-match walk over them, with
no I/O.  The registry asks :meth:`Policy.allows` after the segment's mode
check and :meth:`Policy.quota` before a create; operators skip the rules (as
the contract says) but not the quotas.

Patterns are shell-style globs over the whole name in which ``*`` also
matches ``/``: ``camera/*`` covers ``camera/front/frames``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import translate
from typing import Literal, cast

from shmbroker import wire

__all__ = ["OPS", "Op", "Policy", "Quota", "Rule"]

#: What a rule may allow (the config's ``allow``); a static type for mypy and
#: the config's validation, which tests/unit/test_surface.py holds equal to ``OPS``.
Op = Literal["create", "open_ro", "open_rw", "seal", "delete"]
#: Each wire op's policy operations (``wire.OpSpec.policy``), in the ops' order.
OPS = cast("tuple[Op, ...]", tuple(p for spec in wire.OPS for p in spec.policy))


@dataclass(frozen=True)
class Rule:
    """Peers matching ``uids``/``gids`` (empty: anyone), for names matching
    ``patterns``, may do ``allow`` and nothing else."""

    patterns: tuple[str, ...]
    uids: frozenset[int]
    gids: frozenset[int]
    allow: frozenset[Op]
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = re.compile("|".join(translate(p) for p in self.patterns) or "(?!)")
        object.__setattr__(self, "_regex", regex)

    def matches(self, uid: int, gids: frozenset[int], name: str) -> bool:
        return self.matches_peer(uid, gids) and self._regex.match(name) is not None

    def matches_peer(self, uid: int, gids: frozenset[int]) -> bool:
        if not self.uids and not self.gids:
            return True
        return uid in self.uids or not self.gids.isdisjoint(gids)


@dataclass(frozen=True)
class Quota:
    """Per-uid ceiling on live segments created; 0 means no limit."""

    uids: frozenset[int]
    gids: frozenset[int]
    bytes: int
    segments: int

    def matches(self, uid: int, gids: frozenset[int]) -> bool:
        if not self.uids and not self.gids:
            return True
        return uid in self.uids or not self.gids.isdisjoint(gids)


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    default_allow: frozenset[Op] = frozenset(OPS)
    quotas: tuple[Quota, ...] = ()
    default_quota: Quota = Quota(frozenset(), frozenset(), 0, 0)

    def allows(self, uid: int, gids: frozenset[int], op: Op, name: str) -> bool:
        """The first rule matching peer and name decides; else the defaults."""
        for rule in self.rules:
            if rule.matches(uid, gids, name):
                return op in rule.allow
        return op in self.default_allow

    def quota(self, uid: int, gids: frozenset[int]) -> Quota:
        for quota in self.quotas:
            if quota.matches(uid, gids):
                return quota
        return self.default_quota
