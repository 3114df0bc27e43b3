"""The bench's ``shmbrokerd``: the shared launcher (``tests/support/launcher.py``)
with the bench's settings.

Its socket, state and config live in a fresh ``/tmp/sbb-*`` directory and its
shm objects under a prefix of its own, so a bench never meets another
daemon.  ``cleanup`` stops it and removes everything it could have left
(and returns what that was).
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.launcher import Daemon

from . import REPO

__all__ = ["BrokerDaemon", "tree_env"]


def tree_env(tree: Path | None) -> dict[str, str] | None:
    """The environment that imports ``shmbrokerd`` and ``shmbroker`` from ``tree``."""
    if tree is None:
        return None
    return {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'client'}"}


class BrokerDaemon(Daemon):
    """Started and ready once made.  ``tree``: run the daemon of that source tree
    (``bench.ab``) instead of this one."""

    def __init__(self, tree: Path | None = None) -> None:
        super().__init__({"log_level": "warning"}, tag="sbb")
        try:
            self.start(cwd=tree or REPO, env=tree_env(tree))
        except BaseException:
            self.cleanup()
            raise
