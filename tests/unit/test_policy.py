"""Policy and quotas, fed to the registry directly (no daemon)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from shmbrokerd.config import ConfigError, build_policy, load
from shmbrokerd.policy import OPS, Policy, Quota, Rule
from tests.unit.test_registry import create, make_peer, make_registry, open_, refused

CAMERA, VIEWER, STRANGER = 2001, 2002, 2003
VIDEO = 3000


def camera_policy() -> Policy:
    """The worked example of docs/security.md, in ids."""
    return Policy(
        rules=(
            Rule(("camera/*",), frozenset({CAMERA}), frozenset(), frozenset(OPS)),
            Rule(("camera/*",), frozenset(), frozenset({VIDEO}), frozenset({"open_ro"})),
            Rule(("camera/*",), frozenset(), frozenset(), frozenset()),
        ),
        quotas=(Quota(frozenset({CAMERA}), frozenset(), 8192, 2),),
    )


@pytest.mark.parametrize(
    ("uid", "groups", "op", "name", "allowed"),
    [
        (CAMERA, (), "create", "camera/front/frames", True),
        (CAMERA, (), "delete", "camera/x", True),
        (VIEWER, (VIDEO,), "open_ro", "camera/front/frames", True),
        (VIEWER, (VIDEO,), "open_rw", "camera/front/frames", False),
        (VIEWER, (VIDEO,), "create", "camera/x", False),
        (STRANGER, (), "open_ro", "camera/x", False),
        (STRANGER, (), "create", "elsewhere/x", True),  # no rule matches: defaults
        (VIEWER, (VIDEO,), "seal", "cameraman", True),  # the pattern is camera/*, not camera*
    ],
)
def test_first_matching_rule_decides(
    uid: int, groups: tuple[int, ...], op: str, name: str, allowed: bool
) -> None:
    assert camera_policy().allows(uid, frozenset(groups), op, name) is allowed  # type: ignore[arg-type]


def test_registry_applies_policy_after_mode() -> None:
    reg = make_registry()
    reg.policy = camera_policy()
    cam = make_peer(reg, uid=CAMERA, gid=CAMERA)
    viewer = make_peer(reg, uid=VIEWER, gid=VIEWER, groups=frozenset({VIDEO}))
    stranger = make_peer(reg, uid=STRANGER, gid=STRANGER)
    create(reg, cam, "camera/front", mode=0o644)
    open_(reg, viewer, "camera/front")  # mode r for others, policy open_ro for video
    refused(errno.EACCES, open_, reg, viewer, "camera/front", access="rw")
    refused(errno.EACCES, open_, reg, stranger, "camera/front")  # mode allows, policy denies
    refused(errno.EACCES, create, reg, viewer, "camera/other")
    refused(errno.EACCES, reg.delete, viewer, "camera/front")
    root = make_peer(reg, uid=0, gid=0, operator=True)
    open_(reg, root, "camera/front", access="rw")  # operators skip the policy


def test_quota_counts_live_segments_of_the_creator() -> None:
    reg = make_registry()
    reg.policy = camera_policy()
    cam = make_peer(reg, uid=CAMERA, gid=CAMERA)
    create(reg, cam, "camera/a", size=4096)
    refused(errno.EDQUOT, create, reg, cam, "camera/big", size=8192)  # bytes
    create(reg, cam, "camera/b", size=4096)
    refused(errno.EDQUOT, create, reg, cam, "camera/c", size=1)  # segments
    reg.delete(cam, "camera/a")
    create(reg, cam, "camera/c", size=4096)  # freed by the delete
    assert reg.usage[CAMERA] == [8192, 2]


def test_quota_applies_to_operators_too() -> None:
    reg = make_registry()
    reg.policy = Policy(default_quota=Quota(frozenset(), frozenset(), 0, 1))
    root = make_peer(reg, uid=0, gid=0, operator=True)
    create(reg, root, "a", size=1)
    refused(errno.EDQUOT, create, reg, root, "b", size=1)


def test_default_backing_is_shm_unless_configured() -> None:
    reg = make_registry()
    peer = make_peer(reg)
    assert create(reg, peer, "a").segment.backing == "shm"
    reg.limits.default_backing = "memfd"
    assert create(reg, peer, "b").segment.backing == "memfd"
    assert create(reg, peer, "c", backing="shm").segment.backing == "shm"


def test_config_resolves_names_and_refuses_unknown_ones(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        '[[policy]]\nnames = ["camera/*"]\nusers = ["root", 1234]\ngroups = ["root"]\n'
        'allow = ["open_ro"]\n[[quota]]\nusers = ["root"]\nbytes = 10\n'
    )
    policy = build_policy(load(path))
    assert policy.rules[0].uids == frozenset({0, 1234})
    assert policy.rules[0].gids == frozenset({0})
    assert policy.quotas[0].bytes == 10
    path.write_text('[[policy]]\nnames = ["x"]\nusers = ["no-such-user-here"]\n')
    with pytest.raises(ConfigError, match=r"key 'policy\.0\.users': no such user"):
        load(path)
    path.write_text('[[policy]]\nnames = ["x"]\nallow = ["fly"]\n')
    with pytest.raises(ConfigError, match=r"key 'policy\.0\.allow\.0'"):
        load(path)
