"""``labctl``: the command-line client of a running labd (REST and WebSocket).

    labctl [--url URL] [--token TOKEN | --token-file FILE] [--json] COMMAND ...

The token comes from ``--token``, ``--token-file``, ``$LABD_TOKEN`` or ``$LABD_TOKEN_FILE``, in
that order; the URL from ``--url`` or ``$LABD_URL`` (default ``http://127.0.0.1:8470``).

Commands: ``status``, ``devices``, ``protocols``, ``queue list|add|add-batch|move|remove|clear|
start|stop``, ``run``, ``pause [--now]``, ``resume``, ``stop``, ``abort``, ``halt``, ``history``,
``follow``, ``whoami``, ``token create|list|revoke``, ``runs``, ``samples``,
``export --out FILE [--format csv|parquet|jsonl]`` (``runs``/``samples``/``export`` filter with
``--campaign --protocol --since --until``). Parameters are ``key=value`` (the value is
parsed as JSON when it can be: ``num=3``, ``delay=0.5``, ``comp='{"Fe": 0.5}'``; else a string).
Queue items are named by their uid or any unique prefix of it.

Exit codes:
  0  done (``follow``: the run succeeded)
  1  refused by the daemon (not found, conflict such as "nothing to pause"), or a followed run
     that did not succeed
  2  usage error (bad arguments, unreadable file, no token)
  3  the daemon cannot be reached
  4  401: missing, invalid or revoked token
  5  403: the token's role is too low
  6  422: invalid parameters (the message names the field)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import httpx
import yaml

DEFAULT_URL = "http://127.0.0.1:8470"
API = "/api/v1"
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_UNAUTHORIZED, EXIT_FORBIDDEN, EXIT_INVALID = 4, 5, 6


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# -- formatting ---------------------------------------------------------------------------------
def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Aligned columns; the last column is cut to fit the terminal."""
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    width = shutil.get_terminal_size((120, 24)).columns
    lines = []
    for r in cells:
        line = "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        if len(line) > width and sys.stdout.isatty():
            line = line[: width - 1] + "…"
        lines.append(line)
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def when(t: float | None) -> str:
    return "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def short(uid: str | None) -> str:
    return (uid or "")[:8]


def params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in params.items())


