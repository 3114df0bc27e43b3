"""Consumer: an unrelated process that opens the region by name, read-only."""

from shmbroker import Broker

with Broker() as broker, broker.open("demo/greeting", wait=10) as seg:
    text = bytes(seg.buf).rstrip(b"\0").decode()
    print(f"consumer: read {text!r} (read-only: {seg.readonly})")
    try:
        seg.buf[0] = 0
    except TypeError:
        print("consumer: writing is refused, as the mapping is read-only")
