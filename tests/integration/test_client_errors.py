"""What a new user meets first: honest errors from the client, in Python's terms."""

from __future__ import annotations

import asyncio
import errno

import pytest

from shmbroker import AsyncBroker, Broker, BrokerError, SegmentExistsError
from tests.support.helpers import DaemonProc


def test_a_call_on_a_closed_broker_raises_as_a_closed_file_does(daemon: DaemonProc) -> None:
    b = Broker(daemon.socket)
    seg = b.create("closed/x", 4096)
    b.close()
    with pytest.raises(ValueError, match="I/O operation on closed broker"):
        b.stat("closed/x")
    with pytest.raises(ValueError, match="closed broker"):
        b.create("closed/y", 4096)
    seg.close()  # no error: the connection's end released it
    assert seg.closed


def test_segment_sealed_follows_this_brokers_seal(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as b, b.create("sealed/x", 4096) as seg:
        with b.open("sealed/x") as ro:
            assert (seg.sealed, ro.sealed) == (False, False)
            assert b.seal("sealed/x").sealed
            assert (seg.sealed, ro.sealed) == (True, True)
            assert not seg.readonly  # its writable mapping stays (docs/security.md)
        with b.open("sealed/x") as later:
            assert later.sealed


WRONG_TYPES = [
    ("open", (None,), "name must be str, not NoneType"),
    ("open", (b"x",), "name must be str, not bytes"),
    ("open", ("x", "ro", "1"), "wait must be int or float or None, not str"),
    ("create", ("a", "10"), "size must be int, not str"),
    ("create", ("a", True), "size must be int, not bool"),
    ("create", ("a", 10, "refcount", None, "0o600"), "mode must be int, not str"),
    ("stat", (7,), "name must be str, not int"),
    ("delete", (None,), "name must be str, not NoneType"),
    ("seal", (b"a",), "name must be str, not bytes"),
    ("release", (None,), "lease must be str, not NoneType"),
]


@pytest.mark.parametrize(("method", "args", "message"), WRONG_TYPES)
def test_wrong_argument_types_raise_type_error_before_the_daemon_sees_them(
    daemon: DaemonProc, method: str, args: tuple[object, ...], message: str
) -> None:
    with Broker(daemon.socket) as b:
        before = b.stats().requests
        with pytest.raises(TypeError, match=message):
            getattr(b, method)(*args)
        after = b.stats().requests
    assert after == {**before, "stats": before.get("stats", 0) + 1}  # nothing else was sent


def test_exist_ok_with_another_size_names_both_sizes(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as b, b.create("size/x", 4096):
        with pytest.raises(SegmentExistsError, match=r"size/x is 4096 bytes, not 8192"):
            b.create("size/x", 8192, exist_ok=True)
        with pytest.raises(SegmentExistsError, match=r"segment exists: size/x$"):
            b.create("size/x", 4096)


def test_stats_count_a_bad_name_under_invalid_as_documented(daemon: DaemonProc) -> None:
    """docs/protocol.md: a request refused before it reaches its op (a bad name
    among them) counts under ``invalid``, in ``requests`` and ``errors``."""
    with Broker(daemon.socket) as b:
        with pytest.raises(BrokerError) as bad:
            b.create("/mydata", 4096)
        assert bad.value.errno == errno.EINVAL
        stats = b.stats()
    assert stats.requests.get("create", 0) == 0
    assert (stats.requests["invalid"], stats.errors["invalid"]) == (1, 1)


def test_the_async_client_says_the_same(daemon: DaemonProc) -> None:
    async def scenario() -> None:
        b: AsyncBroker = await AsyncBroker.connect(daemon.socket)
        with await b.create("async/x", 4096) as seg:
            with pytest.raises(TypeError, match="size must be int, not str"):
                await b.create("async/y", "10")  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="name must be str, not bytes"):
                await b.open(b"async/x")  # type: ignore[arg-type]
            await b.seal("async/x")
            assert seg.sealed
            await b.aclose()
            with pytest.raises(ValueError, match="I/O operation on closed broker"):
                await b.stat("async/x")

    asyncio.run(scenario())
