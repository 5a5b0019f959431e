"""SerialTransport against real pseudo-terminals and a real TCP socket.

The peer is ``hardware_sims.serial_link.SerialEndpoint`` (the simulators' real pty/TCP server,
with its fault injection) serving :class:`EchoDevice`, a tiny line device defined here: it is a
test peer, not an instrument model. One test uses a bare ``os.openpty()`` peer instead, for a
device that vanishes without any simulator code involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tty
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drivers.errors import DeviceTimeout, NotConnected, ProtocolError
from drivers.transports.serial import SerialTransport
from hardware_sims.base import SerialEndpointConfig
from hardware_sims.faults import Fault, FaultBox, FaultKind
from hardware_sims.serial_link import LineDevice, SerialEndpoint
from tests.support.procs import wait_for


class EchoDevice(LineDevice):
    """Test peer. ``ECHO <x>`` -> ``<x>``; ``PING`` -> ``PONG``; ``VAL`` -> ``VAL 1x.5`` (a
    deliberately malformed number); ``TWO`` -> ``TWO B`` then, after ``GO``, ``TWO A``;
    ``LINES <n>`` -> ``L1`` .. ``Ln`` then ``END``; ``QUIET`` -> nothing. Real-time ``?`` ->
    ``<Idle>``. Every reply ends CR LF."""

    realtime = frozenset({ord("?")})

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[bytes] = []

    async def on_line(self, line: bytes) -> None:
        self.lines.append(line)
        w = self.endpoint.write
        if line.startswith(b"ECHO "):
            w(line[5:] + b"\r\n")
        elif line == b"PING":
            w(b"PONG\r\n")
        elif line == b"VAL":
            w(b"VAL 1x.5\r\n")
        elif line == b"TWO":
            w(b"TWO B\r\n")
        elif line == b"GO":
            w(b"TWO A\r\n")
        elif line.startswith(b"LINES "):
            n = int(line[6:])
            w(b"".join(b"L%d\r\n" % i for i in range(1, n + 1)) + b"END\r\n")

    async def on_realtime(self, byte: int) -> None:
        self.endpoint.write(b"<Idle>\r\n")


@contextlib.asynccontextmanager
async def served(
    tmp_path: Path, *, pty: bool = True, tcp: bool = False
) -> AsyncIterator[tuple[SerialEndpoint, EchoDevice, FaultBox]]:
    faults = FaultBox("echo")
    dev = EchoDevice()
    cfg = SerialEndpointConfig(pty=pty, tcp_port=0 if tcp else None)
    ep = SerialEndpoint("echo", cfg, tmp_path, faults, dev)
    await ep.start()
    try:
        yield ep, dev, faults
    finally:
        await ep.stop()


async def test_query_on_pty(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with served(tmp_path) as (ep, dev, _):
        port = SerialTransport("echo", str(ep.link_path), timeout=1.0)
        try:
            with caplog.at_level(logging.DEBUG, logger="labd.wire.echo"):
                assert await port.query("PING") == "PONG"
            assert await port.query("ECHO hello world") == "hello world"
            assert await port.query("ECHO 42", parse=int) == 42
            assert dev.lines[-1] == b"ECHO 42"
            assert await port.query_lines("LINES 3", until=lambda s: s == "END") == [
                "L1", "L2", "L3", "END",
            ]
            assert await port.query_lines("LINES 2", count=2) == ["L1", "L2"]
            # The END left over from the previous call is flushed, never taken as a reply.
            assert await port.query("PING") == "PONG"
            assert port.stats.ok == 6 and port.stats.errors == 0
            assert port.stats.last_rtt_s is not None and port.stats.mean_rtt_s is not None
        finally:
            await port.close()
    wire = [r.getMessage() for r in caplog.records if r.name == "labd.wire.echo"]
    assert "> b'PING\\r\\n'" in wire
    assert any(m.startswith("< b'PONG") for m in wire)


async def test_two_phase_reply_in_one_session(tmp_path: Path) -> None:
    """MT-SICS style: ``B`` (accepted) now, ``A`` (done) later, the link held in between."""
    async with served(tmp_path) as (ep, _, _):
        port = SerialTransport("echo", str(ep.link_path), timeout=1.0)
        try:
            async with port.session() as s:
                assert await s.query("TWO") == "TWO B"
                await s.write("GO")
                assert await s.read_line(timeout=1.0, command="TWO") == "TWO A"
            await port.write_realtime(b"?")
            assert await port.read_line() == "<Idle>"
        finally:
            await port.close()


@pytest.mark.faults
async def test_timeout_names_device_and_command(tmp_path: Path) -> None:
    async with served(tmp_path) as (ep, _, faults):
        port = SerialTransport("echo", str(ep.link_path), timeout=0.2)
        try:
            await faults.set(Fault(kind=FaultKind.NO_REPLY, count=1))
            with pytest.raises(DeviceTimeout) as ei:
                await port.query("PING", command="ping the echo")
            assert str(ei.value) == "echo: no reply to 'ping the echo' within 0.2 s"
            assert ei.value.device == "echo" and ei.value.command == "ping the echo"
            assert port.stats.timeouts == 1
            assert await port.query("PING") == "PONG"  # the link is still usable
        finally:
            await port.close()


@pytest.mark.faults
async def test_late_reply_never_answers_the_next_command(tmp_path: Path) -> None:
    async with served(tmp_path) as (ep, _, faults):
        port = SerialTransport("echo", str(ep.link_path), timeout=0.1)
        try:
            await faults.set(Fault(kind=FaultKind.LATE_REPLY, delay_s=0.3, count=1))
            sent = ep.tx_count
            with pytest.raises(DeviceTimeout):
                await port.query("ECHO first")
            # The stale reply reaches the host before the next command is sent.
            await wait_for(lambda: ep.tx_count >= sent + len(b"first\r\n"), what="late reply")
            assert await port.query("ECHO second", timeout=1.0) == "second"
        finally:
            await port.close()


@pytest.mark.faults
async def test_idempotent_read_is_retried_but_a_command_is_not(tmp_path: Path) -> None:
    async with served(tmp_path) as (ep, dev, faults):
        port = SerialTransport("echo", str(ep.link_path), timeout=0.15, read_retries=2)
        try:
            await faults.set(Fault(kind=FaultKind.NO_REPLY, count=1))
            assert await port.query("ECHO r", idempotent=True) == "r"
            assert dev.lines.count(b"ECHO r") == 2
            await faults.set(Fault(kind=FaultKind.NO_REPLY, count=1))
            with pytest.raises(DeviceTimeout):
                await port.query("ECHO w")
            assert dev.lines.count(b"ECHO w") == 1
        finally:
            await port.close()


async def test_garbled_reply_raises_protocol_error_from_parser(tmp_path: Path) -> None:
    def parse_val(line: str) -> float:
        head, _, value = line.partition(" ")
        if head != "VAL":
            raise ProtocolError("echo", "VAL", f"expected 'VAL <x>', got {line!r}")
        return float(value)

    async with served(tmp_path) as (ep, _, _):
        port = SerialTransport("echo", str(ep.link_path), timeout=1.0)
        try:
            with pytest.raises(ProtocolError) as ei:
                await port.query("VAL", parse=parse_val, command="read value")
            assert ei.value.raw == b"VAL 1x.5\r"
            assert "echo: bad reply to 'read value'" in str(ei.value)
            assert port.stats.protocol_errors == 1
        finally:
            await port.close()


@pytest.mark.faults
async def test_disconnect_and_reconnect_same_transport(tmp_path: Path) -> None:
    async with served(tmp_path) as (ep, _, faults):
        port = SerialTransport("echo", str(ep.link_path), timeout=0.5, backoff_initial=0.05)
        try:
            assert await port.query("PING") == "PONG"
            await faults.set(Fault(kind=FaultKind.DISCONNECT, duration_s=0))  # cable pulled
            with pytest.raises(NotConnected) as ei:
                await port.query("PING")
            assert ei.value.device == "echo"
            assert not port.is_open
            await ep.reconnect()  # cable back: a new pty behind the same symlink
            assert await port.query("PING") == "PONG"
            assert port.stats.disconnects == 1 and port.stats.reconnects == 1
        finally:
            await port.close()


@pytest.mark.faults
async def test_vanished_raw_pty_then_new_one(tmp_path: Path) -> None:
    """A bare ``os.openpty()`` peer: its master closes (device gone), then a new pty appears
    behind the same symlink; the transport notices, fails fast, and reopens on its own."""
    link = tmp_path / "raw"
    loop = asyncio.get_running_loop()

    def make_pty() -> tuple[int, int]:
        master, slave = os.openpty()
        tty.setraw(slave)
        tty.setraw(master)
        os.set_blocking(master, False)
        tmp = link.with_suffix(".tmp")
        tmp.symlink_to(os.ttyname(slave))
        tmp.replace(link)
        return master, slave

    def answer(master: int) -> None:
        data = os.read(master, 100)
        if data.endswith(b"\n"):
            os.write(master, b"OK " + data.strip() + b"\r\n")

    master, slave = make_pty()
    loop.add_reader(master, answer, master)
    port = SerialTransport("raw", str(link), timeout=0.5, backoff_initial=0.05)
    try:
        assert await port.query("A") == "OK A"
        loop.remove_reader(master)
        os.close(master)
        os.close(slave)
        link.unlink()
        await wait_for(lambda: not port.is_open, what="the transport to see EIO")
        with pytest.raises(NotConnected, match="cannot open"):
            await port.query("B")
        master, slave = make_pty()
        loop.add_reader(master, answer, master)
        assert await port.query("C") == "OK C"
    finally:
        await port.close()
        loop.remove_reader(master)
        os.close(master)
        os.close(slave)


async def test_socket_url(tmp_path: Path) -> None:
    async with served(tmp_path, pty=False, tcp=True) as (ep, _, faults):
        url = ep.endpoint()["url"]
        assert isinstance(url, str) and url.startswith("socket://")
        port = SerialTransport("echo", url, timeout=1.0, backoff_initial=0.05)
        try:
            assert await port.query("PING") == "PONG"
            await faults.set(Fault(kind=FaultKind.DISCONNECT, duration_s=0))
            await wait_for(lambda: not port.is_open, what="EOF on the socket")
            with pytest.raises(NotConnected):
                await port.query("PING")
            await ep.reconnect()
            assert await port.query("ECHO back") == "back"
        finally:
            await port.close()


async def test_loop_url_uses_reader_thread() -> None:
    """``loop://`` has no file descriptor: served by the reader-thread fallback (echoes writes)."""
    port = SerialTransport("loop", "loop://", timeout=1.0)
    try:
        assert await port.query("HELLO") == "HELLO"
        assert await port.exchange(b"\x01\x02\x03", expect=3) == b"\x01\x02\x03"
    finally:
        await port.close()


