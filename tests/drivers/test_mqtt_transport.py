"""MqttConnection against a real mosquitto (the suite's ``mosquitto`` and ``private_broker``).

Peers are written here with raw aiomqtt (a responder that answers commands like the simulated
station: ``<root>/ack/<id>`` then ``<root>/result/<id>``), and a subprocess that uses the
transport and is killed with SIGKILL to observe the last will.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from drivers.errors import DeviceTimeout, NotConnected
from drivers.transports.mqtt import MqttConnection, MqttMessage
from tests.support.procs import Mosquitto, wait_for

REPO = Path(__file__).resolve().parents[2]


def root() -> str:
    return f"t-{uuid.uuid4().hex[:8]}/station"


@contextlib.asynccontextmanager
async def responder(
    broker: Mosquitto, base: str, *, silent: bool = False
) -> AsyncIterator[list[dict[str, object]]]:
    """Raw aiomqtt peer: ``<base>/cmd/#`` -> ack (and a result) for every command with an id."""
    seen: list[dict[str, object]] = []
    ready = asyncio.Event()

    async def serve() -> None:
        async with aiomqtt.Client(broker.host, broker.port) as c:
            await c.subscribe(f"{base}/cmd/#", qos=1)
            ready.set()
            async for m in c.messages:
                assert isinstance(m.payload, bytes)
                body = json.loads(m.payload)
                seen.append(body)
                if silent:
                    continue
                cid = body["id"]
                await c.publish(f"{base}/ack/{cid}", json.dumps({"id": cid, "ok": True}), qos=1)
                result = {"id": cid, "value": body.get("x", 0) * 2}
                await c.publish(f"{base}/result/{cid}", json.dumps(result), qos=1)

    task = asyncio.create_task(serve())
    await asyncio.wait_for(ready.wait(), 5)
    try:
        yield seen
    finally:
        task.cancel()
        # The responder dies with the broker in the restart test: that is expected there.
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await task


async def test_request_reply_and_ack_then_result(mosquitto: Mosquitto) -> None:
    base = root()
    conn = MqttConnection("station", mosquitto.host, mosquitto.port)
    await conn.start()
    try:
        await conn.wait_connected(5)
        async with responder(mosquitto, base) as seen:
            reply = await conn.request(
                f"{base}/cmd/measure", {"x": 3}, lambda i: f"{base}/ack/{i}", timeout=2.0
            )
            assert reply["ok"] is True and reply["id"] == seen[0]["id"]
            assert len(str(seen[0]["id"])) == 32 and seen[0]["x"] == 3
            async with conn.command(
                f"{base}/cmd/measure", {"x": 21},
                {"ack": lambda i: f"{base}/ack/{i}", "result": lambda i: f"{base}/result/{i}"},
            ) as cmd:
                assert (await cmd.reply("ack", 2.0))["id"] == cmd.id
                assert (await cmd.reply("result", 2.0)) == {"id": cmd.id, "value": 42}
        assert conn.stats.requests == 2 and conn.stats.ok == 3
    finally:
        await conn.stop()


@pytest.mark.faults
async def test_no_reply_is_device_timeout(mosquitto: Mosquitto) -> None:
    base = root()
    conn = MqttConnection("station", mosquitto.host, mosquitto.port)
    await conn.start()
    try:
        await conn.wait_connected(5)
        async with responder(mosquitto, base, silent=True) as seen:
            with pytest.raises(DeviceTimeout) as ei:
                await conn.request(
                    f"{base}/cmd/measure", {"x": 1}, lambda i: f"{base}/ack/{i}",
                    timeout=0.3, command="measure",
                )
            assert str(ei.value).startswith(f"station: no reply to 'measure' on {base}/ack/")
            assert len(seen) == 1  # sent once, never repeated
        assert conn.stats.timeouts == 1
    finally:
        await conn.stop()


