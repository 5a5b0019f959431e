"""Wire logging: every byte a transport sends or receives, at DEBUG on ``labd.wire.<device>``.

Lines read ``> <data>`` (host to device) and ``< <data>`` (device to host). ASCII traffic is
shown as a Python ``repr`` (``> b'S\\r\\n'``), binary frames as spaced hex
(``> 01 03 00 01 00 01 D5 CA``). MQTT traffic is shown as ``> <topic> <payload>``. Enable with
``logging.getLogger("labd.wire").setLevel(logging.DEBUG)`` (or per device).
"""

from __future__ import annotations

import logging

_PRINTABLE = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D}


def format_bytes(data: bytes) -> str:
    """``repr`` for text (printable ASCII, tab, CR, LF), spaced upper-case hex otherwise."""
    if data and all(b in _PRINTABLE for b in data):
        return repr(data)
    return data.hex(" ").upper() if data else "b''"


class WireLog:
    """The wire logger of one device (cheap when DEBUG is off: one level check per frame)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.logger = logging.getLogger(f"labd.wire.{device}")

    def tx(self, data: bytes) -> None:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("> %s", format_bytes(data))

    def rx(self, data: bytes) -> None:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("< %s", format_bytes(data))

    def note(self, text: str) -> None:
        """A link event in the same stream (opened, closed, flushed stale bytes)."""
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("# %s", text)

    def mqtt(self, outgoing: bool, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if self.logger.isEnabledFor(logging.DEBUG):
            flags = f" qos={qos}" + (" retain" if retain else "")
            self.logger.debug(
                "%s %s %s%s", ">" if outgoing else "<", topic, format_bytes(payload), flags
            )
