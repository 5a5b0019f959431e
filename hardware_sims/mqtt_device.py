"""What the MQTT simulators share: a broker connection that behaves like a real device's.

Topic root of a device: ``R = <prefix>/<cell>/<device>`` (e.g. ``labd-sim/sim-cell/station``),
with ``prefix`` from the cell's ``mqtt`` section. Everything a device publishes is QoS 1.

``R/status`` (retained)
    ``{"state": "online", "model": ..., "serial": ..., "ts": <unix s>}`` once the device has
    subscribed to its commands and published its retained telemetry; the connection's last will
    (retained, QoS 1) is ``{"state": "offline"}``; a clean stop publishes ``{"state": "offline"}``
    retained before its MQTT DISCONNECT (so no will is needed then).

``ts`` fields are the device's own clock: Unix seconds that run at the cell's virtual time scale,
anchored at the wall clock when the simulator was created (``anchor + clock.now()``).

Connection and reconnection
    MQTT 3.1.1, client id ``<prefix>-<cell>-<device>`` (fixed, so a reconnect takes over a stale
    session on the broker), keepalive ``keepalive_s``. aiomqtt 2.x does not reconnect by itself:
    the device runs a loop that connects, subscribes, re-publishes its retained status and
    telemetry, and on any :class:`aiomqtt.MqttError` (broker restart, link loss) waits
    ``reconnect_min_s`` doubling to ``reconnect_max_s`` (wall-clock) before trying again — never
    a zero-delay spin. Replies that could not be delivered while disconnected (acks, results) are
    kept in order and published after the next connection, as a QoS 1 client's offline queue does.

The network link
    The device reaches the broker through a TCP relay of its own on 127.0.0.1 (its "network
    cable"), so link faults happen on a real socket without touching the client library:

    ``drop_off`` (duration_s)
        the device vanishes (power loss, crash): both TCP connections are reset, no DISCONNECT is
        sent, so the broker publishes the last will ``{"state": "offline"}`` at once. The device
        is dead meanwhile (does not reconnect; in-progress work is lost); after ``duration_s``
        wall-clock seconds (``0``: until the fault is cleared) it boots, reconnects and publishes
        ``{"state": "online"}`` again.
    ``disconnect`` (duration_s)
        silent network loss: bytes in both directions are dropped, nothing is closed. The broker
        notices only by keepalive and publishes the will after 1.5 × ``keepalive_s`` (mosquitto
        2.0.11 checks keepalives every few seconds: measured ≈5 s for keepalive 1-2 s, ≈11 s
        for 4 s); the device notices by its own missing PINGRESP and keeps retrying (refused
        while the link is down).
        When the link comes back the stale connections are reset and the device reconnects at
        once (taking over its old session if the broker still holds it, in which case no will
        is published). Use a small ``keepalive_s`` to see the will quickly in tests.

Reply faults (``no_reply``, ``late_reply``, ``garble``, ``truncate``) act on each reply message
(one reply = one publication); see the device modules for what counts as a reply there.
``garble`` flips bits so the payload is no longer valid JSON (often not valid UTF-8 either);
``truncate`` publishes the first half of the payload bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from abc import abstractmethod
from collections import deque
from typing import Any, ClassVar

import aiomqtt

from .base import DeviceConfig, SimContext, SimInstrument
from .faults import Fault, FaultBox, FaultKind

#: How long :meth:`MqttDevice.start` waits for the first connection (wall-clock seconds).
START_TIMEOUT_S = 10.0
#: aiomqtt operation timeout (connect, subscribe, QoS 1 publish), wall-clock seconds.
OPERATION_TIMEOUT_S = 5.0


class LinkDown(ConnectionRefusedError):
    """The simulated network link is down (a ``disconnect`` or ``drop_off`` fault)."""


class _Pipe:
    """One relayed TCP connection: device side <-> broker side."""

    def __init__(
        self,
        link: NetworkLink,
        down: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        up: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.link = link
        self.down_w = down[1]
        self.up_w = up[1]
        self.tasks = [
            asyncio.create_task(self._pump(down[0], self.up_w)),
            asyncio.create_task(self._pump(up[0], self.down_w)),
        ]

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                if self.link.silent:
                    continue  # lost on the wire
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if self.link.silent:
                # A peer's FIN is lost on a dead link too: close only the side that ended.
                (self.up_w if dst is self.down_w else self.down_w).close()
            else:
                self.close()

    def close(self) -> None:
        """Forward an orderly end of the connection to both sides (flushes what was written)."""
        for w in (self.down_w, self.up_w):
            if not w.is_closing():
                w.close()
        self.link.pipes.discard(self)

    def abort(self) -> None:
        """Reset both TCP connections at once (nothing more is sent, no DISCONNECT)."""
        for w in (self.down_w, self.up_w):
            w.transport.abort()
        for t in self.tasks:
            t.cancel()
        self.link.pipes.discard(self)


class NetworkLink:
    """The device's network cable: a TCP relay from 127.0.0.1:<port> to the broker.

    The device calls :meth:`prepare` (opens the broker side, or raises like a refused connect)
    and then connects its MQTT client to :attr:`port`; the relay pairs the two.
    """

    def __init__(self, broker_host: str, broker_port: int) -> None:
        self.broker_host = broker_host
        self.broker_port = broker_port
        self.host = "127.0.0.1"
        self.port = 0
        self.down = False
        self.silent = False
        self.pipes: set[_Pipe] = set()
        self._server: asyncio.Server | None = None
        self._pending: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def prepare(self) -> None:
        """Open the broker side of the next connection (raises :class:`OSError` if it cannot)."""
        self._drop_pending()
        if self.down:
            raise LinkDown("network link is down")
        self._pending = await asyncio.wait_for(
            asyncio.open_connection(self.broker_host, self.broker_port), OPERATION_TIMEOUT_S
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up, self._pending = self._pending, None
        if up is None or self.down:
            writer.transport.abort()
            if up is not None:
                up[1].transport.abort()
            return
        self.pipes.add(_Pipe(self, (reader, writer), up))

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._pending[1].transport.abort()
            self._pending = None

    def sever(self) -> None:
        """Cut the cable of a device that vanished: reset every connection, refuse new ones."""
        self.down = True
        self._drop_pending()
        for pipe in list(self.pipes):
            pipe.abort()

    def go_silent(self) -> None:
        """Silent network loss: drop every byte both ways, close nothing, refuse new ones."""
        self.down = True
        self.silent = True
        self._drop_pending()

    def restore(self) -> None:
        """Plug the cable back in; connections that went through a dead link are reset."""
        for pipe in list(self.pipes):
            pipe.abort()
        self.down = False
        self.silent = False

    async def close(self) -> None:
        self.sever()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


class MqttDevice(SimInstrument):
    """Base of the MQTT simulators: connection loop, status and will, link faults, replies.

    Subclasses implement :meth:`status_extra`, :meth:`subscriptions`, :meth:`publish_retained`
    (their retained telemetry, called on every connection) and :meth:`handle` (one incoming
    message; must not block, long work goes to :meth:`spawn`), and :meth:`on_power_loss`.
    """

    #: Fault kinds this device understands (others are refused by :meth:`set_fault`).
    supported_faults: ClassVar[frozenset[FaultKind]] = frozenset(
        {
            FaultKind.NO_REPLY,
            FaultKind.LATE_REPLY,
            FaultKind.GARBLE,
            FaultKind.TRUNCATE,
            FaultKind.ERROR,
            FaultKind.DISCONNECT,
            FaultKind.DROP_OFF,
        }
    )

    def __init__(self, name: str, config: DeviceConfig, ctx: SimContext) -> None:
        super().__init__(name, config, ctx)
        self.log = logging.getLogger(f"hardware_sims.{name}")
        self.root = f"{ctx.mqtt.prefix}/{ctx.cell}/{name}"
        self.status_topic = f"{self.root}/status"
        self.client_id = f"{ctx.mqtt.prefix}-{ctx.cell}-{name}"
        self.link = NetworkLink(ctx.mqtt.host, ctx.mqtt.port)
        self._anchor = time.time() - ctx.clock.now()
        self._client: aiomqtt.Client | None = None
        self._runner: asyncio.Task[None] | None = None
        self._online = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopping = False
        self._dropped = False
        self._silent = False
        self._outbox: deque[tuple[str, bytes]] = deque()
        self._outbox_lock = asyncio.Lock()
        #: Set when the current connection ends (fails the publications waiting for a PUBACK).
        self._lost = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._fault_timers: dict[FaultKind, asyncio.Task[None]] = {}
        self.connections = 0
        self.faults.on_event(self._on_event_fault)

    # -- to implement ------------------------------------------------------------------------------
    @abstractmethod
    def status_extra(self) -> dict[str, Any]:
        """``model`` and ``serial`` for the online status."""

    @abstractmethod
    def subscriptions(self) -> list[str]:
        """Topic filters to subscribe to (QoS 1) on every connection."""

    @abstractmethod
    async def publish_retained(self) -> None:
        """Publish the device's retained telemetry (on connect, before the online status)."""

    @abstractmethod
    async def handle(self, message: aiomqtt.Message) -> None:
        """One incoming message."""

    def on_power_loss(self) -> None:
        """The device vanished (``drop_off``): forget volatile state, abort work."""

    # -- helpers -----------------------------------------------------------------------------------
    def ts(self) -> float:
        """The device clock: Unix seconds at the virtual time scale."""
        return round(self._anchor + self.ctx.clock.now(), 3)

    @property
    def connected(self) -> bool:
        return self._client is not None and self._online.is_set()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` as a task the device owns (cancelled on stop and on power loss)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("%s: task failed", self.name, exc_info=task.exception())

    def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def publish(
        self, topic: str, payload: bytes | dict[str, Any], *, retain: bool = False
    ) -> bool:
        """Publish at QoS 1. A non-retained message that cannot be sent now (not connected, or
        the connection is lost before its PUBACK) is queued and sent, in order, as soon as the
        device is connected again; retained state is re-published from the device state anyway."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        client, lost = self._client, self._lost
        if (
            client is not None
            and not self._dropped
            and await self._send(client, lost, topic, data, retain)
        ):
            return True
        if not retain and not self._dropped:
            self._outbox.append((topic, data))
            if self._client is not None and self._online.is_set():
                self.spawn(self._flush_outbox())
        return False

    async def _send(
        self, client: aiomqtt.Client, lost: asyncio.Event, topic: str, data: bytes, retain: bool
    ) -> bool:
        """One QoS 1 publication on ``client``; False if it fails or the connection is lost
        first (aiomqtt would otherwise wait for the PUBACK until its timeout)."""
        pub = asyncio.ensure_future(
            client.publish(topic, data, qos=1, retain=retain, timeout=OPERATION_TIMEOUT_S)
        )
        gone = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait({pub, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not pub.done():
                pub.cancel()
        if pub.cancelled() or not pub.done():
            self.log.info("%s: connection lost before %s was acknowledged", self.name, topic)
            return False
        exc = pub.exception()
        if exc is not None:
            if not isinstance(exc, aiomqtt.MqttError):
                raise exc
            self.log.info("%s: publish to %s failed (%s)", self.name, topic, exc)
            return False
        return True

    async def _flush_outbox(self) -> None:
        """Send the queued replies in order on the current connection (stops at a failure)."""
        async with self._outbox_lock:
            while self._outbox:
                client, lost = self._client, self._lost
                if client is None or self._dropped:
                    return
                topic, data = self._outbox[0]
                if not await self._send(client, lost, topic, data, False):
                    return
                self._outbox.popleft()

    async def reply(self, topic: str, payload: dict[str, Any], *, retain: bool = False) -> None:
        """Publish one reply through the reply faults (no_reply, late_reply, garble, truncate)."""
        data = json.dumps(payload).encode()
        fault = self.faults.take_reply_fault()
        if fault is not None:
            if fault.kind is FaultKind.NO_REPLY:
                self.log.info("%s: no_reply fault swallows %s", self.name, topic)
                return
            if fault.kind is FaultKind.LATE_REPLY:
                await asyncio.sleep(fault.delay_s)
            elif fault.kind is FaultKind.GARBLE:
                data = self._garble_json(data)
            elif fault.kind is FaultKind.TRUNCATE:
                data = FaultBox.truncate(data)
        await self.publish(topic, data, retain=retain)

    def _garble_json(self, data: bytes) -> bytes:
        """Line-noise the payload until it is certainly not valid JSON any more."""
        for _ in range(16):
            garbled = self.faults.garble(data)
            try:
                json.loads(garbled)
            except ValueError:
                return garbled
        return b"\xff" + data[1:]

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        for fault in self.config.faults:
            self._check_fault(fault)
        await self.link.start()
        self._runner = asyncio.create_task(self._run(), name=f"{self.name}-mqtt")
        try:
            await asyncio.wait_for(self._online.wait(), START_TIMEOUT_S)
        except TimeoutError:
            await self.stop()
            raise ConnectionError(
                f"{self.name}: no MQTT broker reachable at {self.ctx.mqtt.host}:"
                f"{self.ctx.mqtt.port} within {START_TIMEOUT_S:g} s"
            ) from None
        await self.apply_initial_faults()

    async def stop(self) -> None:
        self._stopping = True
        for timer in self._fault_timers.values():
            timer.cancel()
        self._fault_timers.clear()
        self._cancel_tasks()
        client = self._client
        if client is not None and not self._dropped and self._online.is_set():
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(
                    self.status_topic,
                    json.dumps({"state": "offline"}),
                    qos=1,
                    retain=True,
                    timeout=OPERATION_TIMEOUT_S,
                )
        if self._runner is not None:
            self._runner.cancel()  # leaving `async with client` sends DISCONNECT
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        await self.link.close()

    def endpoint(self) -> dict[str, Any]:
        return {
            "transport": "mqtt",
            "address": f"{self.ctx.mqtt.host}:{self.ctx.mqtt.port}",
            "root": self.root,
            "status": self.status_topic,
            "client_id": self.client_id,
        }

    def link_state(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "powered": not self._dropped,
            "link": "silent" if self.link.silent else ("down" if self.link.down else "up"),
            "connections": self.connections,
            "queued_replies": len(self._outbox),
            "faults": self.faults.state(),
        }

    async def _run(self) -> None:
        delay = self._reconnect_min()
        while not self._stopping:
            if self._dropped:
                self._wake.clear()
                await self._wake.wait()
                continue
            before = self.connections
            try:
                await self._session()
            except (aiomqtt.MqttError, OSError) as exc:
                self.log.info("%s: MQTT connection lost or refused: %s", self.name, exc)
            finally:
                self._lost.set()
                self._client = None
                self._online.clear()
            if self._stopping or self._dropped:
                continue
            if self.connections > before:  # was connected: start the backoff afresh
                delay = self._reconnect_min()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            delay = min(delay * 2, self._reconnect_max())

    def _reconnect_min(self) -> float:
        return float(getattr(self.config, "reconnect_min_s", 0.1))

    def _reconnect_max(self) -> float:
        return float(getattr(self.config, "reconnect_max_s", 2.0))

    async def _session(self) -> None:
        await self.link.prepare()
        mqtt = self.ctx.mqtt
        client = aiomqtt.Client(
            self.link.host,
            self.link.port,
            username=mqtt.username,
            password=mqtt.password,
            identifier=self.client_id,
            keepalive=int(getattr(self.config, "keepalive_s", 10)),
            timeout=OPERATION_TIMEOUT_S,
            will=aiomqtt.Will(
                self.status_topic, json.dumps({"state": "offline"}), qos=1, retain=True
            ),
            # Without it paho's Nagle delay adds ~40 ms to every reply the instrument sends.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        async with client:
            self._lost = asyncio.Event()
            self._client = client
            self.connections += 1
            for topic in self.subscriptions():
                await client.subscribe(topic, qos=1)
            await self.publish_retained()
            await client.publish(
                self.status_topic,
                json.dumps({"state": "online", **self.status_extra(), "ts": self.ts()}),
                qos=1,
                retain=True,
            )
            self._online.set()
            self.log.info("%s: online at %s", self.name, self.root)
            await self._flush_outbox()
            async for message in client.messages:
                try:
                    await self.handle(message)
                except Exception:
                    self.log.exception("%s: error handling %s", self.name, message.topic)

    # -- faults ------------------------------------------------------------------------------------
    def _check_fault(self, fault: Fault) -> None:
        if fault.kind not in self.supported_faults:
            raise ValueError(
                f"{self.name}: fault {fault.kind.value!r} does not apply to this device"
            )

    async def set_fault(self, fault: Fault) -> None:
        self._check_fault(fault)
        await super().set_fault(fault)

    async def clear_fault(self, kind: FaultKind | None = None) -> None:
        await super().clear_fault(kind)
        for k in (FaultKind.DROP_OFF, FaultKind.DISCONNECT):
            if kind is None or kind is k:
                self._end_link_fault(k)

    async def _on_event_fault(self, fault: Fault) -> None:
        if fault.kind is FaultKind.DROP_OFF:
            self.log.info("%s: drop_off (device vanishes)", self.name)
            self._dropped = True
            self._online.clear()
            self._outbox.clear()
            self._cancel_tasks()
            self.on_power_loss()
            self.link.sever()
        elif fault.kind is FaultKind.DISCONNECT:
            self.log.info("%s: disconnect (silent network loss)", self.name)
            self._silent = True
            if not self._dropped:
                self.link.go_silent()
        else:
            return
        old = self._fault_timers.pop(fault.kind, None)
        if old is not None:
            old.cancel()
        if fault.duration_s > 0:
            self._fault_timers[fault.kind] = asyncio.create_task(
                self._end_after(fault.kind, fault.duration_s)
            )

    async def _end_after(self, kind: FaultKind, duration_s: float) -> None:
        await asyncio.sleep(duration_s)  # fault durations are wall-clock (faults.py)
        self._fault_timers.pop(kind, None)
        self.faults.clear(kind)
        self._end_link_fault(kind)

    def _end_link_fault(self, kind: FaultKind) -> None:
        timer = self._fault_timers.pop(kind, None)
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()
        if kind is FaultKind.DROP_OFF:
            if not self._dropped:
                return
            self.log.info("%s: back from drop_off", self.name)
            self._dropped = False
        else:
            if not self._silent:
                return
            self.log.info("%s: network link restored", self.name)
            self._silent = False
        if self._dropped:
            self.link.sever()
        else:
            self.link.restore()
            if self._silent:
                self.link.go_silent()
        self._wake.set()