async def test_subscriptions_callbacks_iterators_and_latest(mosquitto: Mosquitto) -> None:
    base = root()
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as raw:
        await raw.publish(f"{base}/telemetry/o2", b"1.5", qos=1, retain=True)
        conn = MqttConnection("safety", mosquitto.host, mosquitto.port)
        await conn.start()
        try:
            await conn.wait_connected(5)
            got: list[MqttMessage] = []
            await conn.subscribe(f"{base}/telemetry/+", got.append)
            # The retained value arrives with nobody waiting, and is kept.
            await wait_for(lambda: conn.latest(f"{base}/telemetry/o2"), what="retained o2")
            latest = conn.latest(f"{base}/telemetry/o2")
            assert latest is not None and latest.text == "1.5" and latest.retain
            async with conn.messages(f"{base}/#") as stream:
                first = await asyncio.wait_for(anext(stream), 2)  # the retained value, again
                assert first.topic == f"{base}/telemetry/o2" and first.retain
                await raw.publish(f"{base}/telemetry/door", b'{"open": true}', qos=1)
                msg = await asyncio.wait_for(anext(stream), 2)
                assert msg.topic == f"{base}/telemetry/door" and msg.json() == {"open": True}
            await wait_for(lambda: any(m.topic.endswith("door") for m in got), what="callback")
        finally:
            await conn.stop()
        await raw.publish(f"{base}/telemetry/o2", b"", qos=1, retain=True)  # clear retained


@pytest.mark.faults
async def test_broker_restart_reconnects_and_resubscribes(private_broker: Mosquitto) -> None:
    base = root()
    conn = MqttConnection(
        "station", private_broker.host, private_broker.port, backoff_initial=0.05, backoff_max=0.5
    )
    await conn.start()
    try:
        await conn.wait_connected(5)
        got: list[MqttMessage] = []
        await conn.subscribe(f"{base}/telemetry/#", got.append)
        async with responder(private_broker, base, silent=True):
            async def in_flight() -> object:
                return await conn.request(
                    f"{base}/cmd/measure", {"x": 1}, lambda i: f"{base}/ack/{i}", timeout=30
                )

            pending = asyncio.create_task(in_flight())
            await wait_for(lambda: conn.stats.requests == 1, what="command sent")
            await asyncio.to_thread(private_broker.stop)
            with pytest.raises(NotConnected):
                await asyncio.wait_for(pending, 5)  # fails at once: no 30 s hang
        assert not conn.connected
        with pytest.raises(NotConnected):
            await conn.publish(f"{base}/x", b"1", qos=1)
        await asyncio.to_thread(private_broker.start)
        await conn.wait_connected(10)
        assert conn.stats.reconnects == 1
        async with aiomqtt.Client(private_broker.host, private_broker.port) as raw:
            await raw.publish(f"{base}/telemetry/t", b"25.0", qos=1)
        await wait_for(lambda: [m for m in got if m.topic == f"{base}/telemetry/t"],
                       what="message after the restart")
    finally:
        await conn.stop()


@pytest.mark.faults
async def test_status_online_offline_and_last_will_on_sigkill(mosquitto: Mosquitto) -> None:
    cell = f"c{uuid.uuid4().hex[:6]}"
    status = f"labd/{cell}/status"
    script = (
        "import asyncio, sys\n"
        "from drivers.transports.mqtt import MqttConnection\n"
        "async def main():\n"
        f"    c = MqttConnection('labd', '{mosquitto.host}', {mosquitto.port},"
        f" status_topic='{status}')\n"
        "    await c.start()\n"
        "    await c.wait_connected(10)\n"
        "    print('ready', flush=True)\n"
        "    await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    states: list[dict[str, object]] = []
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as raw:
        await raw.subscribe(status, qos=1)

        async def collect() -> None:
            async for m in raw.messages:
                assert isinstance(m.payload, bytes)
                if m.payload:
                    states.append(json.loads(m.payload))

        collector = asyncio.create_task(collect())
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, cwd=REPO, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line.strip() == b"ready"
            await wait_for(lambda: {"state": "online"} in states, what="online status")
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await wait_for(lambda: states[-1] == {"state": "offline"}, what="last will")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector

        # A clean stop publishes offline itself (a clean disconnect does not fire the will).
        conn = MqttConnection("labd", mosquitto.host, mosquitto.port, status_topic=status)
        await conn.start()
        await conn.wait_connected(5)
        await conn.stop()
        got: list[bytes] = []
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as check:
            await check.subscribe(status, qos=1)
            async for m in check.messages:
                assert isinstance(m.payload, bytes)
                got.append(m.payload)
                break
        assert json.loads(got[0]) == {"state": "offline"}
        await raw.publish(status, b"", qos=1, retain=True)
