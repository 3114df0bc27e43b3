"""Producer: creates a region, writes into it, and keeps it until told to go."""

import sys

from shmbroker import Broker

with Broker() as broker, broker.create("demo/greeting", 4096, mode=0o644) as seg:
    message = b"hello from pid %d" % __import__("os").getpid()
    seg.buf[: len(message)] = message
    print(f"producer: wrote {message.decode()!r} to {seg.name} ({seg.size} bytes)", flush=True)
    sys.stdin.readline()  # hold the region until the demo says stop
