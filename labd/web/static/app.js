// labd dashboard: one ES module, no framework, no build step, nothing fetched from the internet.
// State comes from the WebSocket /api/v1/ws (a snapshot, then events); actions are REST calls
// with the user's token and "X-Labd-Client: web". Nothing polls the daemon.

const API = "/api/v1";
const ROLES = ["viewer", "technician", "admin"];
const TOKEN_KEY = "labd.token";
const $ = (sel) => document.querySelector(sel);

const S = {
  token: sessionStorage.getItem(TOKEN_KEY), user: null, role: null,
  status: null, queue: { items: [], running: false }, history: [], interlocks: {},
  protocols: [], lastControl: null, blocked: null, ws: null, connected: false,
  attempt: 0, retryTimer: null, retryAt: 0, campaigns: null, campaign: null, samples: null,
  // The "rack refilled" tick per campaign: the card is re-drawn on every campaign event, and a
  // tick kept only in the element was lost when an event came between the tick and "Resume".
  refilled: {},
};

// -- helpers -------------------------------------------------------------------------------------
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c);
  return el;
}
const fmt = (v, digits = 4) => (typeof v === "number" ? (Number.isInteger(v) ? String(v)
  : Number(v.toPrecision(digits)).toString()) : v === null || v === undefined ? "—"
  : typeof v === "object" ? JSON.stringify(v) : String(v));
const when = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "—");
const duration = (s) => (s === null || s === undefined ? "—" : s < 90 ? `${s.toFixed(1)} s`
  : s < 5400 ? `${(s / 60).toFixed(1)} min` : `${(s / 3600).toFixed(2)} h`);
const allows = (role, needed) => ROLES.indexOf(role) >= ROLES.indexOf(needed);
const comp = (c) => (c && Object.keys(c).length
  ? Object.entries(c).map(([el, x]) => `${el} ${fmt(x, 3)}`).join(", ") : "—");

class ApiError extends Error {
  constructor(status, detail) {
    const text = typeof detail === "string" ? detail : detail?.message ?? `HTTP ${status}`;
    super(text);
    this.status = status;
    this.detail = detail;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${S.token}`, "X-Labd-Client": "web" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(API + path, { method, headers,
    body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await r.json(); } catch { /* an empty or non-JSON body */ }
  if (!r.ok) {
    const err = new ApiError(r.status, data?.detail);
    if (r.status === 401) signOut(`Signed out: the daemon refused the token (${err.message}).`);
    throw err;
  }
  return data;
}

function notify(text, kind = "info") {
  const n = $("#notice");
  $("#notice-text").textContent = text;
  n.className = `notice ${kind}`;
  n.hidden = false;
}

// A refusal from the server, said plainly next to what was tried.
function refused(what, err) {
  const why = err.status === 403 ? "Refused (you lack the role)" : err.status === 409
    ? "Not possible now" : err.status === 404 ? "Not found" : `Error ${err.status ?? ""}`;
  notify(`${what}: ${why}: ${err.message}`, "bad");
}

async function act(what, fn) {
  try { return await fn(); } catch (err) {
    if (err instanceof ApiError) refused(what, err);
    else notify(`${what}: ${err.message}`, "bad");
    return undefined;
  }
}

// -- sign-in -------------------------------------------------------------------------------------
function signOut(message = "") {
  sessionStorage.removeItem(TOKEN_KEY);
  S.token = null;
  if (S.ws) { S.ws.onclose = null; S.ws.close(); S.ws = null; }
  clearTimeout(S.retryTimer);
  $("#app").hidden = true;
  $("#who").hidden = true;
  $("#sign-in").hidden = false;
  $("#sign-in-error").textContent = message;
  setConn("not connected", false);
  $("#token").focus();
}

async function signIn(token) {
  S.token = token;
  try {
    const me = await api("GET", "/whoami");
    sessionStorage.setItem(TOKEN_KEY, token);
    S.user = me.name;
    S.role = me.role;
  } catch (err) {
    if (err.status !== 401) signOut(`Cannot reach the daemon: ${err.message}`);
    return;
  }
  $("#sign-in").hidden = true;
  $("#app").hidden = false;
  $("#who").hidden = false;
  $("#who-name").textContent = S.user;
  $("#who-role").textContent = S.role;
  applyRoles();
  connect();
  loadProtocols();
  route();
}

// Controls a role may not use are disabled, and say why (the server refuses them anyway).
function applyRoles(root = document) {
  for (const el of root.querySelectorAll("[data-role]")) {
    const ok = allows(S.role, el.dataset.role);
    el.toggleAttribute("data-role-denied", !ok);
    if (!ok) {
      el.disabled = true;
      el.title = `needs the ${el.dataset.role} role; you are a ${S.role}`;
    }
  }
}

function enable(el, stateOk) {
  el.disabled = el.hasAttribute("data-role-denied") || !stateOk;
}

// -- the WebSocket -------------------------------------------------------------------------------
function setConn(text, live) {
  const c = $("#conn");
  c.textContent = text;
  c.className = `conn ${live ? "live" : "down"}`;
}

function connect() {
  clearTimeout(S.retryTimer);
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${proto}://${location.host}${API}/ws?client=web`);
  S.ws = ws;
  ws.onopen = () => ws.send(JSON.stringify({ token: S.token }));
  ws.onmessage = (m) => onEvent(JSON.parse(m.data));
  ws.onclose = (e) => {
    if (S.ws !== ws) return;
    S.connected = false;
    S.ws = null;
    if (e.code === 4401) { signOut("Signed out: the daemon refused the token."); return; }
    // Back off (0.5 s doubling to 10 s): a restarting daemon comes back; re-snapshot then.
    const delay = Math.min(10000, 500 * 2 ** S.attempt);
    S.attempt += 1;
    S.retryAt = Date.now() + delay;
    S.retryTimer = setTimeout(connect, delay);
    setConn(`connection lost, reconnecting (attempt ${S.attempt})`, false);
    renderBanners();
  };
}

