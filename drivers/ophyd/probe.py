"""ophyd-async device for the Keithley 2400 four-point probe (client: drivers.instruments.probe).

``Probe`` (a :class:`StandardReadable`, Triggerable)::

    probe.resistance         ohm (hinted)   }
    probe.voltage            V              } the last 4-wire reading, set by trigger()
    probe.current            A              }
    probe.status_word        the 2400's status word of that reading
    probe.source_current     A  (configuration; writing it reconfigures the probe)
    probe.compliance_voltage V  (configuration; likewise)
    probe.four_wire          bool, ``:SYST:RSEN?`` (configuration, read-only)

``trigger()`` does one 4-wire measurement (:meth:`~drivers.instruments.probe.Probe.
measure_resistance`: output on for the reading only, then off) and completes when the reading
is in; ``read()`` then returns it. A reading in compliance or on an open circuit fails the
trigger's status with :class:`~drivers.instruments.probe.ProbeCompliance`, so a plan never
records a compliance voltage as a resistance.

``stop()`` and ``safe_state()`` switch the source output off (``:OUTP OFF``), the probe's safe
state.
"""

from __future__ import annotations

from ophyd_async.core import (
    AsyncStatus,
    SignalR,
    SignalRW,
    StandardReadable,
    StandardReadableFormat,
    soft_signal_r_and_setter,
)

from ..instruments.probe import Probe as ProbeClient
from ..instruments.probe import ProbeReading
from .backends import QuerySignalBackend


def _source(client: ProbeClient, what: str) -> str:
    return f"scpi+serial://{client.settings.link.url}/{what}"


class Probe(StandardReadable):
    """A Keithley 2400 wired as a four-point resistivity probe."""

    def __init__(self, client: ProbeClient, name: str = "") -> None:
        self.client = client
        self.last_reading: ProbeReading | None = None

        async def set_current(value: float) -> None:
            await client.configure_four_wire(value, self._compliance())

        async def set_compliance(value: float) -> None:
            await client.configure_four_wire(self._current(), value)

        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.resistance, self._set_resistance = soft_signal_r_and_setter(
                float, float("nan"), units="ohm", precision=6
            )
        with self.add_children_as_readables(StandardReadableFormat.CHILD):
            self.voltage, self._set_voltage = soft_signal_r_and_setter(
                float, float("nan"), units="V", precision=9
            )
            self.current, self._set_current = soft_signal_r_and_setter(
                float, float("nan"), units="A", precision=9
            )
            self.status_word, self._set_status = soft_signal_r_and_setter(int, 0)
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.source_current = SignalRW(QuerySignalBackend(
                float, _source(client, "SOUR:CURR"), read=client.source_current,
                write=set_current, poll_period=None, units="A", precision=9,
            ))
            self.compliance_voltage = SignalRW(QuerySignalBackend(
                float, _source(client, "SENS:VOLT:PROT"), read=client.compliance_voltage,
                write=set_compliance, poll_period=None, units="V", precision=3,
            ))
            self.four_wire = SignalR(QuerySignalBackend(
                bool, _source(client, "SYST:RSEN"), read=client.four_wire, poll_period=None,
            ))
        super().__init__(name=name)

    def _current(self) -> float:
        cfg = self.client.configured
        return cfg.source_current_a if cfg else self.client.settings.source_current_a

    def _compliance(self) -> float:
        cfg = self.client.configured
        return cfg.compliance_v if cfg else self.client.settings.compliance_v

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        """One 4-wire measurement; the signals hold it when the status completes."""
        reading = await self.client.measure_resistance()
        assert reading.resistance_ohm is not None  # measure_resistance raises otherwise
        self.last_reading = reading
        self._set_voltage(reading.voltage_v if reading.voltage_v is not None else float("nan"))
        self._set_current(reading.current_a if reading.current_a is not None else float("nan"))
        self._set_status(reading.status)
        self._set_resistance(reading.resistance_ohm)

    async def stop(self, success: bool = True) -> None:
        """Source output off (there is no motion to stop)."""
        await self.client.output_off()

    async def safe_state(self) -> None:
        """Source output off: the probe's safe state."""
        await self.client.output_off()


def make_probe_device(name: str, client: ProbeClient) -> Probe:
    return Probe(client, name=name)
