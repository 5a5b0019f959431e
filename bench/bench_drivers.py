"""Round trip through labd's *instrument drivers* vs the same exchange with the raw library, in one
run, against the simulators on their real transports (prints; not a test).

* Modbus: ``Furnace.temperature()`` (PV as a float, 2 registers at 0x8002) vs a raw pymodbus
  ``read_holding_registers(0x8002, 2)`` against the furnace simulator's Modbus TCP port.
* Serial: ``Balance.immediate_weight()`` (``SI``, parsed) vs raw pyserial ``SI`` + ``read_until``
  on the balance simulator's pty.
* MQTT: ``Station.status()`` (command with an id at QoS 1, ack on its own topic) vs raw aiomqtt
  (subscribe to the ack topic, publish the command, wait for the ack) through a private mosquitto.

The driver adds parsing, checks, error mapping and its link lock on top of the transport, so this
is what a protocol actually pays. The simulators run on an event loop in a thread of their own
(as an instrument is another machine), so the raw pyserial client may block as it normally does.
Target: ratio (driver / raw) <= 1.25.
Run: ``.venv/bin/python bench/bench_drivers.py [N]``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiomqtt
import serial
from pymodbus.client import AsyncModbusTcpClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers.instruments.balance import Balance, BalanceSettings
from drivers.instruments.furnace import Furnace, FurnaceSettings
from drivers.instruments.station import Station, StationSettings
from drivers.links import Links, ModbusLink, MqttLink, SerialLink
from hardware_sims.balance import BalanceConfig, BalanceSim
from hardware_sims.furnace import FurnaceConfig, FurnaceSim
from hardware_sims.station import StationConfig, StationSim
from tests.conftest import make_context
from tests.support.procs import Mosquitto

T = TypeVar("T")
S = TypeVar("S")
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


class SimLoop:
    """An event loop in a thread for the simulators."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


SIMS = SimLoop()


async def timed(n: int, fn: Callable[[], Awaitable[object]]) -> float:
    """Median round trip of ``n`` calls after a warm-up (a median: a scheduling hiccup of a
    noisy machine moves a mean, not a median)."""
    for _ in range(min(20, n)):
        await fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


async def paired(n: int, ours: Callable[[], Awaitable[object]],
                 raw: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """Median round trips of ``ours`` and ``raw`` called alternately (where both clients can be
    connected at once): a load that comes and goes falls on both alike."""
    for _ in range(min(20, n)):
        await raw()
        await ours()
    t_ours, t_raw = [], []
    for _ in range(n):
        for fn, out in ((raw, t_raw), (ours, t_ours)):
            t0 = time.perf_counter()
            await fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(t_ours), statistics.median(t_raw)


def report(name: str, ours: float, raw: float) -> float:
    ratio = ours / raw
    flag = "ok" if ratio <= 1.25 else "ABOVE TARGET"
    print(f"{name:8s} driver {ours * 1e6:9.1f} us   raw {raw * 1e6:9.1f} us   "
          f"ratio {ratio:5.2f}  ({flag})")
    return ratio


async def bench_furnace(tmp: Path, n: int) -> float:
    sim = SIMS.run(_make(lambda: FurnaceSim("furnace", FurnaceConfig(tcp_port=0),
                                            make_context(tmp / "f"))))
    port = int(sim.endpoint()["tcp_port"])
    links = Links("bench")
    drv = Furnace("furnace", FurnaceSettings(link=ModbusLink(host="127.0.0.1", port=port)), links)
    raw = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
    await raw.connect()
    try:
        async def raw_read() -> object:
            r = await raw.read_holding_registers(0x8002, count=2, device_id=1)
            assert not r.isError()
            return r

        t_drv, t_raw = await paired(n, drv.temperature, raw_read)
        return report("modbus", t_drv, t_raw)
    finally:
        raw.close()
        await links.close()
        SIMS.run(sim.stop())


async def bench_balance(tmp: Path, n: int) -> float:
    sim = SIMS.run(_make(lambda: BalanceSim("balance", BalanceConfig(), make_context(tmp / "b"))))
    path = str(sim.endpoint()["pty"])
    try:
        with serial.Serial(path, 9600, timeout=1) as port:

            async def raw_query() -> bytes:
                port.reset_input_buffer()
                port.write(b"SI\r\n")
                line = port.read_until(b"\r\n")  # blocking, as raw pyserial is used
                assert line.startswith(b"S "), line
                return line

            t_raw = await timed(n, raw_query)
        links = Links("bench")
        drv = Balance("balance", BalanceSettings(link=SerialLink(url=path)), links)
        t_drv = await timed(n, drv.immediate_weight)
        await links.close()
        return report("serial", t_drv, t_raw)
    finally:
        SIMS.run(sim.stop())


async def bench_station(tmp: Path, n: int) -> float:
    broker = Mosquitto(tmp).start()
    ctx = make_context(tmp / "s", broker)
    sim = SIMS.run(_make(lambda: StationSim("station", StationConfig(), ctx)))
    root = sim.root
    try:
        async with aiomqtt.Client(broker.host, broker.port, socket_options=NODELAY) as raw:
            await raw.subscribe(f"{root}/ack/+", qos=1)
            it = aiter(raw.messages)

            async def raw_status() -> object:
                cid = uuid.uuid4().hex
                await raw.publish(f"{root}/cmd/status", json.dumps({"id": cid}), qos=1)
                while True:
                    m = await asyncio.wait_for(anext(it), 2)
                    if str(m.topic).endswith(cid):
                        return m

            t_raw = await timed(n, raw_status)
        links = Links("bench")
        drv = Station("station", StationSettings(
            link=MqttLink(host=broker.host, port=broker.port, topic=root)), links)
        await drv.start()
        await drv.wait_online(5)
        t_drv = await timed(n, drv.status)
        await drv.close()
        await links.close()
        return report("mqtt", t_drv, t_raw)
    finally:
        SIMS.run(sim.stop())
        broker.stop()


async def _make(factory: Callable[[], S]) -> S:
    sim = factory()  # created on the simulators' loop: their asyncio objects belong to it
    await sim.start()  # type: ignore[attr-defined]
    return sim


async def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    print(f"driver round trips against the simulators, median of {n} (after warm-up; Modbus "
          "calls alternate driver and raw)")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        for d in ("f", "b", "s"):
            (base / d).mkdir()
        await bench_furnace(base, n)
        await bench_balance(base, n)
        await bench_station(base, n)
    SIMS.close()


if __name__ == "__main__":
    asyncio.run(main())