function onEvent(ev) {
  const st = S.status;
  switch (ev.type) {
    case "snapshot":
      S.attempt = 0;
      S.connected = true;
      S.status = ev.status;
      S.queue = ev.queue;
      S.role = ev.role;
      S.blocked = null;
      setConn(`live · ${ev.user}`, true);
      $("#cell-name").textContent = `· cell ${ev.status.cell}`;
      loadHistory();
      loadInterlocks();
      if (!$("#view-campaigns").hidden) loadCampaigns();
      renderAll();
      return;
    case "error":
      notify(`The daemon says: ${ev.detail}`, "bad");
      return;
    case "dropped":  // this client was too slow: a fresh snapshot is the honest fix
      S.ws?.close();
      return;
    case "queue":
      S.queue = { items: ev.items, length: ev.length, running: ev.running };
      S.blocked = null;
      renderQueue();
      break;
    case "queue_state":
      S.queue.running = ev.running;
      renderQueue();
      break;
    case "queue_blocked":
    case "item_refused":
      S.blocked = ev.reason;
      notify(`The queue did not start the next item: ${ev.reason}`, "bad");
      break;
    case "engine_state":
      if (st) st.engine = ev.state;
      if (ev.state === "idle" && st) st.current = null;
      if (ev.state === "running") S.blocked = null;
      refreshStatus();
      break;
    case "re_state":
      if (st) st.run_engine = ev.state;
      break;
    case "run_started":
    case "run_stopped":
      refreshStatus();
      break;
    case "run_progress":
      if (st?.current && st.current.item_uid === ev.item_uid) {
        st.current.progress = { ...st.current.progress, ...ev };
        renderRun();
      }
      return;
    case "item_finished":
    case "item_interrupted":
      if (!$("#view-samples").hidden && !location.hash.includes("/")) loadSamples();  // new rows
      S.history = [ev.item, ...S.history.filter((x) => x.item_uid !== ev.item.item_uid)];
      renderHistory();
      if (ev.item.protocol && ev.item.status !== "success" && ev.item.error) {
        notify(`${ev.item.protocol} ${ev.item.status}: ${ev.item.error}`, "bad");
      }
      return;
    case "device":
      if (st) {
        const d = st.devices[ev.name] ?? { values: {} };
        st.devices[ev.name] = { ...d, connected: ev.connected, error: ev.error };
        renderDevices();
      }
      return;
    case "device_values":
      if (st) {
        st.devices[ev.name] = { connected: ev.connected, error: ev.error, values: ev.values };
        renderDevices();
      }
      return;
    case "interlock": {
      const il = S.interlocks[ev.name] ?? { name: ev.name, action: ev.action };
      if (ev.event === "tripped") {
        Object.assign(il, { active: true, reason: ev.reason, since: ev.time, latched: ev.latched });
        if (ev.latched) il.tripped_at = ev.time;
      } else if (ev.event === "cleared") Object.assign(il, { active: false, since: null, latched: ev.latched });
      else if (ev.event === "handled") il.handled = ev;
      else if (ev.event === "acknowledged") {
        il.latched = false;
        notify(`Interlock ${ev.name} acknowledged by ${ev.user}.`);
      }
      S.interlocks[ev.name] = il;
      renderInterlocks();
      break;
    }
    case "control":
      S.lastControl = ev;
      break;
    default:
      if (ev.type === "campaign" && !$("#view-campaigns").hidden) campaignChanged(ev);
      return;
  }
  renderBanners();
  renderRun();
}

let statusPending = null;
function refreshStatus() {  // after an event that changes the current run (not a poll)
  if (statusPending) return;
  statusPending = setTimeout(async () => {
    statusPending = null;
    try {
      S.status = await api("GET", "/status");
      renderAll();
    } catch { /* the WebSocket's close handler reports a lost daemon */ }
  }, 50);
}

async function loadHistory() {
  try { S.history = await api("GET", "/history?limit=50"); renderHistory(); } catch { /* idem */ }
}

async function loadInterlocks() {
  try {
    S.interlocks = Object.fromEntries((await api("GET", "/interlocks")).map((i) => [i.name, i]));
    renderInterlocks();
    renderBanners();
  } catch { /* idem */ }
}

// -- rendering: banners and the run --------------------------------------------------------------
function renderBanners() {
  const out = [];
  if (!S.connected) {
    const secs = Math.max(0, Math.round((S.retryAt - Date.now()) / 1000));
    out.push(["warn", "Not connected to the daemon",
      `Reconnecting by itself (attempt ${S.attempt}${secs ? `, next try in ${secs} s` : ""}). `
      + "What you see may be out of date."]);
  }
  for (const il of Object.values(S.interlocks)) {
    if (!il.active && il.latched) {
      out.push(["bad", `Interlock ${il.name} is latched`,
        `It tripped (${il.reason || il.description || ""}) and has cleared. Nothing starts until a `
        + "technician has checked the cell and acknowledges it.", ackButton(il)]);
      continue;
    }
    if (!il.active) continue;
    if (il.action === "abort") {
      out.push(["bad", `Safe state: interlock ${il.name}`,
        `${il.reason || il.description || ""}. Any run is aborted and every device is brought `
        + `to its safe state; nothing starts until this clears${il.latch ? " and is acknowledged" : ""}.`]);
    } else {
      out.push(["warn", `Run suspended: interlock ${il.name}`,
        `${il.reason || il.description || ""}. The run resumes by itself once this clears.`]);
    }
  }
  if (S.status?.engine === "paused") {
    const c = S.lastControl;
    const by = c && c.command.startsWith("pause") ? ` by ${c.user} (${c.source})` : "";
    out.push(["warn", `Paused${by}`, "The run waits. Resume, stop or abort it below."]);
  }
  if (S.blocked && S.queue.running) out.push(["bad", "The queue is held", S.blocked]);
  $("#banners").replaceChildren(...out.map(([kind, title, text, extra]) =>
    h("div", { class: `banner ${kind}`, role: "alert" }, h("strong", { text: title }), text,
      extra ?? null)));
  applyRoles($("#banners"));
}

// The acknowledge button of a latched interlock (technician and above).
function ackButton(il) {
  return h("button", { type: "button", class: "small", "data-role": "technician",
    "data-ack": il.name, "aria-label": `Acknowledge interlock ${il.name}`, text: "Acknowledge",
    onclick: () => act(`Acknowledge ${il.name}`, async () => {
      Object.assign(il, await api("POST", `/interlocks/${encodeURIComponent(il.name)}/acknowledge`));
      renderInterlocks();
      renderBanners();
    }) });
}