def value_text(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return json.dumps(v) if isinstance(v, list | dict) else str(v)


def parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise CliError(f"parameter {pair!r} is not key=value", EXIT_USAGE)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


# -- the client ---------------------------------------------------------------------------------
class Client:
    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        headers = {"X-Labd-Client": "labctl"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.Client(base_url=self.url + API, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach labd at {self.url}: {exc or type(exc).__name__} "
                           "(is the daemon running? --url / $LABD_URL)", EXIT_UNREACHABLE) from None
        if r.is_success:
            return r.json()
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        if r.status_code == 401:
            raise CliError(f"not authenticated: {detail} (give a token with --token, "
                           "--token-file or $LABD_TOKEN)", EXIT_UNAUTHORIZED)
        if r.status_code == 403:
            raise CliError(f"forbidden: {detail}", EXIT_FORBIDDEN)
        if r.status_code == 422 and isinstance(detail, dict):
            lines = [("  " + (f"item {e['item']}: " if "item" in e else "")
                      + f"{e['field']}: {e['message']} (got {json.dumps(e.get('input'))})")
                     for e in detail.get("errors", [])]
            raise CliError("invalid parameters, nothing was queued or run:\n" + "\n".join(lines),
                           EXIT_INVALID)
        raise CliError(f"refused ({r.status_code}): {detail}", EXIT_REFUSED)

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.request("POST", path, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.request("DELETE", path, **kw)

    def resolve(self, prefix: str) -> str:
        """A queued item's uid from a unique prefix."""
        uids = [i["item_uid"] for i in self.get("/queue")["items"]]
        matches = [u for u in uids if u.startswith(prefix)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise CliError(f"no queued item {prefix!r}", EXIT_REFUSED)
        raise CliError(f"{prefix!r} matches {len(matches)} queued items; give more of the uid",
                       EXIT_USAGE)


# -- commands -----------------------------------------------------------------------------------
def out(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def devices_text(devices: dict[str, Any]) -> str:
    rows = []
    for name, d in devices.items():
        state = "up" if d["connected"] and not d["error"] else (
            "down" if not d["connected"] else "error")
        if d["error"] or not d["values"]:
            rows.append([name, state, "", d["error"] or "", ""])
        for sig, v in d["values"].items():
            rows.append([name, state, sig, value_text(v["value"]), v.get("units", "")])
    return table(rows, ["DEVICE", "STATE", "SIGNAL", "VALUE", "UNITS"]) if rows else "no devices"


def cmd_status(c: Client, args: argparse.Namespace) -> int:
    st = c.get("/status")
    lines = [f"cell      {st['cell']}", f"engine    {st['engine']}  (RunEngine {st['run_engine']})",
             f"queue     {st['queue_length']} item(s), "
             f"{'running' if st['queue_running'] else 'stopped'}"]
    cur = st.get("current")
    if cur:
        p = cur.get("progress", {})
        done = f"{p.get('events', 0)}" + (f"/{p['total']}" if p.get("total") else "")
        lines.append(f"running   {cur['protocol']} {short(cur['item_uid'])} by {cur['user']} "
                     f"({cur['source']}), {done} events, {cur['elapsed_s']:.1f} s")
    else:
        lines.append("running   nothing")
    up = sum(1 for d in st["devices"].values() if d["connected"] and not d["error"])
    lines.append(f"devices   {up}/{len(st['devices'])} up")
    for name, d in st["devices"].items():
        if d["error"]:
            lines.append(f"  {name}: {d['error']}")
    for il in st.get("interlocks", []):
        if il["active"]:
            lines.append(f"INTERLOCK {il['name']} tripped ({il['action']}): {il['reason']}")
        elif il.get("latched"):
            lines.append(f"INTERLOCK {il['name']} latched since {when(il['tripped_at'])} "
                         f"({il['reason']}): nothing starts until it is acknowledged "
                         f"(labctl interlocks ack {il['name']})")
    lines += hub_lines(st.get("hub"))
    out(args, st, "\n".join(lines))
    return EXIT_OK


def interlock_state(il: dict[str, Any]) -> str:
    return "TRIPPED" if il["active"] else "LATCHED" if il.get("latched") else "ok"


def cmd_interlocks(c: Client, args: argparse.Namespace) -> int:
    if args.op == "ack":
        il = c.post(f"/interlocks/{args.name}/acknowledge")
        out(args, il, f"interlock {il['name']} acknowledged: new items may start "
                      "(start the queue again if it stopped)")
        return EXIT_OK
    ils = c.get("/interlocks")
    rows = [[il["name"], il["action"], interlock_state(il), il["trips"],
             il["when"] or f"device down: {', '.join(il['device_down'] or [])}",
             il["reason"] if il["active"] or il.get("latched") else ""] for il in ils]
    out(args, ils, table(rows, ["INTERLOCK", "ACTION", "STATE", "TRIPS", "CONDITION", "REASON"])
        if rows else "no interlocks (disabled by configuration)")
    return EXIT_OK


def hub_lines(hub: dict[str, Any] | None) -> list[str]:
    """The journal and each hub forwarder: connected or not, backlog, the last error."""
    if not hub:
        return []
    lines = [f"journal   {hub['journal']['documents']} document(s)"]
    for f in hub["forwarders"]:
        state = "connected" if f["connected"] else "DOWN"
        lines.append(f"hub       {f['name']} -> {f['target']}: {state}, backlog {f['backlog']}, "
                     f"delivered up to #{f['cursor']}")
        if f["last_error"]:
            lines.append(f"  {f['name']}: {f['last_error']}")
    return lines


def since_arg(text: str) -> str:
    """``--since/--until``: ISO 8601, Unix time, or an age such as ``90m``, ``12h``, ``7d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if len(text) > 1 and text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
        return str(time.time() - float(text[:-1]) * units[text[-1]])
    return text


def filters(args: argparse.Namespace) -> dict[str, str]:
    out = {k: getattr(args, k) for k in ("campaign", "protocol", "since", "until")}
    return {k: v for k, v in out.items() if v is not None}


def cmd_runs(c: Client, args: argparse.Namespace) -> int:
    params = {**filters(args), "limit": args.limit}
    runs = c.get("/runs", params=params)
    rows = [[short(r["uid"]), r["protocol"] or r["plan_name"], r["campaign"], r["sample_id"],
             when(r["start_time"]), r["exit_status"] or "running", r["num_events"]]
            for r in runs]
    out(args, runs, table(rows, ["RUN", "PROTOCOL", "CAMPAIGN", "SAMPLE", "STARTED", "STATUS",
                                 "EVENTS"]) if rows else "no runs")
    return EXIT_OK


def comp_text(comp: dict[str, float]) -> str:
    return " ".join(f"{el}{v:.3g}" for el, v in comp.items())


def cmd_samples(c: Client, args: argparse.Namespace) -> int:
    rows = c.get("/samples", params=filters(args))
    cells = [[r["sample_id"], comp_text(r["target_composition"]),
              comp_text(r["measured_composition"]),
              "" if r["anneal_c"] is None else f"{r['anneal_c']:g} C {r['anneal_s']:g} s",
              "" if r["property_value"] is None else
              f"{r['property_name'] or 'property'}={r['property_value']:.6g}"
              + (f" {r['property_unit']}" if r["property_unit"] else ""),
              r["campaign"], r["protocol"], when(r["time"])] for r in rows]
    out(args, rows, table(cells, ["SAMPLE", "TARGET", "MEASURED", "PROCESS", "PROPERTY",
                                  "CAMPAIGN", "PROTOCOL", "MADE"]) if cells else "no samples")
    return EXIT_OK


def cmd_export(c: Client, args: argparse.Namespace) -> int:
    fmt = args.format or {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl"}.get(
        args.out.suffix, "csv")
    try:
        r = c.http.get("/samples/export", params={**filters(args), "format": fmt})
    except httpx.TransportError as exc:
        raise CliError(f"cannot reach labd at {c.url}: {exc}", EXIT_UNREACHABLE) from None
    if not r.is_success:  # the same messages and exit codes as every other command
        c.request("GET", "/samples/export", params={**filters(args), "format": fmt})
    try:
        args.out.write_bytes(r.content)
    except OSError as exc:
        raise CliError(f"cannot write {args.out}: {exc.strerror}", EXIT_USAGE) from None
    data = {"path": str(args.out), "format": fmt, "bytes": len(r.content)}
    out(args, data, f"wrote {args.out} ({fmt}, {len(r.content)} bytes)")
    return EXIT_OK


def cmd_devices(c: Client, args: argparse.Namespace) -> int:
    devices = c.get("/devices")
    out(args, devices, devices_text(devices))
    return EXIT_OK


def schema_text(schema: dict[str, Any]) -> str:
    parts = []
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        kind = prop.get("type") or "|".join(
            a.get("type", "?") for a in prop.get("anyOf", [])) or "object"
        text = f"{name}:{kind}"
        if "default" in prop:
            text += f"={json.dumps(prop['default'])}"
        elif name in required:
            text += " (required)"
        lo = prop.get("minimum", prop.get("exclusiveMinimum"))
        hi = prop.get("maximum", prop.get("exclusiveMaximum"))
        if lo is not None or hi is not None:
            text += f" [{'' if lo is None else lo}..{'' if hi is None else hi}]"
        parts.append(text)
    return ", ".join(parts) or "(none)"


def cmd_protocols(c: Client, args: argparse.Namespace) -> int:
    protos = c.get("/protocols")
    rows = [[p["name"], p["title"], ",".join(p["needs"]), schema_text(p["parameters"])]
            for p in protos]
    out(args, protos, table(rows, ["PROTOCOL", "TITLE", "NEEDS", "PARAMETERS"]))
    return EXIT_OK


def queue_text(q: dict[str, Any]) -> str:
    rows = [[n, short(i["item_uid"]), i["protocol"], i["user"], params_text(i["params"])]
            for n, i in enumerate(q["items"])]
    head = f"queue {'running' if q['running'] else 'stopped'}, {q['length']} item(s)"
    return head + ("\n" + table(rows, ["#", "ITEM", "PROTOCOL", "USER", "PARAMETERS"])
                   if rows else "")


def load_batch(path: Path) -> list[dict[str, Any]]:
    try:
        data = yaml.safe_load(path.read_text())  # JSON is YAML too
    except (OSError, yaml.YAMLError) as exc:
        raise CliError(f"{path}: cannot read the batch: {exc}", EXIT_USAGE) from None
    if isinstance(data, dict) and "items" in data:
        data = data["items"]
    if not isinstance(data, list) or not all(isinstance(i, dict) for i in data):
        raise CliError(f"{path}: expected a list of {{protocol, params}} (or {{items: [...]}})",
                       EXIT_USAGE)
    return data


def cmd_queue(c: Client, args: argparse.Namespace) -> int:
    op = args.op
    if op == "list":
        q = c.get("/queue")
        out(args, q, queue_text(q))
    elif op == "add":
        item = c.post("/queue", json={"protocol": args.protocol,
                                      "params": parse_params(args.params), "index": args.at})
        out(args, item, f"queued {item['protocol']} as {item['item_uid']}")
    elif op == "add-batch":
        items = c.post("/queue/batch", json={"items": load_batch(args.file), "index": args.at})
        out(args, items, f"queued {len(items)} item(s): "
                         + " ".join(short(i["item_uid"]) for i in items))
    elif op == "move":
        q = c.post(f"/queue/{c.resolve(args.item)}/move", json={"index": args.index})
        out(args, q, queue_text(q))
    elif op == "remove":
        item = c.delete(f"/queue/{c.resolve(args.item)}")
        out(args, item, f"removed {item['protocol']} {item['item_uid']}")
    elif op == "clear":
        r = c.delete("/queue")
        out(args, r, f"removed {r['removed']} item(s)")
    elif op in ("start", "stop"):
        q = c.post(f"/queue/{op}")
        out(args, q, f"queue {'running' if q['running'] else 'stopped'}, {q['length']} item(s)")
    return EXIT_OK


def cmd_run(c: Client, args: argparse.Namespace) -> int:
    item = c.post("/run", json={"protocol": args.protocol, "params": parse_params(args.params)})
    out(args, item, f"running {item['protocol']} as {item['item_uid']}")
    return EXIT_OK


def cmd_control(c: Client, args: argparse.Namespace) -> int:
    if args.command == "pause":
        r = c.post("/run/pause", params={"defer": "false" if args.now else "true"})
    else:
        r = c.post(f"/run/{args.command}",
                   json={"reason": args.reason} if getattr(args, "reason", None) else None)
    out(args, r, f"{r['command']}: engine {r['engine']}")
    return EXIT_OK


def cmd_history(c: Client, args: argparse.Namespace) -> int:
    hist = c.get("/history", params={"limit": args.limit})
    rows = [[short(h["item_uid"]), h["protocol"], h["status"], h["user"], when(h["started_at"]),
             "" if h["finished_at"] is None else f"{h['finished_at'] - h['started_at']:.1f}",
             h["error"] or ""] for h in hist]
    out(args, hist, table(rows, ["ITEM", "PROTOCOL", "STATUS", "USER", "STARTED", "SECONDS",
                                 "ERROR"]) if rows else "no history")
    return EXIT_OK


def cmd_whoami(c: Client, args: argparse.Namespace) -> int:
    me = c.get("/whoami")
    out(args, me, f"{me['name']} ({me['role']}) from {me['source']}")
    return EXIT_OK


def cmd_token(c: Client, args: argparse.Namespace) -> int:
    if args.op == "create":
        t = c.post("/tokens", json={"name": args.name, "role": args.role})
        out(args, t, f"token for {t['name']} ({t['role']}), id {t['token_id']}; shown once:\n"
                     f"{t['token']}")
    elif args.op == "list":
        toks = c.get("/tokens", params={"include_revoked": str(args.all).lower()})
        rows = [[t["token_id"], t["name"], t["role"], when(t["created_at"]), t["created_by"],
                 when(t["last_used_at"]), "" if t["active"] else f"revoked {when(t['revoked_at'])}"]
                for t in toks]
        out(args, toks, table(rows, ["ID", "NAME", "ROLE", "CREATED", "BY", "LAST USED", ""]))
    elif args.op == "revoke":
        t = c.delete(f"/tokens/{args.name}")
        out(args, t, f"revoked token {t['token_id']} of {t['name']}")
    return EXIT_OK


# -- follow -------------------------------------------------------------------------------------
class Follower:
    """Prints a run's life from WebSocket events: a progress bar on a terminal, lines otherwise."""

    def __init__(self, json_lines: bool, tty: bool) -> None:
        self.json_lines = json_lines
        self.tty = tty
        self.item_uid: str | None = None
        self.protocol = ""
        self.started = time.monotonic()
        self._bar = False

    def line(self, text: str) -> None:
        if self._bar:
            sys.stdout.write("\r\033[K")
            self._bar = False
        print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)

    def bar(self, events: int, total: int | None) -> None:
        elapsed = time.monotonic() - self.started
        if not self.tty:
            self.line(f"progress {events}" + (f"/{total}" if total else "") + " events")
            return
        width = max(10, shutil.get_terminal_size((80, 24)).columns - 50)
        if total:
            frac = min(1.0, events / total)
            fill = int(frac * width)
            text = f"[{'#' * fill}{'.' * (width - fill)}] {events}/{total} {frac:4.0%}"
        else:
            text = f"{events} events"
        sys.stdout.write(f"\r\033[K{self.protocol[:20]} {text} {elapsed:6.1f}s")
        sys.stdout.flush()
        self._bar = True

    def begin(self, item_uid: str, protocol: str, user: str = "") -> None:
        self.item_uid, self.protocol, self.started = item_uid, protocol, time.monotonic()
        self.line(f"run {protocol} {short(item_uid)} started" + (f" by {user}" if user else ""))

    def handle(self, ev: dict[str, Any]) -> int | None:
        """Show one event; return an exit code when the followed run is over."""
        if self.json_lines:  # every event, one JSON object a line
            print(json.dumps(ev), flush=True)
        kind = ev["type"]
        if self.item_uid is None:
            if (kind == "engine_state" and ev.get("state") == "running"
                    and ev.get("item_uid")) or kind == "run_started":
                self.item_uid = ev["item_uid"]
            if self.item_uid is not None and not self.json_lines:
                self.begin(self.item_uid, ev.get("protocol", ""))
            return None
        if kind == "run_started" and ev["item_uid"] == self.item_uid:
            self.protocol = ev.get("protocol", self.protocol)
            if not self.json_lines and not self.protocol:
                self.line(f"run {ev['run_uid']} started")
        elif kind == "run_progress" and ev.get("item_uid") == self.item_uid:
            if not self.json_lines:
                self.bar(ev["events"], ev.get("total"))
        elif kind == "engine_state" and ev.get("item_uid") == self.item_uid:
            if not self.json_lines and ev["state"] != "running":
                self.line(f"engine {ev['state']}")
        elif kind == "control" and not self.json_lines:
            self.line(f"{ev['command']} by {ev['user']} ({ev['source']})"
                      + (f": {ev['reason']}" if ev.get("reason") else ""))
        elif kind == "item_finished" and ev["item"]["item_uid"] == self.item_uid:
            item = ev["item"]
            if not self.json_lines:
                self.line(f"run {item['protocol']} {short(item['item_uid'])} finished: "
                          f"{item['status']}" + (f" ({item['error']})" if item["error"] else ""))
            return EXIT_OK if item["status"] == "success" else EXIT_REFUSED
        elif kind not in ("run_progress", "engine_state", "re_state", "queue", "queue_changed",
                          "run_stopped", "device_values", "control") and not self.json_lines:
            self.line(f"{kind}: " + " ".join(f"{k}={v}" for k, v in ev.items()
                                             if k not in ("type", "seq", "time")))
        return None


def cmd_follow(c: Client, args: argparse.Namespace) -> int:
    from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
    from websockets.sync.client import connect

    ws_url = c.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + API + "/ws"
    follower = Follower(args.json, sys.stdout.isatty())
    try:
        ws = connect(ws_url, additional_headers={"X-Labd-Client": "labctl"}, open_timeout=10)
    except (OSError, InvalidStatus, WebSocketException) as exc:
        raise CliError(f"cannot reach labd at {c.url}: {exc}", EXIT_UNREACHABLE) from None
    with ws:
        ws.send(json.dumps({"token": c.token}))
        try:
            first = json.loads(ws.recv(timeout=30))
            if first["type"] == "error":
                raise CliError(f"not authenticated: {first['detail']}", EXIT_UNAUTHORIZED)
            cur = first["status"].get("current")
            if cur:
                follower.item_uid = cur["item_uid"]
                if not args.json:
                    follower.begin(cur["item_uid"], cur["protocol"], cur["user"])
                    p = cur.get("progress", {})
                    follower.bar(p.get("events", 0), p.get("total"))
            elif not args.json:
                follower.line("nothing is running; waiting for the next run (Ctrl-C to quit)")
            while True:
                code = follower.handle(json.loads(ws.recv()))
                if code is not None:
                    return code
        except ConnectionClosed:
            raise CliError("labd closed the connection", EXIT_UNREACHABLE) from None
        except KeyboardInterrupt:
            return EXIT_OK


def load_campaign(path: Path) -> dict[str, Any]:
    """A campaign file: the spec (YAML or JSON) with an optional ``run:`` section (rack slots,
    fixed protocol parameters). A relative ``pool`` is taken relative to the file."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}", EXIT_USAGE) from None
    except yaml.YAMLError as exc:
        raise CliError(f"{path}: not valid YAML/JSON: {exc}", EXIT_USAGE) from None
    if not isinstance(data, dict):
        raise CliError(f"{path}: expected a mapping (the campaign spec)", EXIT_USAGE)
    run = data.pop("run", None) or {}
    pool = data.get("pool")
    if isinstance(pool, str) and not Path(pool).is_absolute():
        data["pool"] = str((path.parent / pool).resolve())
    return {"spec": data, "run": run}


def campaign_text(c: dict[str, Any]) -> str:
    reason = f" ({c['reason']})" if c.get("reason") else ""
    lines = [f"campaign {c['id']}: {c['status']}{reason}",
             f"  samples made {c.get('samples_made')} of {c.get('samples_budget')}, "
             f"pending {c.get('pending')}, interrupted {c.get('interrupted')}, "
             f"left {c.get('samples_left')}, hours {c.get('hours_used') or 0:.2f}"]
    best = c.get("best")
    if best:
        comp = " ".join(f"{el}{x:g}" for el, x in best["composition"].items() if x)
        lines.append(f"  best: {best['sample_id']} {comp} = {best['value']:g}")
    return "\n".join(lines)


def cmd_campaign(c: Client, args: argparse.Namespace) -> int:
    op = args.op
    if op == "start":
        data = c.post("/campaigns", json=load_campaign(args.spec))
        out(args, data, campaign_text(data))
    elif op == "status" and not args.id:
        rows = c.get("/campaigns")
        out(args, rows, table([[r["id"], r["status"], r.get("samples_made"),
                                r.get("samples_budget"), value_text((r.get("best") or {})
                                                                    .get("value")),
                                r.get("reason") or ""] for r in rows],
                              ["ID", "STATUS", "MADE", "BUDGET", "BEST", "REASON"]))
    elif op == "status":
        data = c.get(f"/campaigns/{args.id}")
        out(args, data, campaign_text(data))
    elif op in ("pause", "stop"):
        data = c.post(f"/campaigns/{args.id}/{op}")
        out(args, data, campaign_text(data))
    elif op == "resume":
        data = c.post(f"/campaigns/{args.id}/resume", json={"refilled": args.refilled})
        out(args, data, campaign_text(data))
    elif op == "report":
        data = c.get(f"/campaigns/{args.id}/report")
        text = [campaign_text(c.get(f"/campaigns/{args.id}"))]
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            files = []
            for name in ("report.png", "samples.csv"):
                r = c.http.get(f"/campaigns/{args.id}/{name}")
                if not r.is_success:
                    raise CliError(f"refused ({r.status_code}): {r.text}", EXIT_REFUSED)
                (args.out / f"{args.id}-{name}").write_bytes(r.content)
                files.append(str(args.out / f"{args.id}-{name}"))
            (args.out / f"{args.id}-report.json").write_text(json.dumps(data, indent=2))
            data["files"] = [*files, str(args.out / f"{args.id}-report.json")]
            text.append("  wrote " + ", ".join(data["files"]))
        out(args, data, "\n".join(text))
    return EXIT_OK


# -- arguments ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labctl", description="Control a running labd.",
                                epilog="exit codes: 0 ok, 1 refused, 2 usage, 3 unreachable, "
                                       "4 unauthenticated, 5 forbidden, 6 invalid parameters")
    p.add_argument("--url", default=os.environ.get("LABD_URL", DEFAULT_URL))
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--token", help="API token (default: $LABD_TOKEN)")
    tok.add_argument("--token-file", type=Path, help="file holding the token "
                                                     "(default: $LABD_TOKEN_FILE)")
    p.add_argument("--json", action="store_true", help="JSON output for scripts")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="cell, engine, current run, devices")
    sub.add_parser("devices", help="devices and their live values")
    sub.add_parser("protocols", help="protocols and their parameters")
    sub.add_parser("whoami", help="the token's user and role")
    il = sub.add_parser("interlocks", help="interlocks and their state; ack NAME releases a "
                                           "latched one")
    il_ops = il.add_subparsers(dest="op")
    il_ops.add_parser("list")
    il_ops.add_parser("ack", help="acknowledge a latched interlock once the cell is "
                                  "checked").add_argument("name")

    q = sub.add_parser("queue", help="queue operations").add_subparsers(dest="op", required=True)
    q.add_parser("list")
    add = q.add_parser("add", help="add PROTOCOL key=value ...")
    add.add_argument("protocol")
    add.add_argument("params", nargs="*", metavar="key=value")
    add.add_argument("--at", type=int, help="position (0: first)")
    batch = q.add_parser("add-batch", help="add the items of a JSON/YAML file, all or none")
    batch.add_argument("file", type=Path)
    batch.add_argument("--at", type=int, help="position of the first item")
    mv = q.add_parser("move", help="move ITEM to INDEX")
    mv.add_argument("item")
    mv.add_argument("index", type=int)
    rm = q.add_parser("remove")
    rm.add_argument("item")
    q.add_parser("clear")
    q.add_parser("start")
    q.add_parser("stop")

    run = sub.add_parser("run", help="run PROTOCOL key=value ... now, outside the queue")
    run.add_argument("protocol")
    run.add_argument("params", nargs="*", metavar="key=value")
    pause = sub.add_parser("pause", help="pause at the next checkpoint (--now: immediately)")
    pause.add_argument("--now", action="store_true")
    sub.add_parser("resume", help="resume a paused run")
    for name in ("stop", "abort", "halt"):
        sp = sub.add_parser(name, help=f"{name} the current run")
        sp.add_argument("--reason", help="recorded in the history")
    hist = sub.add_parser("history", help="finished runs, newest first")
    hist.add_argument("--limit", type=int, default=20)
    sub.add_parser("follow", help="follow the current (or next) run live")

    def add_filters(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--campaign")
        sp.add_argument("--protocol")
        for name in ("since", "until"):
            sp.add_argument(f"--{name}", type=since_arg, help="ISO 8601, Unix time, or an age "
                                                              "(30m, 12h, 7d)")

    runs = sub.add_parser("runs", help="runs in the journal, oldest first")
    add_filters(runs)
    runs.add_argument("--limit", type=int, default=50, help="the newest N runs")
    add_filters(sub.add_parser("samples", help="the sample table, one row a sample"))
    exp = sub.add_parser("export", help="export the sample table to a file")
    add_filters(exp)
    exp.add_argument("--format", choices=["csv", "parquet", "jsonl"],
                     help="default: from the file's suffix, else csv")
    exp.add_argument("--out", type=Path, required=True, help="file to write")

    cg = sub.add_parser("campaign", help="closed-loop campaigns").add_subparsers(
        dest="op", required=True)
    cs = cg.add_parser("start", help="start the campaign of a YAML/JSON spec file")
    cs.add_argument("spec", type=Path)
    cg.add_parser("status", help="one campaign, or all").add_argument("id", nargs="?")
    for name in ("pause", "stop"):
        cg.add_parser(name).add_argument("id")
    cr = cg.add_parser("resume")
    cr.add_argument("id")
    cr.add_argument("--refilled", action="store_true",
                    help="the used crucibles in the rack were replaced by empty ones")
    rep = cg.add_parser("report", help="best so far, samples, budgets; --out: plot and CSV")
    rep.add_argument("id")
    rep.add_argument("--out", type=Path, help="write <id>-report.png, -samples.csv, -report.json")

    t = sub.add_parser("token", help="API tokens (admin)").add_subparsers(dest="op",
                                                                          required=True)
    create = t.add_parser("create")
    create.add_argument("name")
    create.add_argument("--role", required=True, choices=["viewer", "technician", "admin"])
    tl = t.add_parser("list")
    tl.add_argument("--all", action="store_true", help="include revoked tokens")
    rv = t.add_parser("revoke", help="revoke by user name or token id")
    rv.add_argument("name")
    return p


COMMANDS = {
    "campaign": cmd_campaign,
    "status": cmd_status, "devices": cmd_devices, "protocols": cmd_protocols,
    "whoami": cmd_whoami, "queue": cmd_queue, "run": cmd_run, "pause": cmd_control,
    "resume": cmd_control, "stop": cmd_control, "abort": cmd_control, "halt": cmd_control,
    "history": cmd_history, "follow": cmd_follow, "token": cmd_token, "runs": cmd_runs,
    "samples": cmd_samples, "export": cmd_export, "interlocks": cmd_interlocks,
}


def read_token(args: argparse.Namespace) -> str | None:
    if args.token:
        return str(args.token)
    path = args.token_file or (Path(os.environ["LABD_TOKEN_FILE"])
                               if os.environ.get("LABD_TOKEN_FILE") else None)
    if args.token_file is None and os.environ.get("LABD_TOKEN"):
        return os.environ["LABD_TOKEN"].strip()
    if path is None:
        return None
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise CliError(f"cannot read the token file {path}: {exc.strerror}", EXIT_USAGE) from None


def fail(message: str, code: int) -> NoReturn:
    print(f"labctl: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        client = Client(args.url, read_token(args))
        return COMMANDS[args.command](client, args)
    except CliError as exc:
        fail(str(exc), exc.code)


if __name__ == "__main__":
    sys.exit(main())
