"""Benchmarks of shmbrokerd: each figure printed next to a floor measured in the same run.

Run them all with ``python -m bench`` (``make bench``), or ``--quick`` for a
smoke run and ``--only NAME`` for one figure.  Nothing here asserts anything
about time: the output is a table, read by people.  ``docs/performance.md``
says what each figure and each floor mean.

Layout: ``floor.py`` is the floor server; ``_daemon.py`` starts a real daemon
in a private directory (through the tests' launcher,
``tests/support/launcher.py``); ``_worker.py`` is the client process every
figure is measured from; one module per figure (``open_rt``, ``create_rt``,
``throughput``, ``mmap_floor``); ``__main__.py`` runs them and prints the table.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
