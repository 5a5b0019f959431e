"""MQTT forwarder: every journaled document to the lab's broker, at QoS 1.

Topics (``<cell>`` from the config):

* ``labd/<cell>/runs/<run_uid>/<document name>``: every document (``start``, ``descriptor``,
  ``event``, ``stop``, ``resource``, ``datum``, ...) as the JSON the journal stored, with
  event-model's field names, QoS 1, not retained.
* ``labd/<cell>/runs/<run_uid>``: a retained summary of the run, updated after every delivered
  batch that touched it: ``{"uid", "plan_name", "protocol", "campaign", "sample_id", "status"
  ("running" or the stop document's exit status), "start_time", "stop_time", "num_events"}``.
* ``labd/<cell>/samples/<sample_id>``: a retained message per sample
  (:meth:`labd.samples.SampleRow.as_dict`), from the ``sample`` stream's events.

Delivery: a batch is published in order with up to ``max_inflight`` messages awaiting PUBACK at
once; the cursor advances when every PUBACK of the batch arrived. After a failure the whole batch
is sent again: a subscriber may see a document twice (QoS 1 is at least once); the uid in the
payload is what a store deduplicates on.

aiomqtt is used directly rather than :class:`drivers.transports.mqtt.MqttConnection`: that
connection reconnects on its own schedule and drops publishes while down, whereas a forwarder
must own the connect/deliver/backoff cycle so that its cursor, backlog and error are one story.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any

import aiomqtt
from aiomqtt import MqttCodeError, MqttError
from aiomqtt.exceptions import MqttConnectError

from drivers.aio import wait_for
from labd.hub.base import Forwarder, HubError, RunDocuments
from labd.journal import Journal, JournalRecord
from labd.samples import SAMPLE_STREAM

_LOGIN_CODES = {4, 5, 134, 135}  # bad user name or password / not authorized (v3.1.1 and v5)


class MqttForwarder(Forwarder):
    def __init__(
        self,
        journal: Journal,
        *,
        cell: str,
        host: str,
        port: int = 1883,
        username: str | None = None,
        password: str | None = None,
        name: str = "mqtt",
        topic_root: str = "labd",
        connect_timeout: float = 5.0,
        ack_timeout: float = 10.0,
        max_inflight: int = 200,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, journal, **kwargs)
        self.cell = cell
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.root = f"{topic_root}/{cell}"
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
        self.max_inflight = max_inflight
        self.target = f"mqtt://{host}:{port}"
        self._client: aiomqtt.Client | None = None
        self._summaries: dict[str, dict[str, Any]] = {}
        self._docs = RunDocuments(journal)

    async def connect(self) -> None:
        client = aiomqtt.Client(
            self.host, self.port, identifier=f"labd-{self.cell}-hub-{self.name}",
            username=self.username, password=self.password, timeout=self.connect_timeout,
            max_inflight_messages=self.max_inflight,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        # aiomqtt warns above 10 publishes awaiting PUBACK; a batch in flight is the design here.
        client.pending_calls_threshold = self.batch_size + 1000
        await client.__aenter__()
        self._client = client

    async def disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(MqttError, TimeoutError):
                await wait_for(client.__aexit__(None, None, None), 2.0)
            # aiomqtt stores an unexpected disconnection in a future that only its message
            # iterator reads (we never iterate): read it, or asyncio logs it as never retrieved.
            lost = getattr(client, "_disconnected", None)
            if isinstance(lost, asyncio.Future) and lost.done() and not lost.cancelled():
                lost.exception()

    def describe_error(self, exc: BaseException) -> str:
        if isinstance(exc, ExceptionGroup):
            exc = exc.exceptions[0]
        where = f"MQTT broker {self.host}:{self.port}"
        if isinstance(exc, MqttConnectError):  # a CONNACK's code; a publish's codes are
            rc = getattr(exc.rc, "value", exc.rc)  # paho's own (4 there: not connected)
            if rc in _LOGIN_CODES:
                who = f"user {self.username!r}" if self.username else "an anonymous client"
                return (f"{where} refused the login of {who}: {exc} (check the username and"
                        " password in the config)")
            return f"{where} refused the connection: {exc}"
        if isinstance(exc, MqttCodeError):
            return f"lost the connection to {where}: {exc}"
        text = str(exc)
        if isinstance(exc, TimeoutError) or "timed out" in text:
            return f"no acknowledgement from {where} within {self.ack_timeout:g} s: {text}"
        if "Connection refused" in text or "Errno 111" in text:
            return f"cannot reach {where}: connection refused (is the broker running?)"
        if "Name or service not known" in text or "Temporary failure in name" in text:
            return f"cannot reach {where}: unknown host {self.host!r}"
        if isinstance(exc, MqttError):
            return f"lost the connection to {where}: {text}"
        return super().describe_error(exc)

    # -- delivery -------------------------------------------------------------------------------
    async def deliver(self, records: list[JournalRecord]) -> None:
        client = self._client
        if client is None:
            raise HubError(f"not connected to MQTT broker {self.host}:{self.port}")
        retained: dict[str, bytes] = {}
        touched: set[str] = set()
        messages: list[tuple[str, bytes]] = []
        for rec in records:
            run = rec.run_uid or "unknown"
            messages.append((f"{self.root}/runs/{run}/{rec.name}", rec.doc_json.encode()))
            if rec.run_uid is not None:
                touched.add(rec.run_uid)
                sample = await self._track(rec)
                if sample is not None:
                    retained[f"{self.root}/samples/{sample['sample_id']}"] = json.dumps(
                        sample, separators=(",", ":")).encode()
        for uid in touched:
            summary = self._summaries.get(uid)
            if summary is not None:
                retained[f"{self.root}/runs/{uid}"] = json.dumps(
                    summary, separators=(",", ":")).encode()
        async with asyncio.timeout(self.ack_timeout + 0.01 * len(messages)):
            async with asyncio.TaskGroup() as tg:  # scheduled (hence sent) in order
                for topic, payload in messages:
                    tg.create_task(client.publish(topic, payload, qos=1,
                                                  timeout=self.ack_timeout))
                for topic, payload in retained.items():
                    tg.create_task(client.publish(topic, payload, qos=1, retain=True,
                                                  timeout=self.ack_timeout))
        for uid in touched:  # finished runs need no summary any more
            if self._summaries.get(uid, {}).get("status") not in (None, "running"):
                self._summaries.pop(uid, None)

    async def _track(self, rec: JournalRecord) -> dict[str, Any] | None:
        """Update the run summary with ``rec``; return a sample row if it is a sample event."""
        uid = rec.run_uid
        assert uid is not None
        self._docs.note(rec)
        if rec.name == "start":
            doc = rec.doc
            self._summaries[uid] = {
                "uid": uid, "plan_name": doc.get("plan_name"), "protocol": doc.get("protocol"),
                "campaign": doc.get("campaign"), "sample_id": doc.get("sample_id"),
                "status": "running", "start_time": doc["time"], "stop_time": None,
                "num_events": 0,
            }
            return None
        summary = self._summaries.get(uid)
        if summary is None:  # restarted in the middle of a run: rebuild from the journal
            summary = await asyncio.to_thread(self._summary_from_journal, uid, rec.seq)
            if summary is None:
                return None
            self._summaries[uid] = summary
        if rec.name == "stop":
            doc = rec.doc
            summary.update(status=doc.get("exit_status"), stop_time=doc["time"])
        elif rec.name == "event":
            summary["num_events"] += 1
            if rec.stream == SAMPLE_STREAM:
                row = await self._docs.sample(rec)
                return None if row is None else row.as_dict()
        return None

    def _summary_from_journal(self, uid: str, seq: int) -> dict[str, Any] | None:
        starts = self.journal.documents(uid, ("start",))
        if not starts:
            return None
        doc = starts[0].doc
        n = sum(1 for r in self.journal.documents(uid, ("event",)) if r.seq < seq)
        return {
            "uid": uid, "plan_name": doc.get("plan_name"), "protocol": doc.get("protocol"),
            "campaign": doc.get("campaign"), "sample_id": doc.get("sample_id"),
            "status": "running", "start_time": doc["time"], "stop_time": None, "num_events": n,
        }