function renderRun() {
  const st = S.status;
  const cur = st?.current;
  const body = $("#run-body");
  if (!cur) {
    body.replaceChildren(h("p", { class: "muted", text: `Nothing is running (engine ${st?.engine ?? "?"}).` }));
  } else {
    const p = cur.progress || {};
    const frac = typeof p.fraction === "number" ? p.fraction : null;
    const step = [p.plan_name, p.events !== undefined
      ? `event ${p.events}${p.total ? ` of ${p.total}` : ""}` : null].filter(Boolean).join(" · ");
    const bar = h("div", {
      class: `progress${frac === null ? " indeterminate" : ""}`, role: "progressbar",
      "aria-label": "Run progress", "aria-valuemin": 0, "aria-valuemax": 100,
      "aria-valuenow": frac === null ? null : Math.round(frac * 100),
    }, h("div", { style: `width:${Math.round((frac ?? 0) * 100)}%` }));
    body.replaceChildren(
      h("p", {}, h("strong", { id: "run-protocol", text: cur.protocol }), " ",
        h("span", { class: `badge ${st.engine}`, id: "run-state", text: st.engine }),
        ` by ${cur.user} (${cur.source}), started ${when(cur.started_at)}`),
      bar,
      h("p", { class: "help", id: "run-step",
        text: `${step || "starting"}${frac !== null ? ` · ${Math.round(frac * 100)} %` : ""}` }),
      h("p", { class: "help", text: `params: ${JSON.stringify(cur.params)}` }));
  }
  const engine = st?.engine;
  for (const b of document.querySelectorAll("[data-control]")) {
    const c = b.dataset.control;
    enable(b, c.startsWith("pause") ? engine === "running" : c === "resume" ? engine === "paused"
      : engine === "running" || engine === "paused");
  }
  renderEngine();
}

function renderEngine() {
  const st = S.status;
  if (!st) return;
  const rows = [["engine", st.engine], ["RunEngine", st.run_engine],
    ["queue", `${st.queue_length ?? S.queue.items.length} item(s), ${S.queue.running ? "running" : "stopped"}`],
    ["simulated cell", st.simulated ? "yes" : "no"], ["up", duration(st.uptime_s)]];
  $("#engine").replaceChildren(...rows.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: v })]));
}

function renderDevices() {
  const devs = S.status?.devices ?? {};
  $("#devices").replaceChildren(...Object.keys(devs).sort().map((name) => {
    const d = devs[name];
    const state = !d.connected ? ["bad", "disconnected"] : d.error ? ["warn", "error"] : ["ok", "connected"];
    const values = Object.entries(d.values ?? {}).map(([k, v]) => {
      const unit = v.units ? ` ${v.units}` : "";
      const label = k.startsWith(`${name}-`) ? k.slice(name.length + 1) : k;
      return [h("dt", { text: label }), h("dd", { text: `${fmt(v.value)}${unit}` })];
    });
    return h("div", { class: "card", "data-device": name },
      h("h3", {}, `${name} `, h("span", { class: `badge ${state[0]}`, text: state[1] })),
      d.error ? h("p", { class: "error", text: d.error }) : null,
      values.length ? h("dl", {}, values.flat()) : h("p", { class: "muted", text: "no values" }));
  }));
}

function renderInterlocks() {
  const list = Object.values(S.interlocks);
  $("#interlocks").replaceChildren(...(list.length ? list.map((il) => h("li", { "data-interlock": il.name },
    h("span", { class: `badge ${il.active || il.latched ? "bad" : "ok"}`,
      text: il.active ? "TRIPPED" : il.latched ? "LATCHED" : "ok" }),
    ` ${il.name} `, h("span", { class: "muted", text: `(${il.action}) ${il.when ?? (il.device_down ? `device down: ${il.device_down.join(", ")}` : "")}` }),
    il.active || il.latched ? h("div", { class: "error", text: il.reason }) : null))
    : [h("li", { class: "muted", text: "No interlocks configured." })]));
}

// -- queue and history ---------------------------------------------------------------------------
function renderQueue() {
  const items = S.queue.items ?? [];
  $("#queue-state").textContent = S.queue.running ? "running" : "stopped";
  $("#queue-state").className = `badge ${S.queue.running ? "running" : "warn"}`;
  enable($("#queue-start"), !S.queue.running);
  enable($("#queue-stop"), S.queue.running);
  const mine = (it) => it.user === S.user || S.role === "admin";
  $("#queue-rows").replaceChildren(...(items.length ? items.map((it, i) => {
    const btn = (label, text, fn, ok) => {
      const b = h("button", { type: "button", class: "small", "data-role": "technician",
        "aria-label": `${label} ${it.protocol} (#${i + 1})`, onclick: fn, text });
      if (!mine(it)) b.title = `${it.user}'s item: moving or removing it needs the admin role`;
      b.disabled = !ok;
      return b;
    };
    return h("tr", { "data-item": it.item_uid },
      h("td", { text: String(i + 1) }), h("td", { text: it.protocol }),
      h("td", { class: "params", text: JSON.stringify(it.params) }), h("td", { text: it.user }),
      h("td", {}, btn("Move up", "↑", () => move(it, i - 1), i > 0),
        btn("Move down", "↓", () => move(it, i + 1), i < items.length - 1),
        btn("Remove", "Remove", () => remove(it), true)));
  }) : [h("tr", {}, h("td", { colspan: 5, class: "muted", text: "The queue is empty." }))]));
  applyRoles($("#queue-rows"));
  renderEngine();
}

const move = (it, index) => act(`Moving ${it.protocol}`,
  () => api("POST", `/queue/${it.item_uid}/move`, { index }));
const remove = (it) => act(`Removing ${it.protocol}`, () => api("DELETE", `/queue/${it.item_uid}`));

function renderHistory() {
  $("#history-rows").replaceChildren(...(S.history.length ? S.history.map((e) => h("tr", { "data-item": e.item_uid },
    h("td", { text: when(e.started_at) }), h("td", { text: e.protocol }), h("td", { text: `${e.user} (${e.source})` }),
    h("td", {}, h("span", { class: `badge ${e.status}`, text: e.status })),
    h("td", { text: duration(e.finished_at ? e.finished_at - e.started_at : null) }),
    h("td", { text: e.error ?? "" }))) : [h("tr", {}, h("td", { colspan: 6, class: "muted", text: "Nothing has run yet." }))]));
}

// -- start a protocol: a form from the parameter JSON schema --------------------------------------
async function loadProtocols() {
  try { S.protocols = await api("GET", "/protocols"); } catch { return; }
  const sel = $("#protocol");
  sel.replaceChildren(...S.protocols.map((p) => h("option", { value: p.name, text: `${p.title} (${p.name})` })));
  renderForm();
}

