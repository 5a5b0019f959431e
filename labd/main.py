"""``labd``: the daemon. ``labd`` alone runs the simulated cell on embedded defaults.

    labd [--config FILE] [--data-dir DIR] [--no-sim] [--time-scale X]
         [--ground-truth FILE --goal minimize|maximize] [--api-port N] [--log-level LEVEL]

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 2 for a configuration that cannot be used
(nothing started), 1 when start-up failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .config import ConfigError, DaemonConfig, load_config, validate_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labd", description="Run the alloy-screening cell daemon.")
    p.add_argument("--config", type=Path, help="daemon YAML (default: the simulated cell)")
    p.add_argument("--data-dir", type=Path, help="durable state directory")
    p.add_argument("--no-sim", action="store_true", help="do not start the simulated cell")
    p.add_argument("--time-scale", type=float, help="simulated cell: virtual s per wall s")
    p.add_argument("--ground-truth", type=Path, help="simulated cell: CSV of measured data")
    p.add_argument("--goal", choices=["minimize", "maximize"])
    p.add_argument("--mqtt", metavar="HOST:PORT", help="simulated cell: the broker to use")
    p.add_argument("--api-host")
    p.add_argument("--api-port", type=int)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-json", action="store_true", help="structured (JSON lines) logs")
    return p


def apply_overrides(cfg: DaemonConfig, args: argparse.Namespace) -> DaemonConfig:
    data: dict[str, Any] = cfg.model_dump(mode="json", exclude_none=True)
    sim = data.setdefault("simulator", {})
    if args.data_dir is not None:
        data["data_dir"] = str(args.data_dir)
    if args.no_sim:
        sim["enabled"] = False
    for key in ("time_scale", "goal", "mqtt"):
        if getattr(args, key) is not None:
            sim[key] = getattr(args, key)
    if args.ground_truth is not None:
        sim["ground_truth"] = str(args.ground_truth.resolve())
    api = data.setdefault("api", {})
    if args.api_host is not None:
        api["host"] = args.api_host
    if args.api_port is not None:
        api["port"] = args.api_port
    return validate_config(data, "command line")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": record.created, "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        fields = getattr(record, "fields", None)  # log.info(..., extra={"fields": {...}})
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in out})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_json)
    try:
        cfg = load_config(args.config) if args.config else DaemonConfig()
        cfg = apply_overrides(cfg, args)
    except ConfigError as exc:
        print(f"labd: {exc}", file=sys.stderr)
        return 2
    from .app import Daemon

    daemon = Daemon(cfg)
    try:
        return daemon.run()
    except Exception as exc:
        logging.getLogger("labd").exception("start-up failed")
        print(f"labd: start-up failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
