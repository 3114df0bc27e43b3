"""Every op of ``wire.OPS`` is whole: handled, callable, fuzzed and documented.

Like trio's ``test_exports.py`` keeps its public surface whole, this test
fails when an op is added (or renamed) in one place and forgotten in
another, instead of the daemon answering EIO, a client lacking the method,
or the docs lagging.  docs/protocol.md, "Adding an op", lists the files.
Pure: no daemon.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import get_args

import pytest

from shmbroker import AsyncBroker, Broker, wire
from shmbrokerd import policy
from shmbrokerd.service import Service
from tests.fuzz import fuzz_live

PROTOCOL_DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
#: where the daemon's ``op_<op>`` handlers live
HANDLERS = Service

SPECS = pytest.mark.parametrize("spec", wire.OPS, ids=wire.OP_NAMES)


def _doc_rows() -> dict[str, list[str]]:
    """op -> cells of its row in the table under "## Operations"."""
    text = PROTOCOL_DOC.read_text()
    section = text.split("\n## Operations\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([a-z_]+)`( \*\(addition\)\*)? \|", line)
        if m:
            rows[m.group(1)] = [cell.strip() for cell in line.strip("|").split("|")]
    return rows


def test_op_names_are_unique() -> None:
    assert len(set(wire.OP_NAMES)) == len(wire.OPS)


def test_request_union_holds_exactly_the_ops_requests() -> None:
    union = get_args(wire.Request)
    assert sorted(m.__name__ for m in union) == sorted(s.request.__name__ for s in wire.OPS)
    assert set(union) == {spec.request for spec in wire.OPS}


def test_policy_ops_are_the_specs_policy_operations() -> None:
    assert set(policy.OPS) == set(get_args(policy.Op))
    assert len(set(policy.OPS)) == len(policy.OPS)


@SPECS
def test_daemon_handles_it(spec: wire.OpSpec) -> None:
    handler = getattr(HANDLERS, "op_" + spec.op, None)
    assert callable(handler), f"no {HANDLERS.__name__}.op_{spec.op}"


@SPECS
def test_both_clients_send_it(spec: wire.OpSpec) -> None:
    for method in spec.methods:
        sync = getattr(Broker, method, None)
        assert callable(sync), f"no Broker.{method}"
        asynchronous = getattr(AsyncBroker, method, None)
        assert callable(asynchronous), f"no AsyncBroker.{method}"
        assert inspect.iscoroutinefunction(asynchronous) or inspect.isasyncgenfunction(
            asynchronous
        ), f"AsyncBroker.{method} is not async"


@SPECS
def test_fuzzer_generates_it(spec: wire.OpSpec) -> None:
    assert spec.op in fuzz_live.FUZZ, f"no FUZZ entry for {spec.op}"
    assert fuzz_live.FUZZ[spec.op].weight > 0
    assert callable(getattr(fuzz_live.Gen, "valid_" + spec.op, None)), f"no Gen.valid_{spec.op}"


def test_fuzzer_knows_no_other_op() -> None:
    assert set(fuzz_live.FUZZ) == set(wire.OP_NAMES)


@SPECS
def test_protocol_doc_describes_it(spec: wire.OpSpec) -> None:
    rows = _doc_rows()
    assert spec.op in rows, f"no row for {spec.op} in {PROTOCOL_DOC.name}, ## Operations"
    _op, _params, _result, fds = rows[spec.op]
    assert (fds != "0") == spec.fd, (spec.op, fds)
    if spec.operator:
        assert "operators only" in " ".join(rows[spec.op]), spec.op


def test_protocol_doc_describes_no_other_op() -> None:
    assert set(_doc_rows()) == set(wire.OP_NAMES)