async def test_exchange_with_frame_parser(tmp_path: Path) -> None:
    def frame(buf: bytes) -> int | None:
        if buf and not buf.startswith(b"P"):
            raise ValueError("frame must start with P")
        return 6 if len(buf) >= 6 else None

    async with served(tmp_path) as (ep, _, _):
        port = SerialTransport("echo", str(ep.link_path), timeout=1.0)
        try:
            assert await port.exchange(b"PING\r\n", expect=frame) == b"PONG\r\n"
            with pytest.raises(ProtocolError) as ei:
                await port.exchange(b"ECHO xyz\r\n", expect=frame)
            assert ei.value.raw is not None and ei.value.raw.startswith(b"x")
        finally:
            await port.close()


async def test_bytes_that_arrive_as_the_wait_begins_wake_the_reader() -> None:
    """Regression: the reader used to register its wake-up inside a task that
    ``asyncio.wait_for`` starts on a later loop iteration; bytes delivered in between woke
    nobody and a complete reply sat in the buffer until the timeout (seen as "incomplete reply
    to 'QRA 60 8 3' within 30 s: got b'QRA 60 8 A\\r\\n'")."""
    import time

    from drivers.transports.serial import SerialSession, _LinkProtocol
    from drivers.transports.wirelog import WireLog

    proto = _LinkProtocol(WireLog("race"))
    # Delivered by the loop before any task created inside _wait gets to run.
    asyncio.get_running_loop().call_soon(proto.data_received, b"QRA 60 8 A\r\n")
    t0 = time.monotonic()
    assert await SerialSession._wait(proto, time.monotonic() + 2.0)
    assert time.monotonic() - t0 < 0.5
    assert bytes(proto.buf) == b"QRA 60 8 A\r\n"
