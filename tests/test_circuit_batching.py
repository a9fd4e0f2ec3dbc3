"""Circuit data paths that batch: bursts held back into full cells (``MSG_MORE``), and
cells peeled through a stream's reused buffers, over real links."""

from __future__ import annotations

import os
from typing import Any

import gevent
import pytest

from anomos.net.circuit import MSG_MORE, CircuitClosed, CircuitStream
from anomos.net.frames import Cmd
from anomos.protocol import e2e
from tests.test_circuit import net, plan_for, read_exactly, wait_until

__all__ = ["net"]  # the fixture, used by name

RECORD = e2e.MAX_RECORD_DATA


def _cells_towards_downloader(relay: Any) -> int:
    """DATA cells the relay received from the source (its second link)."""
    assert relay.seen is not None
    return sum(1 for nid, _, cmd, _ in relay.seen if cmd == Cmd.DATA and nid == 2)


def test_bursts_sent_with_msg_more_travel_in_full_cells(net: Any) -> None:
    downloader, relay, source = nodes = net(3)
    relay.instrument()
    # Bursts of a BitTorrent session: 16 blocks with their headers, never a whole
    # number of records; the last burst goes without MSG_MORE and flushes the rest.
    bursts = [os.urandom(16 * (16384 + 13)) for _ in range(5)] + [os.urandom(1000)]
    message = b"".join(bursts)

    def serve(stream: CircuitStream) -> None:
        for burst in bursts[:-1]:
            stream.sendall(burst, MSG_MORE)
        stream.sendall(bursts[-1])
        stream.recv(1)  # until the downloader closes
        stream.close()

    source.serve = serve
    stream = downloader.switch.open_circuit(plan_for(nodes), timeout=5)
    assert read_exactly(stream, len(message)) == message
    # Full cells only (but the last): without MSG_MORE each burst would end in a
    # nearly empty cell, one more per burst.
    full = -(-len(message) // RECORD)
    wait_until(lambda: _cells_towards_downloader(relay) >= full + 1)  # + the REPLY cell
    assert _cells_towards_downloader(relay) == full + 1
    assert stream.bytes_received == len(message) == source.served[0].bytes_sent
    stream.close()


def test_a_held_back_tail_goes_out_before_the_end(net: Any) -> None:
    downloader, source = nodes = net(2, "memory")

    def serve(stream: CircuitStream) -> None:
        assert stream.recv(2) == b"go"  # the downloader is in: a close cannot beat its set-up
        stream.sendall(b"x" * (RECORD + 10), MSG_MORE)  # one cell now, 10 bytes held
        stream.sendall(b"y" * 5, MSG_MORE)  # still under a cell: held with them
        stream.close()  # the END flushes what is held

    source.serve = serve
    stream = downloader.switch.open_circuit(plan_for(nodes), timeout=5)
    stream.sendall(b"go")
    assert read_exactly(stream, RECORD + 16) == b"x" * (RECORD + 10) + b"y" * 5
    assert stream.recv(10) == b""


def test_a_corrupted_cell_in_a_burst_is_refused_and_nothing_after_it_is_delivered(
    net: Any,
) -> None:
    downloader, relay, source = nodes = net(3)
    handle = relay.switch.handle_frame
    count = {"data": 0}

    def tamper(link: Any, circ_id: int, cmd: int, payload: memoryview) -> None:
        if cmd == Cmd.DATA and link.nid == 2:
            count["data"] += 1
            if count["data"] == 4:  # the REPLY, two good records, then this one
                payload[100] ^= 1
        handle(link, circ_id, cmd, payload)

    relay.links.on_frame = tamper
    message = os.urandom(6 * RECORD)

    def serve(stream: CircuitStream) -> None:
        assert stream.recv(2) == b"go"
        stream.sendall(message)
        gevent.sleep(5)

    source.serve = serve
    stream = downloader.switch.open_circuit(plan_for(nodes), timeout=5)
    stream.sendall(b"go")
    got = bytearray()
    with pytest.raises(CircuitClosed):
        while True:
            chunk = stream.recv(1 << 20)
            assert chunk, "the circuit must break, not end cleanly"
            got += chunk
    assert bytes(got) == message[: 2 * RECORD]  # the good cells, intact, and no more
    assert stream.closed and "authentication" in (stream.closed_reason or "")


def test_cell_buffers_are_reused_only_once_their_frames_are_sent(net: Any) -> None:
    """Relays and ends write cells into reused buffers: two circuits at once, both
    ways, many windows of cells, and every byte arrives as sent."""
    nodes = net(4)
    downloader, source = nodes[0], nodes[-1]
    sizes = [41 * RECORD + 7, 23 * RECORD + 3]

    def echo(stream: CircuitStream) -> None:
        size = int.from_bytes(read_exactly(stream, 4), "big")
        stream.sendall(read_exactly(stream, size)[::-1])
        stream.recv(1)
        stream.close()

    source.serve = echo
    streams = [downloader.switch.open_circuit(plan_for(nodes), timeout=5) for _ in sizes]
    messages = [os.urandom(n) for n in sizes]

    def talk(stream: CircuitStream, message: bytes) -> bytes:
        stream.sendall(len(message).to_bytes(4, "big") + message)
        return read_exactly(stream, len(message))

    jobs = [gevent.spawn(talk, s, m) for s, m in zip(streams, messages, strict=True)]
    gevent.joinall(jobs, raise_error=True)
    for job, message in zip(jobs, messages, strict=True):
        assert job.value == message[::-1]
    for node in nodes:  # buffers went back for reuse (at most the spare count)
        assert 0 < len(node.links.cells._free) <= node.links.cells.spare
    for stream in streams:
        stream.close()
