"""Round trip through labd's transports vs the raw library, in one run (prints; not a test).

* Modbus: ``ModbusDevice.read_holding_registers`` vs a raw ``AsyncModbusTcpClient`` read, against
  an in-process pymodbus ``ModbusTcpServer`` (``SimDevice``).
* Serial: ``SerialTransport.query`` vs raw pyserial ``write`` + ``readline`` on a pty whose peer
  (a thread answering every line) is the same for both.
* MQTT: ``MqttConnection.request`` vs raw aiomqtt (subscribe to the reply topic, publish the
  command at QoS 1, wait for the reply), against a private mosquitto and a raw-aiomqtt responder.

Target: ratio (ours / raw) <= 1.25. Run: ``.venv/bin/python bench/bench_transports.py [N]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import tempfile
import threading
import time
import tty
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import serial
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers.transports.modbus import ModbusBus
from drivers.transports.mqtt import MqttConnection
from drivers.transports.serial import SerialTransport
from tests.support.procs import Mosquitto, free_port


async def timed(n: int, fn: Callable[[], Awaitable[object]]) -> float:
    for _ in range(min(20, n)):
        await fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        await fn()
    return (time.perf_counter() - t0) / n


def report(name: str, ours: float, raw: float) -> None:
    ratio = ours / raw
    flag = "ok" if ratio <= 1.25 else "ABOVE TARGET"
    print(
        f"{name:8s} ours {ours * 1e6:9.1f} us   raw {raw * 1e6:9.1f} us   "
        f"ratio {ratio:5.2f}  ({flag})"
    )


async def bench_modbus(n: int) -> None:
    port = free_port()
    server = ModbusTcpServer(
        SimDevice(
            id=1, simdata=SimData(address=0, values=list(range(100)), datatype=DataType.REGISTERS)
        ),
        address=("127.0.0.1", port),
    )
    await server.serve_forever(background=True)
    raw = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
    await raw.connect()
    bus = ModbusBus.tcp("bench", "127.0.0.1", port, timeout=1.0)
    dev = bus.device(1, "furnace")
    try:

        async def raw_read() -> object:
            r = await raw.read_holding_registers(1, count=1, device_id=1)
            assert r.registers == [1]
            return r

        async def our_read() -> object:
            v = await dev.read_holding_registers(1)
            assert v == [1]
            return v

        t_raw = await timed(n, raw_read)
        t_ours = await timed(n, our_read)
        t_raw = min(t_raw, await timed(n, raw_read))
        report("modbus", t_ours, t_raw)
    finally:
        raw.close()
        bus.close()
        await server.shutdown()


def pty_peer() -> tuple[str, int, int, threading.Thread, list[bool]]:
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    stop = [False]

    def serve() -> None:
        buf = b""
        while not stop[0]:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                os.write(master, b"S S 100.00 g\r\n" if line.strip() == b"S" else b"ES\r\n")

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    return os.ttyname(slave), master, slave, th, stop


async def bench_serial(n: int) -> None:
    path, master, slave, _th, stop = pty_peer()
    try:
        ser = serial.Serial(path, 9600, timeout=1)

        async def raw_query() -> object:
            ser.reset_input_buffer()
            ser.write(b"S\r\n")
            line = ser.readline()
            assert line == b"S S 100.00 g\r\n"
            return line

        port = SerialTransport("bench", path, timeout=1.0)

        async def our_query() -> object:
            line = await port.query("S")
            assert line == "S S 100.00 g"
            return line

        t_raw = await timed(n, raw_query)
        ser.close()
        t_ours = await timed(n, our_query)
        await port.close()
        report("serial", t_ours, t_raw)
    finally:
        stop[0] = True
        os.close(master)
        os.close(slave)


#: labd's MqttConnection turns Nagle's algorithm off (paho leaves it on, which costs ~40 ms per
#: message on loopback). The raw client and the responder get the same option, so the ratio
#: measures labd's own overhead; the raw default is reported beside it.
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


async def bench_mqtt(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp)).start()
        base = f"bench-{uuid.uuid4().hex[:6]}"
        ready = asyncio.Event()

        async def responder() -> None:
            async with aiomqtt.Client(broker.host, broker.port, socket_options=NODELAY) as c:
                await c.subscribe(f"{base}/cmd/#", qos=1)
                ready.set()
                async for m in c.messages:
                    assert isinstance(m.payload, bytes)
                    cid = json.loads(m.payload)["id"]
                    await c.publish(f"{base}/ack/{cid}", json.dumps({"id": cid}), qos=1)

        task = asyncio.create_task(responder())
        await ready.wait()
        try:
            t_raw_default = await raw_mqtt(broker.host, broker.port, base, max(20, n // 10), [])
            t_raw = await raw_mqtt(broker.host, broker.port, base, n, NODELAY)
            conn = MqttConnection("bench", broker.host, broker.port)
            await conn.start()
            await conn.wait_connected(5)
            # A standing wildcard subscription, as a driver keeps: no per-request SUBSCRIBE.
            await conn.subscribe(f"{base}/ack/+", lambda m: None)

            async def our_request() -> object:
                return await conn.request(f"{base}/cmd/x", {}, lambda i: f"{base}/ack/{i}", 2.0)

            t_ours = await timed(n, our_request)
            await conn.stop()
            report("mqtt", t_ours, t_raw)
            nagle = t_raw_default * 1e6
            print(f"         (raw aiomqtt with Nagle on, its default: {nagle:9.1f} us)")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task
            broker.stop()


async def raw_mqtt(host: str, port: int, base: str, n: int, options: list[Any]) -> float:
    async with aiomqtt.Client(host, port, socket_options=options) as raw:
        await raw.subscribe(f"{base}/ack/+", qos=1)
        it = aiter(raw.messages)

        async def raw_request() -> object:
            cid = uuid.uuid4().hex
            await raw.publish(f"{base}/cmd/x", json.dumps({"id": cid}), qos=1)
            while True:
                m = await asyncio.wait_for(anext(it), 2)
                if str(m.topic).endswith(cid):
                    return m

        return await timed(n, raw_request)


async def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    print(f"round trips, mean of {n} (after warm-up)")
    await bench_modbus(n)
    await bench_serial(n)
    await bench_mqtt(n)


if __name__ == "__main__":
    asyncio.run(main())
