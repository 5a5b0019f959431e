"""Hub forwarders: the journal's documents to the lab's data hub (MQTT, PostgreSQL).

``Forwarder`` (base: durable cursor, backlog, backoff, status), ``MqttForwarder``,
``PostgresForwarder``; see each module. ``labd.hub.tiled.TiledForwarder`` (the optional extra
``labd[tiled]``) is imported from its module, so that labd runs without Tiled installed.
"""

from labd.hub.base import Forwarder, ForwarderStatus, HubError
from labd.hub.mqtt import MqttForwarder
from labd.hub.postgres import PostgresForwarder, migrate

__all__ = [
    "Forwarder", "ForwarderStatus", "HubError", "MqttForwarder", "PostgresForwarder", "migrate",
]
