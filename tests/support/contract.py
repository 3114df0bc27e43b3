"""Constants transcribed from PROTOCOL.md, for tests to check the daemon against.

Kept apart from the code under test on purpose: a test comparing the daemon
with its own definition of the contract could not catch a wrong definition.
"""

from __future__ import annotations

from typing import Any

#: Every code of the contract's error table.
CONTRACT_CODES = frozenset(
    {
        "EBADMSG",
        "EINVAL",
        "EOPNOTSUPP",
        "ENAMETOOLONG",
        "ENOENT",
        "EEXIST",
        "EACCES",
        "EDQUOT",
        "ENOSPC",
        "EPERM",
        "ETIMEDOUT",
        "EMFILE",
    }
)
#: What this daemon may answer besides: EAGAIN for too many waiting opens.
DAEMON_CODES = CONTRACT_CODES | {"EAGAIN"}

#: The keys of the contract's Segment object.
SEGMENT_KEYS = frozenset(
    {
        "id",
        "name",
        "size",
        "lifetime",
        "ttl",
        "sealed",
        "backing",
        "mode",
        "created",
        "owner_uid",
        "owner_gid",
        "leases",
    }
)

#: The smallest valid request of each op: its required parameters (an op
#: without one: ``{}``), as the contract's table of operations lists them.
MINIMAL: dict[str, dict[str, Any]] = {
    "hello": {},
    "create": {"name": "a", "size": 1},
    "open": {"name": "a"},
    "release": {"lease": "tok"},
    "seal": {"name": "a"},
    "delete": {"name": "a"},
    "stat": {"name": "a"},
    "list": {},
    "reclaim": {"lease": "tok"},
    "reload": {},
    "clients": {},
    "stats": {},
    "drop": {"client": 1},
}
