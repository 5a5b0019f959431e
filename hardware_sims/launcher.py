"""``labd-sim``: start the whole simulated cell, print where each instrument listens.

    labd-sim --config config/sim-cell.yaml [--ground-truth FILE --goal minimize|maximize]
             [--time-scale X] [--endpoints FILE]

Runs until SIGTERM or SIGINT, then stops every simulator and removes what it created (ptys and
their symlinks, the run directory if it made it, the endpoints file).

``labd-simctl`` talks to a running cell's control channel (faults, physical actions, state).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from .cell import SimCell, SimCellError
from .config import ConfigError, SimCellConfig, load_config
from .control import ControlClient, ControlError
from .faults import FaultKind
from .ground_truth import GroundTruthError

log = logging.getLogger("labd-sim")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="labd-sim",
        description="Run the simulated alloy-screening cell (wire-level instrument simulators).",
    )
    p.add_argument("--config", type=Path, help="cell YAML (default: the embedded defaults)")
    p.add_argument(
        "--ground-truth",
        type=Path,
        metavar="FILE",
        help="CSV of measured data to replay pool-based (header, element fractions, property last)",
    )
    p.add_argument(
        "--goal",
        choices=["minimize", "maximize"],
        help="whether lower or higher property values are better",
    )
    p.add_argument(
        "--time-scale", type=float, metavar="X", help="virtual seconds per wall-clock second"
    )
    p.add_argument(
        "--endpoints",
        type=Path,
        metavar="FILE",
        help="also write the endpoints as JSON to FILE (removed at exit)",
    )
    p.add_argument("--run-dir", type=Path, help="directory for pty symlinks (default: temporary)")
    p.add_argument("--mqtt", metavar="HOST:PORT", help="MQTT broker (overrides the config)")
    p.add_argument("--control-port", type=int, help="control channel port (0: a free port)")
    p.add_argument(
        "--ephemeral-ports",
        action="store_true",
        help="bind every TCP port to a free one (for test benches running in parallel)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def apply_overrides(cfg: SimCellConfig, args: argparse.Namespace) -> SimCellConfig:
    data = cfg.model_dump()
    gt = data["ground_truth"]
    if args.ground_truth is not None:
        gt["file"] = args.ground_truth.resolve()
        if args.goal is None and cfg.ground_truth.file is None:
            raise ConfigError("--ground-truth needs --goal minimize|maximize")
    if args.goal is not None:
        gt["goal"] = args.goal
    if args.time_scale is not None:
        data["time_scale"] = args.time_scale
    if args.run_dir is not None:
        data["run_dir"] = args.run_dir
    if args.mqtt:
        host, _, port = args.mqtt.rpartition(":")
        if not port.isdigit():
            raise ConfigError(f"--mqtt: expected HOST:PORT, got {args.mqtt!r}")
        data["mqtt"]["host"], data["mqtt"]["port"] = host or "127.0.0.1", int(port)
    if args.ephemeral_ports:
        data["control"]["port"] = 0
        for dev in data["devices"].values():
            serial = dev.get("serial")
            if serial and serial.get("tcp_port") is not None:
                serial["tcp_port"] = 0
            if dev.get("tcp_port") is not None:
                dev["tcp_port"] = 0
    if args.control_port is not None:  # an explicit port wins over --ephemeral-ports
        data["control"]["port"] = args.control_port
    from .config import validate_config

    return validate_config(data, "command line")


#: What each kind of simulated instrument speaks, for the start-up table.
PROTOCOLS = {
    "balance": "MT-SICS",
    "doser": "MT-SICS + QRA/QRD",
    "gantry": "GRBL 1.1 G-code",
    "furnace": "Modbus RTU / TCP",
    "probe": "SCPI (Keithley 2400)",
    "station": "MQTT cmd/ack/result",
    "safety": "MQTT telemetry",
}


def format_endpoints(ep: dict[str, Any]) -> str:
    lines = [f"labd-sim: cell {ep['cell']!r} running, time scale {ep['time_scale']:g}x"]
    gt = ep["ground_truth"]
    source = gt.get("file") or f"synthetic landscape over {', '.join(gt['elements'])}"
    lines.append(f"  ground truth: {gt['property']} [{gt['unit']}] ({gt['goal']}) from {source}")
    for name, d in ep["devices"].items():
        if d.get("transport") == "mqtt":
            where = f"mqtt://{d['address']}  topics {d['root']}/..."
        else:
            parts = [str(d[k]) for k in ("pty", "url") if k in d]
            if "modbus_tcp" in d:
                parts.append(f"modbus-tcp://{d['modbus_tcp']}")
            extra = f"  (unit {d['unit_id']})" if "unit_id" in d else ""
            where = " | ".join(parts) + extra
        lines.append(f"  {name:<8} {PROTOCOLS.get(d['kind'], ''):<22} {where}")
    lines.append(
        f"  control  json-lines tcp://{ep['control']}  (labd-simctl --control "
        f"{ep['control']} state)"
    )
    lines.append("Stop with Ctrl-C (SIGINT) or SIGTERM.")
    return "\n".join(lines)


async def run(cfg: SimCellConfig, endpoints_file: Path | None) -> int:
    cell = SimCell(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await cell.start()
    except SimCellError as exc:
        print(f"labd-sim: {exc}", file=sys.stderr)
        return 2
    try:
        ep = cell.endpoints()
        if endpoints_file is not None:
            tmp = endpoints_file.with_suffix(endpoints_file.suffix + ".tmp")
            tmp.write_text(json.dumps(ep, indent=2))
            tmp.replace(endpoints_file)  # atomic: a reader never sees half a file
        print(format_endpoints(ep), flush=True)
        await stop.wait()
        log.info("stopping")
    finally:
        await cell.stop()
        if endpoints_file is not None:
            with contextlib.suppress(FileNotFoundError):
                endpoints_file.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = load_config(args.config) if args.config else SimCellConfig()
        cfg = apply_overrides(cfg, args)
        return asyncio.run(run(cfg, args.endpoints))
    except (ConfigError, GroundTruthError) as exc:
        print(f"labd-sim: {exc}", file=sys.stderr)
        return 2


# -- labd-simctl ---------------------------------------------------------------------------------
def _ctl_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labd-simctl", description="Control a running labd-sim cell.")
    p.add_argument(
        "--control",
        default=os.environ.get("LABD_SIM_CONTROL", "127.0.0.1:8479"),
        help="control channel HOST:PORT (env LABD_SIM_CONTROL)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("endpoints")
    s = sub.add_parser("state")
    s.add_argument("device", nargs="?")
    sub.add_parser("world")
    sub.add_parser("clear-cell", help="the operator takes every crucible outside the rack "
                                      "away (after an interruption)")
    r = sub.add_parser("refill-rack", help="the operator replaces used crucibles in rack slots "
                                           "(default: all) with empty ones")
    r.add_argument("slots", nargs="*")
    f = sub.add_parser("fault", help="inject a fault")
    f.add_argument("device")
    f.add_argument("kind", choices=[k.value for k in FaultKind])
    f.add_argument("--count", type=int)
    f.add_argument("--code", type=int)
    f.add_argument("--delay", type=float, dest="delay_s")
    f.add_argument("--duration", type=float, dest="duration_s")
    c = sub.add_parser("clear", help="end a fault")
    c.add_argument("device")
    c.add_argument("kind", nargs="?", choices=[k.value for k in FaultKind])
    a = sub.add_parser("action", help="a physical action: labd-simctl action safety open_door")
    a.add_argument("device")
    a.add_argument("action")
    a.add_argument(
        "args", nargs="*", metavar="KEY=VALUE", help="VALUE is parsed as JSON if it can be"
    )
    t = sub.add_parser("time-scale")
    t.add_argument("value", type=float)
    return p


def ctl_main(argv: list[str] | None = None) -> int:
    args = _ctl_parser().parse_args(argv)
    req: dict[str, Any]
    if args.cmd == "endpoints":
        req = {"op": "endpoints"}
    elif args.cmd == "state":
        req = {"op": "state", "device": args.device}
    elif args.cmd == "world":
        req = {"op": "world"}
    elif args.cmd == "clear-cell":
        req = {"op": "clear_cell"}
    elif args.cmd == "refill-rack":
        req = {"op": "refill_rack", "slots": args.slots or None}
    elif args.cmd == "fault":
        fault = {"kind": args.kind}
        fault.update(
            {
                k: getattr(args, k)
                for k in ("count", "code", "delay_s", "duration_s")
                if getattr(args, k) is not None
            }
        )
        req = {"op": "fault", "device": args.device, "fault": fault}
    elif args.cmd == "clear":
        req = {"op": "clear", "device": args.device, "kind": args.kind}
    elif args.cmd == "action":
        kv: dict[str, Any] = {}
        for item in args.args:
            key, sep, raw = item.partition("=")
            if not sep:
                print(f"labd-simctl: expected KEY=VALUE, got {item!r}", file=sys.stderr)
                return 2
            try:
                kv[key] = json.loads(raw)
            except json.JSONDecodeError:
                kv[key] = raw
        req = {"op": "action", "device": args.device, "action": args.action, "args": kv}
    else:
        req = {"op": "time_scale", "value": args.value}
    try:
        reply = ControlClient(args.control).call(**req)
    except (OSError, ControlError) as exc:
        print(f"labd-simctl: {exc}", file=sys.stderr)
        return 1
    reply.pop("ok", None)
    print(json.dumps(reply, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
