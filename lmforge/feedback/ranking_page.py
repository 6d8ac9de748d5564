"""The human ranking page: a local web page on which a person judges sampled responses.

`serve` reads `responses.jsonl` (one prompt and its 2 to 4 sampled responses a line, written by
`lmforge sample`) and answers on 127.0.0.1 with one page: the prompt, its responses, and controls
to pick the best (keys 1-4), rank them in click order (r, then 1-4 or clicks, Enter), call a tie
(t) or skip (s). Each judgment becomes one ranking record (the shared record format: `ranking`
best first, `tie`/`skip` with an empty ranking, `annotator` {"kind": "human", "session": ...}).

Key choices:
- Durable and at most once: `JudgmentLog` appends each record with write + flush + fsync under a
  lock, and only for a prompt id not yet in the file, before the browser is told it was saved.
  Killing the server loses nothing acknowledged; a restart reads the file (dropping a torn last
  line, which was never acknowledged) and serves only the prompts still unjudged.
- Model output is untrusted text: the page builds every element with `textContent`, and a
  Content-Security-Policy allowing only the page's own nonce'd script backs that up (every
  other response carries one that allows nothing).
- A local server is reachable by every web page the user visits (through the browser) and by
  every local user, so: a random per-session token is required for the page (in the printed
  URL) and on every API call (a header); a foreign Host header (DNS rebinding) or a foreign
  Origin on a POST (cross-site requests) gets 403; bodies over 64 KiB or not JSON (nested too
  deeply, lone surrogates included) are refused;
  there is no file serving at all, so no path can reach the disk. Binding beyond loopback needs
  `allow_remote=True`; the Host check is then off and the token is the only guard (plain HTTP).
- Werkzeug's threaded server (a well-kept, dependency-light WSGI library): one page for one
  person needs no async stack. We bind the socket ourselves so a busy port is a `UserError`.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import os
import secrets
import signal
import socket
import socketserver
import sys
import threading
import webbrowser
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from werkzeug.exceptions import HTTPException
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from lmforge.data.corpora import BadJSON, parse_json, read_jsonl
from lmforge.errors import UserError, where
from lmforge.io import fsync_dir

MAX_BODY = 64 * 1024  # bytes; a judgment is a few dozen
MIN_RESPONSES, MAX_RESPONSES = 2, 4  # what one screen and the keys 1-4 can hold
TOKEN_HEADER = "X-Lmforge-Token"

Task = dict[str, Any]  # {"id": str, "messages": [{"role", "content"}], "responses": [str]}


# ---------------------------------------------------------------------------------------------
# input and output files


def load_tasks(path: Path) -> list[Task]:
    """Read and check responses.jsonl; each bad record is one `UserError` naming file:line:field."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    tasks: list[Task] = []
    first_line: dict[str, int] = {}
    for i, rec in read_jsonl(path):
        if not isinstance(rec, dict):
            raise UserError(f"{where(path, i)}: expected a JSON object")
        pid = rec.get("id")
        if not isinstance(pid, str) or not pid:
            raise UserError(f"{where(path, i, 'id')}: expected a non-empty string (the prompt id)")
        if pid in first_line:
            raise UserError(f"{where(path, i, 'id')}: {pid!r} repeats line {first_line[pid]}")
        first_line[pid] = i
        msgs, resps = _messages(rec, path, i), _responses(rec, path, i)
        tasks.append({"id": pid, "messages": msgs, "responses": resps})
    if not tasks:
        raise UserError(f"{path}: no prompts to judge")
    return tasks


def _messages(rec: dict[str, Any], path: Path, line: int) -> list[dict[str, str]]:
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        got = "missing" if msgs is None else "empty or not a list"
        raise UserError(f"{where(path, line, 'messages')}: {got}; expected a list of chat messages")
    for j, m in enumerate(msgs):
        for key in ("role", "content"):
            if not isinstance(m, dict) or not isinstance(m.get(key), str):
                field = f"messages[{j}].{key}"
                raise UserError(f"{where(path, line, field)}: expected a string")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _responses(rec: dict[str, Any], path: Path, line: int) -> list[str]:
    resps = rec.get("responses")
    if not isinstance(resps, list):
        got = "missing" if resps is None else f"a {type(resps).__name__}"
        raise UserError(f"{where(path, line, 'responses')}: {got}; expected a list of strings")
    if not MIN_RESPONSES <= len(resps) <= MAX_RESPONSES:
        raise UserError(
            f"{where(path, line, 'responses')}: has {len(resps)}; the ranking page shows "
            f"{MIN_RESPONSES} to {MAX_RESPONSES} responses a prompt (sample fewer)"
        )
    for j, r in enumerate(resps):
        if not isinstance(r, str):
            raise UserError(
                f"{where(path, line, f'responses[{j}]')}: expected a string, got {type(r).__name__}"
            )
    return list(resps)