function resolve(prop, defs) {
  let p = prop.$ref ? defs[prop.$ref.split("/").pop()] : prop;
  let nullable = false;
  if (p.anyOf) {
    const rest = p.anyOf.filter((x) => x.type !== "null");
    nullable = rest.length < p.anyOf.length;
    p = { ...(rest.length === 1 ? resolve(rest[0], defs).p : {}), ...p, anyOf: undefined };
  }
  return { p, nullable };
}

function fieldFor(name, prop, required, defs) {
  const { p, nullable } = resolve(prop, defs);
  const kind = p.enum ? "enum" : ["number", "integer", "string", "boolean"].includes(p.type) ? p.type : "json";
  const id = `f-${name}`;
  const range = [];
  if (p.minimum !== undefined) range.push(`≥ ${p.minimum}`);
  if (p.exclusiveMinimum !== undefined) range.push(`> ${p.exclusiveMinimum}`);
  if (p.maximum !== undefined) range.push(`≤ ${p.maximum}`);
  if (p.exclusiveMaximum !== undefined) range.push(`< ${p.exclusiveMaximum}`);
  const unit = p.unit ?? prop.unit;
  const help = [p.description ?? prop.description, range.length ? `Range ${range.join(", ")}${unit ? ` ${unit}` : ""}.` : "",
    nullable && !required ? "Leave empty for the default." : "",
    kind === "json" ? 'JSON, e.g. {"Fe": 0.5, "Ni": 0.5}; "Fe=0.5, Ni=0.5" works too.' : ""]
    .filter(Boolean).join(" ");
  const dflt = p.default ?? prop.default;
  let input;
  if (kind === "enum") {
    input = h("select", { id, name }, ...p.enum.map((v) => h("option", { value: v, text: v, selected: v === dflt })));
  } else if (kind === "boolean") {
    input = h("input", { id, name, type: "checkbox", checked: dflt === true });
  } else if (kind === "json") {
    input = h("textarea", { id, name, rows: 2, spellcheck: "false" });
    if (dflt !== undefined && dflt !== null) input.value = JSON.stringify(dflt);
  } else {
    const numeric = kind === "number" || kind === "integer";
    input = h("input", { id, name, type: numeric ? "number" : "text", inputmode: kind === "integer" ? "numeric" : numeric ? "decimal" : null,
      step: kind === "integer" ? 1 : numeric ? "any" : null, min: p.minimum ?? p.exclusiveMinimum, max: p.maximum ?? p.exclusiveMaximum,
      pattern: p.pattern, required: required || null });
    if (dflt !== undefined && dflt !== null) input.value = String(dflt);
  }
  input.setAttribute("aria-describedby", `h-${name} e-${name}`);
  input.dataset.kind = kind;
  return h("div", { class: "field", "data-field": name },
    h("label", { for: id }, p.title ?? prop.title ?? name, unit ? h("span", { class: "unit", text: ` (${unit})` }) : null,
      required ? h("span", { "aria-label": "required", text: " *" }) : null),
    input, h("p", { class: "help", id: `h-${name}`, text: help }),
    h("p", { class: "error", id: `e-${name}`, role: "alert" }));
}

function renderForm() {
  const proto = S.protocols.find((p) => p.name === $("#protocol").value);
  if (!proto) return;
  $("#protocol-description").textContent = proto.description ?? "";
  const schema = proto.parameters ?? {};
  const req = new Set(schema.required ?? []);
  const fields = Object.entries(schema.properties ?? {}).map(([n, prop]) => fieldFor(n, prop, req.has(n), schema.$defs ?? {}));
  $("#protocol-fields").replaceChildren(...(fields.length ? fields : [h("p", { class: "muted", text: "This protocol takes no parameters." })]));
  $("#form-error").textContent = "";
}

function parseLoose(text) {
  try { return JSON.parse(text); } catch { /* not JSON: maybe "Fe=0.5, Ni=0.5" */ }
  const pairs = text.split(/[,;\s]+/).filter(Boolean).map((s) => s.split(/[=:]/));
  if (pairs.length && pairs.every((p) => p.length === 2 && p[1] !== "" && Number.isFinite(Number(p[1])))) {
    return Object.fromEntries(pairs.map(([k, v]) => [k.trim(), Number(v)]));
  }
  return text;  // the server says what is wrong with it
}

function collect() {
  const params = {};
  for (const el of $("#protocol-fields").querySelectorAll("input, select, textarea")) {
    const kind = el.dataset.kind;
    if (kind === "boolean") { params[el.name] = el.checked; continue; }
    const raw = el.value.trim();
    if (raw === "") continue;  // the protocol's default applies (or the server says it is required)
    if (kind === "number" || kind === "integer") params[el.name] = Number.isFinite(Number(raw)) ? Number(raw) : raw;
    else if (kind === "json") params[el.name] = parseLoose(raw);
    else params[el.name] = raw;
  }
  return params;
}

function showFieldErrors(err) {
  const errors = err.detail?.errors ?? [];
  let general = [];
  for (const e of errors) {
    const name = String(e.field ?? "").split(".")[0];
    const slot = name && document.getElementById(`e-${name}`);
    if (slot) {
      slot.textContent = slot.textContent ? `${slot.textContent}; ${e.message}` : e.message;
      document.getElementById(`f-${name}`)?.setAttribute("aria-invalid", "true");
    } else general.push(`${e.field}: ${e.message}`);
  }
  if (!errors.length) general = [err.message];
  $("#form-error").textContent = general.length ? general.join("; ") : "The server refused some values: see the fields marked.";
  const first = document.querySelector("#protocol-fields [aria-invalid=true]");
  if (first) first.focus();
}

async function submitProtocol(ev) {
  ev.preventDefault();
  for (const e of document.querySelectorAll("#protocol-fields .error")) e.textContent = "";
  for (const e of document.querySelectorAll("#protocol-fields [aria-invalid]")) e.removeAttribute("aria-invalid");
  $("#form-error").textContent = "";
  const protocol = $("#protocol").value;
  const now = ev.submitter?.value === "run";
  try {
    await api("POST", now ? "/run" : "/queue", { protocol, params: collect() });
    notify(now ? `${protocol} started.` : `${protocol} added to the queue${S.queue.running ? "" : " (the queue is stopped: start it in Queue & history)"}.`, "info");
  } catch (err) {
    if (err.status === 422) showFieldErrors(err);
    else if (err instanceof ApiError) { $("#form-error").textContent = err.message; refused(`Starting ${protocol}`, err); }
    else $("#form-error").textContent = err.message;
  }
}

