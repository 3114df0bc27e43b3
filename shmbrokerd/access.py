"""Who may do what, and how much: the mode bits, the policy, the limits, the quotas.

Strategy: every check that can refuse a request for who asks or for what it
would cost, apart from the registry's transitions, so that a reader can
hold them against ``PROTOCOL.md``'s "Who may do what" in one sitting.
Each is a function of plain values (the peer, the segment, the config's
:class:`~shmbrokerd.policy.Policy` and :class:`RegistryLimits`, the usage
counts) that returns or raises the contract's ``BrokerError``: ``EACCES``
(mode, policy), ``EINVAL`` (over a limit), ``EOPNOTSUPP``, ``ENOSPC`` (the
daemon is full), ``EDQUOT`` (the uid is).  Operators pass the mode and the
policy, not the limits nor the quotas.  No I/O.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from shmbroker.errors import error_from_errno
from shmbroker.wire import Create

from .lifetimes import memfd_needs_fd_store
from .model import Peer, SegmentRecord
from .policy import Op, Policy

__all__ = ["RegistryLimits", "allowed", "check_quota", "check_room", "may", "require"]


@dataclass(slots=True)
class RegistryLimits:
    """The config's daemon-wide bounds on segments, and what a ``create`` defaults to."""

    max_segment_size: int
    max_segments: int
    max_total_bytes: int
    max_wait: float
    #: persistent memfd segments are allowed (the systemd fd store keeps them)
    memfd_persistent: bool = False
    default_backing: str = "shm"


def may(peer: Peer, seg: SegmentRecord, want: Literal["r", "w"]) -> bool:
    """Permission bits as for a file: owner, else group, else other."""
    if peer.operator:
        return True
    bit = 4 if want == "r" else 2
    if peer.uid == seg.owner_uid:
        return bool((seg.mode >> 6) & bit)
    if seg.owner_gid in peer.gids:
        return bool((seg.mode >> 3) & bit)
    return bool(seg.mode & bit)


def require(peer: Peer, seg: SegmentRecord, want: Literal["r", "w"], op: str) -> None:
    """The first check: the segment's mode bits (``EACCES``)."""
    if not may(peer, seg, want):
        raise error_from_errno(errno.EACCES, f"{op} {seg.name}: mode {seg.mode:03o} denies it")


def allowed(policy: Policy, peer: Peer, op: Op, name: str) -> None:
    """The second check: the config's policy (``EACCES``; operators pass it)."""
    if not peer.operator and not policy.allows(peer.uid, peer.gids, op, name):
        raise error_from_errno(errno.EACCES, f"{op} {name}: the policy denies it to uid {peer.uid}")


def check_room(
    limits: RegistryLimits, req: Create, backing: str, segments: int, total_bytes: int
) -> None:
    """May a new segment be made, with ``segments`` live holding ``total_bytes``?"""
    if req.size > limits.max_segment_size:
        raise error_from_errno(
            errno.EINVAL,
            f"size: {req.size} is over max_segment_size {limits.max_segment_size}",
        )
    if backing == "memfd" and memfd_needs_fd_store(req.lifetime) and not limits.memfd_persistent:
        raise error_from_errno(
            errno.EOPNOTSUPP, "persistent memfd segments need the systemd fd store"
        )
    if segments >= limits.max_segments:
        raise error_from_errno(errno.ENOSPC, f"max_segments ({limits.max_segments}) reached")
    if total_bytes + req.size > limits.max_total_bytes:
        raise error_from_errno(errno.ENOSPC, f"max_total_bytes ({limits.max_total_bytes}) reached")


def check_quota(policy: Policy, usage: Mapping[int, Sequence[int]], peer: Peer, size: int) -> None:
    """Would ``size`` more bytes in one more segment put ``peer``'s uid over its quota?

    ``usage`` is uid -> (bytes, segments) of the live segments it created.
    """
    quota = policy.quota(peer.uid, peer.gids)
    used_bytes, used_segments = usage.get(peer.uid, (0, 0))
    if quota.bytes and used_bytes + size > quota.bytes:
        raise error_from_errno(errno.EDQUOT, f"uid {peer.uid}: quota of {quota.bytes} bytes")
    if quota.segments and used_segments + 1 > quota.segments:
        raise error_from_errno(errno.EDQUOT, f"uid {peer.uid}: quota of {quota.segments} segments")
