"""MT-SICS (Mettler Toledo Standard Interface Command Set) replies, as a host reads them.

Shared by the balance (:mod:`drivers.instruments.balance`) and the Quantos doser
(:mod:`drivers.instruments.doser`), whose built-in balance speaks the same level 0/1 commands.

A reply line is ``<command> <status> [values]``, fields separated by spaces, strings in double
quotes. What this module knows:

* ``ES`` (syntax error: unknown command), ``ET`` (transmission error), ``EL`` (logical error) can
  answer *any* command: :func:`check_reply` turns them into
  :class:`~drivers.errors.InstrumentError` with that code.
* A reply must start with the command's reply name (``S`` for ``S`` and ``SI``, ``Z`` for ``Z``,
  ``QRA 61 1`` for ``QRA 61 1``). Anything else is a garbled line or a late reply to an earlier
  command, and is a :class:`~drivers.errors.ProtocolError` (MT-SICS has no checksum, so this and
  strict number parsing are all a host can check).
* Weight replies ``S S <w> <unit>`` (stable), ``S D <w> <unit>`` (dynamic), ``S I`` (no stable
  value in time, or busy), ``S +`` / ``S -`` (overload / underload): :func:`parse_weight`, which
  converts the unit to grams.
* Two-phase replies of long commands: ``<cmd> B`` (accepted, executing) then ``<cmd> A`` (done)
  or ``<cmd> I <n>`` (failed with code ``n``); a command that cannot start answers ``I <n>`` at
  once, without ``B``: :func:`parse_status`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

from ..errors import InstrumentError, ProtocolError

#: Generic MT-SICS error replies (any command).
GENERIC_ERRORS = {
    "ES": "syntax error: the instrument does not know the command (or its parameters)",
    "ET": "transmission error: the instrument received bytes it could not read",
    "EL": "logical error: the command cannot be executed",
}

#: Grams per unit, for the units a balance can be set to show and that are masses.
UNITS_G = {"g": 1.0, "mg": 1e-3, "kg": 1e3, "ug": 1e-6}

_NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?$")


def split_reply(line: str) -> list[str]:
    """Tokens of a reply line: fields split on spaces, ``"..."`` kept whole (without quotes)."""
    tokens: list[str] = []
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c in " \t":
            i += 1
        elif c == '"':
            end = line.find('"', i + 1)
            if end < 0:
                raise ValueError(f"unterminated string in {line!r}")
            tokens.append(line[i + 1 : end])
            i = end + 1
        else:
            j = i
            while j < n and line[j] not in " \t":
                j += 1
            tokens.append(line[i:j])
            i = j
    return tokens


def check_reply(device: str, command: str, line: str, reply_name: str) -> list[str]:
    """The reply's fields after ``reply_name``; generic errors and foreign lines raise.

    ``reply_name`` is how the instrument names the command in its reply (``S`` for ``SI``,
    ``QRA 60 7`` for ``QRA 60 7 3``).
    """
    stripped = line.strip()
    if stripped in GENERIC_ERRORS:
        raise InstrumentError(device, command, stripped, GENERIC_ERRORS[stripped])
    if not stripped.isascii() or not stripped.isprintable():
        raise ProtocolError(device, command, "reply has non-printable characters",
                            line.encode("utf-8", "backslashreplace"))
    try:
        tokens = split_reply(stripped)
    except ValueError as exc:
        raise ProtocolError(device, command, str(exc), line.encode()) from exc
    name = reply_name.split()
    if tokens[: len(name)] != name or len(tokens) == len(name):
        raise ProtocolError(device, command, f"expected a reply starting {reply_name!r}",
                            line.encode())
    return tokens[len(name) :]


def decimals(text: str) -> int:
    """Decimal places of a number as the instrument printed it (``'100.00'`` -> 2)."""
    exponent = Decimal(text).as_tuple().exponent
    return max(0, -int(exponent))


@dataclass(frozen=True)
class Weight:
    """A weight reply: the value in grams, whether it is stable, and how it was printed."""

    grams: float
    stable: bool
    unit: str
    #: Decimal places the balance printed, in grams (its readability, e.g. 4 for 0.1 mg).
    decimals: int


#: Meanings of the status letters of weight-like replies that carry no value.
WEIGHT_STATUS = {
    "I": "not executed: the balance is busy or had no stable value in time",
    "+": "overload: the load is above the balance's capacity (or the zero range)",
    "-": "underload: the load is below zero (weighing pan missing?) or the zero range",
}


def parse_weight(device: str, command: str, line: str, reply_name: str = "S") -> Weight:
    """``<name> S|D <value> <unit>`` -> :class:`Weight` in grams.

    ``<name> I``, ``<name> +``, ``<name> -`` raise :class:`InstrumentError` with that code.
    """
    fields = check_reply(device, command, line, reply_name)
    status = fields[0]
    if status in WEIGHT_STATUS and len(fields) == 1:
        raise InstrumentError(device, command, status, WEIGHT_STATUS[status])
    if status not in ("S", "D") or len(fields) != 3:
        raise ProtocolError(device, command, "not a weight reply", line.encode())
    value, unit = fields[1], fields[2]
    if not _NUMBER.match(value):
        raise ProtocolError(device, command, f"weight {value!r} is not a number", line.encode())
    factor = UNITS_G.get(unit)
    if factor is None:
        raise ProtocolError(
            device, command, f"unit {unit!r} is not a mass unit this driver knows "
            f"({', '.join(UNITS_G)}); set the balance's host unit to g", line.encode(),
        )
    places = decimals(value)
    if factor != 1.0:
        # mg printed with 2 decimals is 5 decimals of a gram, kg with 3 is 0.
        places = max(0, places - round(Decimal(factor).log10()))
    return Weight(float(value) * factor, status == "S", unit, places)


@dataclass(frozen=True)
class Status:
    """A status reply of a command: its letter (``A``, ``B``, ``I``, ``L``...) and the rest."""

    letter: str
    values: list[str]
    #: ``I <n>``: the instrument's error code.
    code: int | None = None


def parse_status(device: str, command: str, line: str, reply_name: str) -> Status:
    """``<name> [values] A|B``, ``<name> I [n]``, ``<name> L`` -> :class:`Status`.

    Values come *before* the status letter in query replies (``QRD 2 3 7 2 A``); an error reply
    puts its code after ``I`` (``QRA 61 1 I 7``).
    """
    fields = check_reply(device, command, line, reply_name)
    if fields[0] == "I":
        if len(fields) == 1:
            return Status("I", [], None)
        if len(fields) == 2 and fields[1].isdigit():
            return Status("I", [], int(fields[1]))
        raise ProtocolError(device, command, "bad error reply", line.encode())
    if fields[-1] in ("A", "B"):
        return Status(fields[-1], fields[:-1])
    if fields == ["L"] or fields == ["+"] or fields == ["-"]:
        return Status(fields[0], [])
    raise ProtocolError(device, command, "unknown status", line.encode())
