"""The shipped config documents every key with its default, and bad configs
stop the daemon with a message naming the key and the file."""

from __future__ import annotations

import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from shmbrokerd.config import Config, ConfigError, load
from tests.support.helpers import REPO, DaemonProc, eventually

SHIPPED = REPO / "config" / "shmbrokerd.toml"


def test_shipped_config_lists_every_key_with_its_default() -> None:
    keys = set(tomllib.loads(SHIPPED.read_text()))
    assert keys == set(Config.model_fields)
    assert load(SHIPPED) == Config()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("max_clients = 'many'\n", "max_clients"),
        ("max_clients = 0\n", "max_clients"),
        ("no_such_key = 1\n", "no_such_key"),
        ("log_level = 'loud'\n", "log_level"),
        ("shm_prefix = '../etc/'\n", "shm_prefix"),
        ("socket_mode = 0o1777\n", "socket_mode"),
    ],
)
def test_bad_value_names_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert f"key '{key}'" in str(info.value)
    assert str(path) in str(info.value)


def test_daemon_refuses_to_start_on_bad_config() -> None:
    d = DaemonProc({"max_clients": -1})
    try:
        d.start(wait=False)
        assert d.proc is not None
        assert d.proc.wait(20) == 78
        log = d.log()
        assert "key 'max_clients'" in log
        assert str(d.config_path) in log
    finally:
        d.cleanup()


def test_invalid_toml_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("socket = \n")
    proc = subprocess.run(
        [sys.executable, "-m", "shmbrokerd", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 78
    assert str(path) in proc.stderr
    assert "not valid TOML" in proc.stderr


def test_sighup_reloads_and_keeps_the_old_config_when_the_new_one_is_bad() -> None:
    from shmbroker import Broker

    d = DaemonProc({"max_segment_size": 1 << 20})
    try:
        d.start()
        with Broker(d.socket) as b:
            assert b.hello().limits.max_segment_size == 1 << 20
            d.write_config(max_segment_size=4096)
            d.signal(signal.SIGHUP)
            eventually(lambda: b.hello().limits.max_segment_size == 4096)
            d.write_config(max_segment_size="big")
            d.signal(signal.SIGHUP)
            eventually(lambda: "reload refused" in d.log())
            assert "key 'max_segment_size'" in d.log()
            assert b.hello().limits.max_segment_size == 4096  # the old config stays
        assert d.stop() == 0
    finally:
        d.cleanup()
