"""ModbusBus against real pymodbus servers started here (``ModbusTcpServer`` on ``SimDevice``),
over Modbus TCP and RTU-over-TCP, on real sockets."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable

import pytest
from pymodbus import FramerType
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.errors import DeviceTimeout, InstrumentError, NotConnected
from drivers.transports.modbus import ModbusBus
from tests.support.procs import free_port, wait_for


def sim_device(device_id: int, base: int) -> SimDevice:
    """Holding registers 0..99 = base + address (read/write); 100+ is not mapped."""
    return SimDevice(
        id=device_id,
        simdata=SimData(
            address=0, values=[base + i for i in range(100)], datatype=DataType.REGISTERS
        ),
    )


def rs485_silence(ids: set[int]) -> Callable[[bool, bytes], bytes]:
    """Server trace hook: on an RTU line only devices ``ids`` exist, so a request to any other
    id gets no reply at all (pymodbus's SimCore would answer it with exception 4 instead)."""

    def trace(sending: bool, data: bytes) -> bytes:
        if sending and data and data[0] not in ids:
            return b""
        return data

    return trace


async def start_server(port: int, framer: FramerType, devices: list[SimDevice]) -> ModbusTcpServer:
    silence = rs485_silence({d.id for d in devices}) if framer is FramerType.RTU else None
    server = ModbusTcpServer(
        devices, framer=framer, address=("127.0.0.1", port), trace_packet=silence
    )
    await server.serve_forever(background=True)
    return server


@pytest.fixture
async def tcp_server() -> AsyncIterator[tuple[int, ModbusTcpServer]]:
    port = free_port()
    server = await start_server(port, FramerType.SOCKET, [sim_device(1, 0)])
    yield port, server
    await server.shutdown()


@pytest.fixture
async def rtu_server() -> AsyncIterator[tuple[int, ModbusTcpServer]]:
    """RTU framing over TCP (a serial gateway), two devices on the line: ids 1 and 2."""
    port = free_port()
    server = await start_server(port, FramerType.RTU, [sim_device(1, 0), sim_device(2, 1000)])
    yield port, server
    await server.shutdown()


async def test_tcp_read_write(
    tcp_server: tuple[int, ModbusTcpServer], caplog: pytest.LogCaptureFixture
) -> None:
    port, _ = tcp_server
    bus = ModbusBus.tcp("plc", "127.0.0.1", port, timeout=1.0)
    try:
        dev = bus.device(1, "furnace")
        assert await dev.read_holding_registers(1) == [1]
        assert await dev.read_holding_registers(10, 3) == [10, 11, 12]
        await dev.write_register(24, 8000)
        assert await dev.read_holding_registers(24) == [8000]
        await dev.write_registers(30, [7, 8])
        with caplog.at_level(logging.DEBUG, logger="labd.wire.plc"):
            assert await dev.read_holding_registers(30, 2) == [7, 8]
        assert bus.stats.ok == 6 and bus.stats.errors == 0
        assert bus.stats.mean_rtt_s is not None
    finally:
        bus.close()
    wire = [r.getMessage() for r in caplog.records if r.name == "labd.wire.plc"]
    assert any(m.startswith("> ") and m.endswith("01 03 00 1E 00 02") for m in wire), wire


@pytest.mark.faults
async def test_exception_reply_is_instrument_error(tcp_server: tuple[int, ModbusTcpServer]) -> None:
    port, _ = tcp_server
    bus = ModbusBus.tcp("plc", "127.0.0.1", port, timeout=1.0)
    try:
        dev = bus.device(1, "furnace")
        with pytest.raises(InstrumentError) as ei:
            await dev.read_holding_registers(999, command="read reg 999")
        assert ei.value.code == 2
        assert ei.value.message == "ILLEGAL_ADDRESS"
        assert str(ei.value) == "furnace: 'read reg 999' refused: error 2 (ILLEGAL_ADDRESS)"
        assert bus.stats.instrument_errors == 1
        assert await dev.read_holding_registers(5) == [5]
    finally:
        bus.close()


async def test_rtu_over_tcp_two_devices_and_silent_id(
    rtu_server: tuple[int, ModbusTcpServer],
) -> None:
    port, _ = rtu_server
    bus = ModbusBus.rtu_tcp("rs485", "127.0.0.1", port, timeout=0.3, read_retries=1)
    try:
        assert await bus.device(1, "furnace").read_holding_registers(1) == [1]
        assert await bus.device(2, "furnace2").read_holding_registers(1) == [1001]
        with pytest.raises(DeviceTimeout) as ei:
            await bus.device(7, "ghost").read_holding_registers(1, command="read PV (reg 1)")
        assert str(ei.value) == "ghost: no reply to 'read PV (reg 1)' within 0.3 s"
        assert bus.stats.timeouts == 2  # one attempt and one retry: a read
        with pytest.raises(DeviceTimeout):
            await bus.device(7, "ghost").write_register(24, 1)
        assert bus.stats.timeouts == 3  # a write is sent once
        for _ in range(3):  # a silent device does not make the bus drop the gateway link
            with pytest.raises(DeviceTimeout):
                await bus.device(7, "ghost").read_holding_registers(1, retries=0)
        assert bus.connected and bus.stats.disconnects == 0
        assert await bus.device(1, "furnace").read_holding_registers(2) == [2]
    finally:
        bus.close()


async def test_concurrent_requests_share_one_bus(rtu_server: tuple[int, ModbusTcpServer]) -> None:
    port, _ = rtu_server
    bus = ModbusBus.rtu_tcp("rs485", "127.0.0.1", port, timeout=1.0, read_retries=0)
    devices = {1: bus.device(1, "a"), 2: bus.device(2, "b")}
    rng = random.Random(3)
    jobs = [(rng.choice([1, 2]), rng.randrange(0, 98)) for _ in range(60)]
    try:
        results = await asyncio.gather(
            *(devices[d].read_holding_registers(addr, 2) for d, addr in jobs)
        )
        base = {1: 0, 2: 1000}
        assert results == [[base[d] + a, base[d] + a + 1] for d, a in jobs]
        assert bus.stats.ok == 60 and bus.stats.errors == 0
    finally:
        bus.close()


@pytest.mark.faults
async def test_server_restart_next_request_works() -> None:
    port = free_port()
    server = await start_server(port, FramerType.SOCKET, [sim_device(1, 0)])
    bus = ModbusBus.tcp("plc", "127.0.0.1", port, timeout=0.5, reconnect_delay=0.05)
    try:
        dev = bus.device(1, "furnace")
        assert await dev.read_holding_registers(3) == [3]
        await server.shutdown()
        await wait_for(lambda: not bus.connected, what="the client to see the server go")
        with pytest.raises(NotConnected):
            await dev.read_holding_registers(3, retries=0)
        server = await start_server(port, FramerType.SOCKET, [sim_device(1, 0)])
        assert await dev.read_holding_registers(4) == [4]
        assert bus.stats.disconnects >= 1 and bus.stats.reconnects >= 1
    finally:
        bus.close()
        await server.shutdown()


def test_retrying_a_write_is_refused() -> None:
    async def go() -> None:
        bus = ModbusBus.tcp("plc", "127.0.0.1", free_port())
        with pytest.raises(ValueError, match="not idempotent"):
            await bus.request(
                "furnace", "write SP1", lambda: bus.client.write_register(24, 1),
                idempotent=False, retries=2,
            )
        bus.close()

    asyncio.run(go())