class JudgmentLog:
    """The output file: judged prompt ids, and `append`, which writes a record durably at most
    once per id. One log holds an exclusive lock on the file, so two servers cannot share it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise UserError(f"{self.path}: is a folder; expected the output .jsonl file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        self._file = open(self.path, "ab")  # noqa: SIM115 - held open for the server's life
        if not existed:
            fsync_dir(self.path.parent)
        self.lock = threading.Lock()  # held while an id is checked and its record written
        try:
            _lock_exclusively(self._file, self.path)
            self.judged, self.torn = self._recover()
        except BaseException:
            self._file.close()
            raise

    def _recover(self) -> tuple[set[str], bool]:
        """Ids already judged; a torn last line (a write cut short, never acknowledged) is cut
        off so that the next record starts on a line of its own."""
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        judged = {self._id_of(line, i) for i, line in enumerate(lines, 1) if line.strip()}
        torn = False
        if tail.strip():
            try:
                judged.add(self._id_of(tail, len(lines) + 1))
                self._write(b"\n")  # a whole record that only lacks its newline
            except UserError:
                os.truncate(self.path, len(data) - len(tail))
                os.fsync(self._file.fileno())
                torn = True
        return judged, torn

    def _id_of(self, line: bytes, lineno: int) -> str:
        try:
            rec, _ = parse_json(line.decode("utf-8"))
        except (BadJSON, UnicodeDecodeError):
            raise UserError(
                f"{where(self.path, lineno)}: invalid JSON (only a torn last line is ignored)"
            ) from None
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
            raise UserError(f"{where(self.path, lineno, 'id')}: expected a ranking record")
        return str(rec["id"])

    def append(self, record: dict[str, Any]) -> bool:
        """Write `record` unless its id is already judged; True if it was written."""
        line = json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"
        with self.lock:
            if record["id"] in self.judged:
                return False
            self._write(line)
            self.judged.add(record["id"])
            return True

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _lock_exclusively(f: Any, path: Path) -> None:
    if sys.platform == "win32":
        return
    import fcntl

    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"{path}: another ranking page is writing to this file") from None


# ---------------------------------------------------------------------------------------------
# the web app


def ranking_record(task: Task, judgment: dict[str, Any], session: str) -> dict[str, Any]:
    """A checked judgment {"ranking", "tie", "skip"} as a ranking record (the shared format)."""
    return {
        "id": task["id"],
        "prompt": task["messages"],
        "responses": task["responses"],
        "ranking": judgment["ranking"],
        "tie": judgment["tie"],
        "skip": judgment["skip"],
        "annotator": {"kind": "human", "session": session},
        "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def check_judgment(body: object, tasks: dict[str, Task]) -> tuple[Task, dict[str, Any]]:
    """Validate a POSTed judgment; raises ValueError with the reason."""
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    unknown = set(body) - {"id", "ranking", "tie", "skip"}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    pid = body.get("id")
    task = tasks.get(pid) if isinstance(pid, str) else None
    if task is None:
        raise ValueError("unknown prompt id")
    ranking, tie, skip = body.get("ranking", []), body.get("tie", False), body.get("skip", False)
    if not isinstance(tie, bool) or not isinstance(skip, bool):
        raise ValueError("tie and skip must be true or false")
    k = len(task["responses"])
    if not isinstance(ranking, list) or not all(type(r) is int and 0 <= r < k for r in ranking):
        raise ValueError(f"ranking must be a list of response indices 0..{k - 1}")
    if len(set(ranking)) != len(ranking):
        raise ValueError("ranking repeats a response")
    if (tie or skip) and (ranking or (tie and skip)):
        raise ValueError("a tie or a skip carries no ranking (and not both)")
    if not (tie or skip or ranking):
        raise ValueError("rank at least the best response, or mark a tie or skip")
    return task, {"ranking": ranking, "tie": tie, "skip": skip}


class RankingApp:
    """The WSGI application: the page (GET /), the next prompt (GET /api/next) and judgments
    (POST /api/judge). `allowed_hosts` are the Host headers accepted (None: any)."""

    def __init__(
        self,
        tasks: list[Task],
        log: JudgmentLog,
        token: str,
        session: str,
        allowed_hosts: set[str] | None,
    ) -> None:
        self.tasks = tasks
        self.by_id = {t["id"]: t for t in tasks}
        self.log = log
        self.token = token
        self.session = session
        self.allowed_hosts = allowed_hosts
        self._next = 0  # the first unjudged task; only moves forward, as judged ids only grow

    def progress(self) -> dict[str, Any]:
        """The next prompt to judge (None when all are) and the counts; call under the lock."""
        judged = self.log.judged
        while self._next < len(self.tasks) and self.tasks[self._next]["id"] in judged:
            self._next += 1
        task = self.tasks[self._next] if self._next < len(self.tasks) else None
        done = len(judged.intersection(self.by_id))
        return {"task": task, "done": done, "total": len(self.tasks)}

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        request = Request(environ)
        try:
            response = self.dispatch(request)
        except HTTPException as e:  # werkzeug's own, e.g. for a malformed request
            response = _json({"error": e.description or e.name}, e.code or 400)
        for key, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response(environ, start_response)

    def dispatch(self, request: Request) -> Response:
        host = request.headers.get("Host", "").lower()
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            return _json({"error": "foreign Host header"}, 403)
        routes = {"/": ("GET", "HEAD"), "/api/next": ("GET",), "/api/judge": ("POST",)}
        if request.path not in routes:
            return _json({"error": "not found"}, 404)
        if request.method not in routes[request.path]:
            return _json({"error": "method not allowed"}, 405)
        if request.path == "/":  # the page's token comes in the printed URL, the API's in a header
            given = request.args.get("token", "")
        else:
            given = request.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return _json({"error": "missing or wrong session token (open the printed URL)"}, 403)
        if request.path == "/":
            return self.page()
        if request.path == "/api/next":
            with self.log.lock:
                return _json(self.progress())
        origin = request.headers.get("Origin")
        if origin is not None and origin.lower() != f"http://{host}":
            return _json({"error": "foreign Origin"}, 403)
        return self.judge(request)

    def judge(self, request: Request) -> Response:
        if request.mimetype != "application/json":
            return _json({"error": "expected Content-Type: application/json"}, 415)
        length = request.content_length
        data = request.stream.read(MAX_BODY + 1) if length is None or length <= MAX_BODY else b""
        if len(data) > MAX_BODY or (length or 0) > MAX_BODY:  # chunked bodies carry no length
            return _json({"error": f"body over {MAX_BODY} bytes"}, 413)
        try:
            body, _ = parse_json(data.decode("utf-8"))
            task, judgment = check_judgment(body, self.by_id)
        except (BadJSON, UnicodeDecodeError):  # deep nesting and lone surrogates included
            return _json({"error": "malformed JSON"}, 400)
        except ValueError as e:
            return _json({"error": str(e)}, 400)
        written = self.log.append(ranking_record(task, judgment, self.session))
        with self.log.lock:
            return _json({"written": written, **self.progress()})

    def page(self) -> Response:
        nonce = secrets.token_urlsafe(16)
        body = (
            PAGE.replace("{{nonce}}", nonce)
            .replace("{{token}}", html.escape(self.token))
            .replace("{{token_header}}", TOKEN_HEADER)
            .replace("{{out}}", html.escape(self.log.path.name))
        )
        csp = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        return Response(body, mimetype="text/html", headers={"Content-Security-Policy": csp})


_SECURITY_HEADERS = {
    # Every response, not only the page: a JSON or error body opened as a document must not
    # run script either (the page replaces this with its own, which allows its nonce'd script).
    "Content-Security-Policy": "default-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def _json(data: object, status: int = 200) -> Response:
    body = json.dumps(data, ensure_ascii=False)
    return Response(body, status=status, mimetype="application/json")


# ---------------------------------------------------------------------------------------------
# the server


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # one line per click would bury the URL; errors are still logged


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RankingServer:
    """The page's server, bound and ready: `url` (with the session token), `serve_forever()`
    until `shutdown()` from another thread (or Ctrl-C), then `close()`."""

    def __init__(
        self,
        responses: Path,
        out: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 8765,
        allow_remote: bool = False,
    ) -> None:
        if not allow_remote and not _is_loopback(host):
            raise UserError(
                f"host {host!r} is not a loopback address; the page would be reachable from "
                "the network (allow it explicitly to do so)"
            )
        tasks = load_tasks(responses)
        self.log = JudgmentLog(out)
        try:
            sock = _listen(host, port)
        except BaseException:
            self.log.close()
            raise
        self.port = sock.getsockname()[1]
        self.token = secrets.token_urlsafe(32)
        names = {"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host}
        remote = allow_remote and not _is_loopback(host)
        hosts = None if remote else {f"{name}:{self.port}" for name in names}
        self.app = RankingApp(tasks, self.log, self.token, secrets.token_hex(8), hosts)
        self._server: BaseWSGIServer = make_server(
            host,
            self.port,
            self.app,
            threaded=True,
            request_handler=_QuietHandler,
            fd=sock.fileno(),
        )
        sock.close()  # the server holds its own duplicate of the socket
        # Ctrl-C must not wait for idle keep-alive connections (a browser tab left open): a
        # judgment is acknowledged only once fsynced, and a torn last line is ignored on restart.
        assert isinstance(self._server, socketserver.ThreadingMixIn)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        url_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        url_host = f"[{url_host}]" if ":" in url_host else url_host
        self.url = f"http://{url_host}:{self.port}/?token={self.token}"

    def serve_forever(self) -> None:
        self._server.serve_forever(poll_interval=0.1)  # returns on Ctrl-C too

    def shutdown(self) -> None:
        self._server.shutdown()

    def close(self) -> None:
        self._server.server_close()
        self.log.close()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        hint = " (choose another port, or 0 for any free one)" if port else ""
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}{hint}") from None
    return sock


def serve(
    responses: Path,
    out: Path,
    host: str = "127.0.0.1",
    port: int = 8765,
    allow_remote: bool = False,
    open_browser: bool = False,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the ranking page for `responses` (responses.jsonl), appending judgments to `out`,
    until Ctrl-C. Prints the page's URL, which carries the session token."""
    server = RankingServer(responses, out, host=host, port=port, allow_remote=allow_remote)
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C stops the server even when started with SIGINT ignored (a background job of
        # a non-interactive shell inherits that, and Python then never raises KeyboardInterrupt).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        state = server.app.progress()
        if server.log.torn:
            print(f"{out}: ignored a torn last line (a judgment never acknowledged)", flush=True)
        if allow_remote and not _is_loopback(host):
            print("warning: the page is reachable from the network over plain HTTP", flush=True)
        print(f"{state['done']} of {state['total']} prompts judged; judgments go to {out}")
        print(f"ranking page: {server.url}  (Ctrl-C to stop)", flush=True)
        if on_ready is not None:
            on_ready(server.url)
        if open_browser:
            webbrowser.open(server.url)
        server.serve_forever()
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------
# the page: every piece of prompt or model text goes in through textContent, never as HTML

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="lmforge-token" content="{{token}}">
<title>lmforge ranking</title>
<style nonce="{{nonce}}">
  body { font: 15px/1.45 system-ui, sans-serif; margin: 0; background: #f5f5f4; color: #1c1917; }
  header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #d6d3d1;
           padding: 8px 16px; display: flex; gap: 16px; align-items: center; flex-wrap: wrap; }
  header progress { width: 200px; }
  main { max-width: 1200px; margin: 0 auto; padding: 16px; }
  .text { white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, monospace;
          font-size: 14px; }
  .msg { background: #fff; border-left: 4px solid #a8a29e; padding: 8px 12px; margin: 6px 0; }
  .msg.user { border-color: #2563eb; } .msg.system { border-color: #9333ea; }
  .msg.assistant { border-color: #16a34a; }
  .role { font-size: 12px; text-transform: uppercase; color: #57534e; }
  .cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr));
           gap: 12px; margin-top: 16px; }
  .card { background: #fff; border: 2px solid #d6d3d1; border-radius: 6px; padding: 10px; }
  .card.ranked { border-color: #2563eb; background: #eff6ff; }
  .card button { width: 100%; margin-bottom: 8px; }
  button { font: inherit; padding: 4px 10px; cursor: pointer; }
  .controls { display: flex; gap: 8px; margin-top: 16px; flex-wrap: wrap; }
  .mode { font-weight: 600; } #status.error { color: #b91c1c; }
  .meta, .help { color: #57534e; font-size: 13px; }
</style>
</head>
<body>
<header>
  <strong>lmforge ranking</strong>
  <progress id="progress" value="0" max="1"></progress>
  <span id="count">…</span>
  <span class="mode" id="mode"></span>
  <span id="status" role="status"></span>
</header>
<main>
  <div id="task"></div>
  <div class="controls">
    <button id="rank-mode" type="button">Rank mode (r)</button>
    <button id="submit" type="button">Submit ranking (Enter)</button>
    <button id="tie" type="button">Tie (t)</button>
    <button id="skip" type="button">Skip (s)</button>
  </div>
  <p class="help">Pick the best with 1–4 or its button. Rank mode (r): click or press the
  responses best first, Enter submits (all ranked submits at once), Backspace undoes.
  t: all equally good; s: skip. Judgments go to {{out}}.</p>
</main>
<script nonce="{{nonce}}">
"use strict";
const TOKEN = document.querySelector('meta[name="lmforge-token"]').content;
const ROLES = ["system", "user", "assistant"];
let task = null, order = [], rankMode = false, busy = false;
const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = String(text);  // text, never HTML
  return e;
}

async function api(method, path, body) {
  const r = await fetch(path, {
    method, cache: "no-store",
    headers: {"{{token_header}}": TOKEN, "Content-Type": "application/json"},
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.error || ("HTTP " + r.status));
  return data;
}

function setStatus(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function show(state) {
  task = state.task;
  order = [];
  $("progress").max = Math.max(state.total, 1);
  $("progress").value = state.done;
  $("count").textContent = state.done + " / " + state.total;
  render();
}

function render() {
  const root = $("task");
  root.replaceChildren();
  $("mode").textContent = rankMode ? "mode: rank (best first)" : "mode: pick best";
  $("rank-mode").textContent = rankMode ? "Pick-best mode (r)" : "Rank mode (r)";
  for (const id of ["rank-mode", "submit", "tie", "skip"]) $(id).disabled = busy || !task;
  if (!task) {
    root.append(el("p", "finished", "All prompts are judged. You can close this tab."));
    return;
  }
  $("submit").disabled = busy || !rankMode || order.length === 0;
  root.append(el("div", "meta", "prompt id: " + task.id));
  const prompt = el("section", "prompt");
  for (const m of task.messages) {
    const msg = el("div", "msg " + (ROLES.includes(m.role) ? m.role : "other"));
    msg.append(el("div", "role", m.role), el("div", "text", m.content));
    prompt.append(msg);
  }
  const cards = el("section", "cards");
  task.responses.forEach((text, i) => {
    const rank = order.indexOf(i);
    const card = el("article", rank >= 0 ? "card ranked" : "card");
    card.dataset.index = String(i);
    let label = "Best (" + (i + 1) + ")";
    if (rankMode && rank >= 0) label = "#" + (rank + 1) + " (click to unrank)";
    else if (rankMode) label = "Rank next (" + (i + 1) + ")";
    const button = el("button", "pick", label);
    button.type = "button";
    button.id = "pick-" + i;
    button.disabled = busy;
    button.addEventListener("click", () => choose(i));
    card.append(button, el("div", "text response", text));
    cards.append(card);
  });
  root.append(prompt, cards);
}

function choose(i) {
  if (busy || !task || i >= task.responses.length) return;
  if (!rankMode) return submit({ranking: [i]});
  const at = order.indexOf(i);
  if (at >= 0) order = order.slice(0, at);
  else order.push(i);
  if (order.length === task.responses.length) return submit({ranking: order});
  render();
}

async function submit(judgment) {
  if (busy || !task) return;
  busy = true;
  render();
  setStatus("saving…", false);
  try {
    const body = {id: task.id, ranking: [], tie: false, skip: false, ...judgment};
    const state = await api("POST", "/api/judge", body);
    busy = false;
    setStatus(state.written ? "saved" : "already judged", false);
    show(state);
  } catch (e) {
    busy = false;
    setStatus("not saved: " + e.message, true);
    render();
  }
}

document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
  const k = e.key;
  if (k >= "1" && k <= "4") choose(Number(k) - 1);
  else if (k === "r") { rankMode = !rankMode; order = []; render(); }
  else if (k === "t") submit({tie: true});
  else if (k === "s") submit({skip: true});
  else if (k === "Enter" && rankMode && order.length) submit({ranking: order});
  else if (k === "Backspace" && rankMode) { order.pop(); render(); }
  else if (k === "Escape") { order = []; render(); }
  else return;
  e.preventDefault();
});
$("rank-mode").addEventListener("click", () => { rankMode = !rankMode; order = []; render(); });
$("submit").addEventListener("click", () => { if (order.length) submit({ranking: order}); });
$("tie").addEventListener("click", () => submit({tie: true}));
$("skip").addEventListener("click", () => submit({skip: true}));

api("GET", "/api/next").then(show, (e) => setStatus("cannot load: " + e.message, true));
</script>
</body>
</html>
"""