// -- campaigns -----------------------------------------------------------------------------------
// Routes (labd/api/campaigns.py, campaigns keyed by id = the spec's name): GET /campaigns (the
// list), GET /campaigns/{id} (status, reason, budgets, rack slots free), GET .../report (best
// after each sample, objective, budget), GET .../samples.csv (every sample: made, then
// interrupted), POST /campaigns {spec_yaml} and .../pause|resume|stop. A "campaign" event on the
// WebSocket (any change of a campaign's state) makes the page fetch the shown campaign again.
const CAMPAIGN_ACTIVE = ["running", "paused", "stopping"];

async function loadCampaigns() {
  const note = $("#campaigns-status");
  const tech = allows(S.role, "technician");
  $("#campaign-role-note").hidden = tech;
  $("#campaign-role-note").textContent = tech ? "" : `Starting a campaign needs the technician role; you are signed in as a ${S.role}.`;
  try { S.campaigns = await api("GET", "/campaigns"); } catch (err) {
    note.textContent = `Cannot load campaigns: ${err.message}`;
    return;
  }
  note.textContent = S.campaigns.length ? "" : "No campaigns yet: start one below.";
  const [, arg] = location.hash.slice(1).split("/");
  const wanted = arg ? decodeURIComponent(arg) : null;
  // the campaign asked for in the address, else the newest one still going, else the newest
  const newest = [...S.campaigns].sort((a, b) => b.created_at - a.created_at);
  S.campaign = wanted ?? (newest.find((c) => CAMPAIGN_ACTIVE.includes(c.status)) ?? newest[0])?.id ?? null;
  renderCampaignList();
  await loadCampaign();
}

function renderCampaignList() {
  $("#campaign-rows").replaceChildren(...[...(S.campaigns ?? [])].sort((a, b) => b.created_at - a.created_at)
    .map((c) => h("tr", { "data-campaign-row": c.id, class: c.id === S.campaign ? "selected" : null },
      h("td", {}, h("a", { href: `#campaigns/${encodeURIComponent(c.id)}`, "aria-current": c.id === S.campaign ? "true" : null, text: c.id })),
      h("td", {}, h("span", { class: `badge ${c.status}`, text: c.status })),
      h("td", { text: `${c.samples_made ?? 0}${c.samples_budget ? ` of ${c.samples_budget}` : ""}` }),
      h("td", { text: c.best ? `${fmt(c.best.value)} (${c.best.sample_id})` : "—" }),
      h("td", { text: `${c.user} · ${when(c.created_at)}` }))));
}

let campaignPending = null;
function campaignChanged(ev) {  // a "campaign" event: update the list row, refetch the shown one
  const known = S.campaigns?.find((c) => c.id === ev.id);
  if (!known) { loadCampaigns(); return; }
  Object.assign(known, { status: ev.status, reason: ev.reason, samples_made: ev.samples_made, best: ev.best });
  renderCampaignList();
  if (ev.id !== S.campaign || campaignPending) return;
  campaignPending = setTimeout(() => { campaignPending = null; loadCampaign(); }, 100);
}

async function loadCampaign() {
  const id = S.campaign;
  if (!id) { $("#campaign-detail").replaceChildren(); return; }
  const path = `/campaigns/${encodeURIComponent(id)}`;
  try {
    const [status, report, csv] = await Promise.all([api("GET", path), api("GET", `${path}/report`),
      apiText("GET", `${path}/samples.csv`)]);
    if (S.campaign === id) renderCampaignDetail(status, report, parseCsv(csv));
  } catch (err) {
    $("#campaign-detail").replaceChildren(h("p", { class: "error", role: "alert", text: `Campaign ${id}: ${err.message}` }));
  }
}

async function apiText(method, path) {
  const r = await fetch(API + path, { method, headers: { Authorization: `Bearer ${S.token}`, "X-Labd-Client": "web" } });
  if (!r.ok) {
    let detail = null;
    try { detail = (await r.json()).detail; } catch { /* not JSON */ }
    throw new ApiError(r.status, detail);
  }
  return r.text();
}

// RFC 4180 CSV (quoted fields may hold commas, quotes and newlines) to objects by header.
function parseCsv(text) {
  const rows = [[]];
  let field = ""; let quoted = false;
  for (let i = 0; i < text.length; i += 1) {
    const ch = text[i];
    if (quoted) {
      if (ch === '"' && text[i + 1] === '"') { field += '"'; i += 1; } else if (ch === '"') quoted = false; else field += ch;
    } else if (ch === '"') quoted = true;
    else if (ch === ",") { rows.at(-1).push(field); field = ""; } else if (ch === "\n") { rows.at(-1).push(field.replace(/\r$/, "")); field = ""; rows.push([]); } else field += ch;
  }
  if (field || rows.at(-1).length) rows.at(-1).push(field);
  const [head, ...body] = rows.filter((r) => r.length > 1 || r[0]);
  return (body ?? []).map((r) => Object.fromEntries(head.map((k, i) => [k, r[i] ?? ""])));
}

const num = (s) => (s === "" || s === undefined ? null : Number(s));

function renderCampaignDetail(st, rep, rows) {
  const id = st.id;
  const els = rep.elements;
  const unit = rep.objective?.property ?? "value";
  const goal = rep.objective?.goal ?? "maximize";
  const made = rows.filter((r) => r.status === "made");
  const bud = rep.budget;
  const hours = bud.hours ? `${fmt(bud.hours_used, 3)} of ${bud.hours} h (${fmt(Math.max(0, bud.hours - bud.hours_used), 3)} h left)`
    : `${fmt(bud.hours_used, 3)} h (no limit)`;
  const grams = st.grams_left ? comp(st.grams_left) : "no limit";
  const budget = [
    ["samples made", `${rep.samples_made}${bud.samples ? ` of ${bud.samples}` : ""}`],
    ["samples left", bud.samples_left ?? "no limit"], ["in progress", rep.samples_pending],
    ["interrupted", rep.samples_interrupted], ["time", hours], ["powder left (g)", grams],
    ["furnace loads", ["done", "queued", "planned"].map((k) => `${st.batches.filter((b) => b.state === k).length} ${k === "queued" ? "in the queue" : k}`).join(", ")],
    ["empty crucibles", st.rack_slots_free ?? "—"],
    ["best", rep.best ? `${fmt(rep.best.value)} ${unit} (${rep.best.sample_id}: ${comp(rep.best.composition)})` : "—"]];
  const ctl = (action, label, ok, body) => h("button", {
    type: "button", "data-role": "technician", "data-campaign-control": action, text: label, disabled: !ok,
    onclick: () => campaignControl(id, action, label, body?.()) });
  const refill = h("input", { type: "checkbox", id: "campaign-refilled", checked: !!S.refilled[id],
    onchange: (ev) => { S.refilled[id] = ev.target.checked; } });
  const best = h("canvas", { width: 520, height: 300, id: "campaign-best", role: "img",
    "aria-label": `Best ${unit} (${goal}) against samples made`, "data-samples": made.length });
  const space = h("canvas", { width: 520, height: 300, id: "campaign-space", role: "img",
    "aria-label": `Where the samples fall in composition space (${els.join(", ")}), coloured by ${unit}`, "data-samples": made.length });
  $("#campaign-detail").replaceChildren(h("div", { class: "card", "data-campaign": id },
    h("div", { class: "row" }, h("h3", { text: `Campaign ${id}` }),
      h("span", { class: `badge ${st.status}`, id: "campaign-state", text: st.status })),
    st.reason ? h("p", { id: "campaign-reason", class: st.status === "paused" ? "banner warn" : "help", text: st.reason }) : null,
    h("div", { class: "controls", role: "group", "aria-label": `Control campaign ${id}` },
      ctl("pause", "Pause campaign", st.status === "running"),
      h("span", { class: "check" }, refill, h("label", { for: "campaign-refilled", text: "Rack refilled (used crucibles replaced by empty ones)" })),
      ctl("resume", "Resume campaign", st.status === "paused", () => ({ refilled: !!S.refilled[id] })),
      ctl("stop", "Stop campaign", st.status === "running" || st.status === "paused")),
    h("p", { id: "campaign-control-error", class: "error", role: "alert" }),
    h("dl", { class: "kv", id: "campaign-budget" }, budget.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { "data-key": k, text: String(v) })])),
    h("div", { class: "plots" }, best, space),
    h("table", { class: "table" }, h("caption", { class: "sr-only", text: `Samples of campaign ${id}, newest first` }),
      h("thead", {}, h("tr", {}, ...["Sample", "Status", "Target", "Measured", "Anneal", unit].map((t) => h("th", { text: t })))),
      h("tbody", { id: "campaign-samples" }, ...[...made].reverse().concat(rows.filter((r) => r.status !== "made")).map((r) => {
        const target = Object.fromEntries(els.map((e) => [e, num(r[`target_${e}`])]).filter(([, v]) => v));
        const meas = Object.fromEntries(els.map((e) => [e, num(r[`measured_${e}`])]).filter(([, v]) => v !== null));
        return h("tr", { "data-sample": r.sample_id },
          h("td", {}, r.status === "made" ? h("a", { href: `#samples/${encodeURIComponent(r.sample_id)}`, text: r.sample_id }) : r.sample_id),
          h("td", { text: r.status === "made" ? "made" : `${r.status}: ${r.reason}` }),
          h("td", { text: comp(target) }), h("td", { text: comp(meas) }),
          h("td", { text: r.anneal_c ? `${fmt(num(r.anneal_c))} °C, ${fmt(num(r.anneal_h), 3)} h` : "—" }),
          h("td", { text: fmt(num(r.value)) }));
      })))));
  applyRoles($("#campaign-detail"));
  plotBest(best, made.map((r) => num(r.value)), rep.best_after_sample, goal, unit);
  plotSpace(space, made.map((r) => ({ value: num(r.value), x: els.map((e) => num(r[`target_${e}`]) ?? 0) })), els, unit);
}

async function campaignControl(id, action, label, body) {
  $("#campaign-control-error").textContent = "";
  try {
    await api("POST", `/campaigns/${encodeURIComponent(id)}/${action}`, body ?? {});
    if (action === "resume") delete S.refilled[id];
    notify(`${label}: done (${id}).`, "info");
  } catch (err) {
    if (!(err instanceof ApiError)) { $("#campaign-control-error").textContent = err.message; return; }
    refused(`${label} ${id}`, err);
    $("#campaign-control-error").textContent = `The daemon refused: ${err.message}`;
  }
  loadCampaign();
}

function axes(ctx, w, h_, pad, xr, yr, xl, yl) {
  ctx.clearRect(0, 0, w, h_);
  ctx.strokeStyle = "#15181d"; ctx.fillStyle = "#15181d"; ctx.font = "12px system-ui"; ctx.lineWidth = 1;
  ctx.strokeRect(pad, 10, w - pad - 10, h_ - pad - 10);
  ctx.fillText(`${fmt(xr[0], 3)}`, pad, h_ - pad + 14); ctx.fillText(`${fmt(xr[1], 3)}`, w - 40, h_ - pad + 14);
  ctx.fillText(`${fmt(yr[1], 3)}`, 2, 20); ctx.fillText(`${fmt(yr[0], 3)}`, 2, h_ - pad);
  ctx.fillText(xl, w / 2 - 40, h_ - 6);
  ctx.save(); ctx.translate(12, h_ / 2 + 30); ctx.rotate(-Math.PI / 2); ctx.fillText(yl, 0, 0); ctx.restore();
  const sx = (x) => pad + ((x - xr[0]) / (xr[1] - xr[0] || 1)) * (w - pad - 10);
  const sy = (y) => h_ - pad - ((y - yr[0]) / (yr[1] - yr[0] || 1)) * (h_ - pad - 20);
  return [sx, sy];
}

// Each sample's value (grey dots) and the best so far (the report's best_after_sample, a step line).
function plotBest(canvas, values, bestAfter, goal, unit) {
  const ctx = canvas.getContext("2d");
  ctx.font = "14px system-ui";
  if (!values.length) { ctx.fillText("no sample measured yet", 20, 30); return; }
  const all = [...values, ...bestAfter];
  const lo = Math.min(...all); const hi = Math.max(...all);
  const pad = (hi - lo) * 0.08 || Math.abs(hi) * 0.05 || 1;
  const [sx, sy] = axes(ctx, canvas.width, canvas.height, 50, [1, Math.max(2, values.length)],
    [lo - pad, hi + pad], "samples made", `${unit} (${goal})`);
  ctx.fillStyle = "#6b7483";
  values.forEach((v, i) => { ctx.beginPath(); ctx.arc(sx(i + 1), sy(v), 3.5, 0, 7); ctx.fill(); });
  ctx.strokeStyle = "#0b5cad"; ctx.lineWidth = 2.5; ctx.beginPath();
  bestAfter.forEach((b, i) => {
    if (i === 0) { ctx.moveTo(sx(1), sy(b)); return; }
    ctx.lineTo(sx(i + 1), sy(bestAfter[i - 1])); ctx.lineTo(sx(i + 1), sy(b));
  });
  ctx.stroke();
}

// The first two principal components of the compositions (power iteration on the covariance):
// the projection the report's PNG uses for more than three elements.
function pca2(xs) {
  const k = xs[0].length; const n = xs.length;
  const mean = Array.from({ length: k }, (_, j) => xs.reduce((s, x) => s + x[j], 0) / n);
  const c = xs.map((x) => x.map((v, j) => v - mean[j]));
  let cov = Array.from({ length: k }, (_, a) => Array.from({ length: k }, (_, b) => c.reduce((s, x) => s + x[a] * x[b], 0) / n));
  const comps = [];
  for (let m = 0; m < 2; m += 1) {
    let v = Array.from({ length: k }, (_, j) => 1 + j * 0.1);
    let lambda = 0;
    for (let it = 0; it < 200; it += 1) {
      const w = cov.map((row) => row.reduce((s, x, j) => s + x * v[j], 0));
      const norm = Math.hypot(...w) || 1;
      lambda = norm; v = w.map((x) => x / norm);
    }
    comps.push(v);
    cov = cov.map((row, a) => row.map((x, b) => x - lambda * v[a] * v[b]));  // deflate
  }
  return c.map((x) => comps.map((v) => x.reduce((s, xi, j) => s + xi * v[j], 0)));
}

function plotSpace(canvas, points, elements, unit) {
  const ctx = canvas.getContext("2d");
  ctx.font = "14px system-ui";
  if (!points.length) { ctx.fillText("no sample measured yet", 20, 30); return; }
  const values = points.map((p) => p.value);
  const lo = Math.min(...values); const hi = Math.max(...values);
  const colour = (v) => `hsl(${240 - 240 * ((v - lo) / (hi - lo || 1))} 80% 42%)`;
  const w = canvas.width; const ht = canvas.height;
  let place;
  if (elements.length === 3) {  // a ternary diagram
    ctx.clearRect(0, 0, w, ht); ctx.strokeStyle = "#15181d"; ctx.fillStyle = "#15181d"; ctx.font = "13px system-ui";
    const P = [[w / 2, 15], [40, ht - 35], [w - 40, ht - 35]];
    ctx.beginPath(); ctx.moveTo(...P[0]); ctx.lineTo(...P[1]); ctx.lineTo(...P[2]); ctx.closePath(); ctx.stroke();
    ctx.fillText(elements[0], P[0][0] + 8, P[0][1] + 5); ctx.fillText(elements[1], P[1][0] - 20, P[1][1] + 16);
    ctx.fillText(elements[2], P[2][0] + 4, P[2][1] + 16);
    place = (p) => {
      const s = p.x[0] + p.x[1] + p.x[2] || 1;
      return [0, 1].map((k) => (p.x[0] * P[0][k] + p.x[1] * P[1][k] + p.x[2] * P[2][k]) / s);
    };
  } else if (elements.length === 2) {
    const [sx, sy] = axes(ctx, w, ht, 50, [0, 1], [0, 1], `${elements[0]} fraction`, `${elements[1]} fraction`);
    place = (p) => [sx(p.x[0]), sy(p.x[1])];
  } else {
    const pc = pca2(points.map((p) => p.x));
    const ext = (j) => [Math.min(...pc.map((q) => q[j])) - 0.02, Math.max(...pc.map((q) => q[j])) + 0.02];
    const [sx, sy] = axes(ctx, w, ht, 50, ext(0), ext(1), "principal component 1", "principal component 2");
    const index = new Map(points.map((p, i) => [p, i]));
    place = (p) => [sx(pc[index.get(p)][0]), sy(pc[index.get(p)][1])];
  }
  points.forEach((p) => { const [x, y] = place(p); ctx.fillStyle = colour(p.value); ctx.beginPath(); ctx.arc(x, y, 5, 0, 7); ctx.fill(); });
  ctx.fillStyle = "#15181d"; ctx.font = "12px system-ui";
  ctx.fillText(`colour: ${unit} ${fmt(lo, 3)} (blue) … ${fmt(hi, 3)} (red)`, 50, ht - 4);
}

// The textarea's text (YAML or JSON, as a campaign file, with its run: section) goes to the
// daemon as it is: the daemon parses it and names what is wrong.
async function startCampaign(ev) {
  ev.preventDefault();
  const text = $("#campaign-spec").value;
  $("#campaign-error").textContent = "";
  if (!text.trim()) { $("#campaign-error").textContent = "Paste a campaign spec or load a file first."; return; }
  try {
    const c = await api("POST", "/campaigns", { spec_yaml: text });
    notify(`Campaign ${c.id} started.`, "info");
    $("#campaign-new").open = false;
    if (location.hash === `#campaigns/${encodeURIComponent(c.id)}`) loadCampaigns();
    else location.hash = `#campaigns/${encodeURIComponent(c.id)}`;
  } catch (err) {
    const errors = err.detail?.errors ?? [];
    const why = err.status === 403 ? "Refused: starting a campaign needs the technician role"
      : err.status === 409 ? "Refused" : err.status === 422 ? "The daemon refused the spec" : "Error";
    $("#campaign-error").textContent = [`${why}: ${err.message}`,
      ...errors.map((e) => `• ${e.field}: ${e.message}`)].join("\n");
  }
}

// -- samples -------------------------------------------------------------------------------------
// GET /samples (the journal's sample table, rows of labd.samples.SampleRow) and GET
// /samples/{id} (one row and its run's furnace profile).
async function loadSamples(selected) {
  const note = $("#samples-status");
  try {
    S.samples = await api("GET", "/samples");
    note.textContent = S.samples.length ? "" : "No samples made yet.";
  } catch (err) {
    note.textContent = `Cannot load samples: ${err.message}`;
    S.samples = [];
  }
  const unit = (r) => (r.property_unit ? ` ${r.property_unit}` : "");
  $("#sample-rows").replaceChildren(...[...S.samples].reverse().map((r) => h("tr", { "data-sample": r.sample_id },
    h("td", {}, h("a", { href: `#samples/${encodeURIComponent(r.sample_id)}`, text: r.sample_id })),
    h("td", { text: r.campaign ?? "—" }), h("td", { text: comp(r.target_composition) }),
    h("td", { text: comp(r.measured_composition) }),
    h("td", { text: r.property_value !== null ? `${r.property_name ?? ""} ${fmt(r.property_value)}${unit(r)}` : "—" }))));
  if (selected) await showSample(selected);
  else $("#sample-detail").replaceChildren();
}

function plotFurnace(canvas, f) {
  const t0 = f.time[0];
  const mins = f.time.map((t) => (t - t0) / 60);
  const lo = Math.min(...f.value); const hi = Math.max(...f.value);
  const ctx = canvas.getContext("2d");
  const [sx, sy] = axes(ctx, canvas.width, canvas.height, 50, [0, Math.max(...mins) || 1],
    [Math.floor(lo / 50) * 50, Math.ceil(hi / 50) * 50 || 50], "minutes since the program started",
    `${f.data_key}${f.units ? ` (${f.units})` : ""}`);
  ctx.strokeStyle = "#a4161a"; ctx.lineWidth = 2; ctx.beginPath();
  mins.forEach((m, i) => (i ? ctx.lineTo(sx(m), sy(f.value[i])) : ctx.moveTo(sx(m), sy(f.value[i]))));
  ctx.stroke();
}

async function showSample(id) {
  let s;
  try { s = await api("GET", `/samples/${encodeURIComponent(id)}`); } catch (err) {
    $("#sample-detail").replaceChildren(h("p", { class: "error", role: "alert", text: `Sample ${id}: ${err.message}` }));
    return;
  }
  const els = [...new Set([...Object.keys(s.target_composition), ...Object.keys(s.measured_composition), ...Object.keys(s.dosed_mg)])];
  const f = s.furnace;
  const canvas = h("canvas", { width: 620, height: 260, id: "sample-furnace", role: "img",
    "aria-label": "Temperature the furnace followed in this sample's run", "data-points": f ? f.value.length : 0 });
  const peak = f ? Math.max(...f.value) : null;
  const unit = s.property_unit ? ` ${s.property_unit}` : "";
  const facts = [
    [s.property_name ?? "property", s.property_value !== null ? `${fmt(s.property_value)}${unit}` : "not measured"],
    ["anneal", s.anneal_c !== null ? `${fmt(s.anneal_c)} °C for ${duration(s.anneal_s)}` : "—"],
    ["made by", `${s.protocol ?? "—"}${s.campaign ? ` (campaign ${s.campaign})` : ""}`],
    ["finished", new Date(s.time * 1000).toLocaleString()], ["run", s.run_uid],
    ...Object.entries(s.extra ?? {}).map(([k, v]) => [k.replaceAll("_", " "), fmt(v)])];
  $("#sample-detail").replaceChildren(h("div", { class: "card", id: "sample-story", "data-sample": s.sample_id },
    h("h3", { text: `Sample ${s.sample_id}` }),
    h("table", { class: "table", id: "sample-composition" },
      h("caption", { class: "sr-only", text: "Composition: targeted, measured, and the powder dosed" }),
      h("thead", {}, h("tr", {}, ...["Element", "Target (at. fraction)", "Measured (at. fraction)", "Dosed (mg)"].map((x) => h("th", { text: x })))),
      h("tbody", {}, ...els.map((e) => h("tr", { "data-element": e }, h("td", { text: e }), h("td", { text: fmt(s.target_composition[e]) }),
        h("td", { text: fmt(s.measured_composition[e]) }), h("td", { text: fmt(s.dosed_mg[e]) }))))),
    h("dl", { class: "kv", id: "sample-facts" }, facts.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { "data-key": k, text: v })])),
    h("h4", { text: "Furnace profile" }),
    f ? h("p", { class: "help", id: "sample-furnace-summary",
      text: `${f.points_total} readings of ${f.data_key}, peak ${fmt(peak)}${f.units ? ` ${f.units}` : ""}, over ${duration(f.time.at(-1) - f.time[0])}` }) : null,
    f ? canvas : h("p", { class: "muted", text: "This sample's run recorded no furnace temperatures." })));
  if (f) plotFurnace(canvas, f);
  $("#sample-story").scrollIntoView({ block: "start" });
}

// -- navigation and wiring -----------------------------------------------------------------------
function route() {
  const [tab, arg] = (location.hash.slice(1) || "cell").split("/");
  const name = ["cell", "queue", "start", "campaigns", "samples"].includes(tab) ? tab : "cell";
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== `view-${name}`;
  for (const a of document.querySelectorAll("[data-tab]")) {
    if (a.dataset.tab === name) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  if (!S.token) return;
  if (name === "campaigns") loadCampaigns();
  if (name === "samples") loadSamples(arg ? decodeURIComponent(arg) : null);
}

function renderAll() {
  renderBanners(); renderRun(); renderDevices(); renderInterlocks(); renderQueue(); renderHistory();
}

function control(command) {
  const path = command === "pause" ? "/run/pause" : command === "pause_now" ? "/run/pause?defer=false" : `/run/${command}`;
  return act(`${command.replace("_", " ")}`, () => api("POST", path, command.startsWith("pause") ? undefined : {}));
}

$("#sign-in-form").addEventListener("submit", (e) => { e.preventDefault(); signIn($("#token").value.trim()); });
$("#sign-out").addEventListener("click", () => signOut());
$("#notice-close").addEventListener("click", () => { $("#notice").hidden = true; });
$("#protocol").addEventListener("change", renderForm);
$("#protocol-form").addEventListener("submit", submitProtocol);
$("#campaign-form").addEventListener("submit", startCampaign);
$("#campaign-file").addEventListener("change", async (e) => {
  const f = e.target.files[0];
  if (f) $("#campaign-spec").value = await f.text();
});
$("#queue-start").addEventListener("click", () => act("Starting the queue", () => api("POST", "/queue/start")));
$("#queue-stop").addEventListener("click", () => act("Stopping the queue", () => api("POST", "/queue/stop")));
for (const b of document.querySelectorAll("[data-control]")) {
  b.addEventListener("click", () => {
    if (b.dataset.control === "abort" && !confirm("Abort the run? Its cleanup runs, and it is recorded as aborted.")) return;
    control(b.dataset.control);
  });
}
window.addEventListener("hashchange", route);
setInterval(() => { if (S.token && !S.connected) renderBanners(); }, 1000);  // the retry countdown

if (S.token) signIn(S.token); else signOut();
route();
