"""The ranking page: a real browser judges prompts end to end; the HTTP guards (token, Host,
Origin, paths, bodies); at most one durable record per prompt, under concurrency and SIGKILL."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from lmforge.errors import UserError
from lmforge.feedback.ranking_page import TOKEN_HEADER, JudgmentLog, RankingServer, load_tasks
from tests.conftest import fails

XSS = [
    "<script>window.__xss = 1; alert(1)</script>",
    '<img src=x onerror="window.__xss = 2; alert(2)">',
]


def task(i: int, k: int = 2, responses: list[str] | None = None) -> dict[str, Any]:
    return {
        "id": f"p{i}",
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"What is {i} plus 1?"},
        ],
        "responses": responses or [f"{i + 1 + j}" for j in range(k)],
        "task": "arithmetic",
    }


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


@contextmanager
def running(responses: Path, out: Path, **kw: Any) -> Iterator[RankingServer]:
    server = RankingServer(responses, out, port=0, **kw)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(5)
        server.close()


def call(*args: Any, **kwargs: Any) -> tuple[int, Any]:
    """(status, decoded body) of one `request`."""
    status, data, _ = request(*args, **kwargs)
    return status, data


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, http.client.HTTPMessage]:
    """One HTTP request with exactly the headers given (Host defaults to the right one):
    status, body (decoded when JSON) and response headers."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    headers = {"Host": f"127.0.0.1:{port}", **(headers or {})}
    if body is not None:
        headers.setdefault("Content-Type", "application/json")
        headers["Content-Length"] = str(len(body))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    is_json = resp.getheader("Content-Type", "").startswith("application/json")
    return resp.status, json.loads(data) if is_json else data, resp.headers


def judge(port: int, token: str, pid: str, **judgment: Any) -> tuple[int, Any]:
    body = {"id": pid, "ranking": [], "tie": False, "skip": False, **judgment}
    return call(port, "POST", "/api/judge", body, {TOKEN_HEADER: token})


# ---------------------------------------------------------------------------------------------
# input validation


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": "a", "responses": ["x", "y"]}, ":2: field 'messages': missing"),
        (
            {"id": "a", "messages": [{"role": "user"}], "responses": ["x", "y"]},
            ":2: field 'messages[0].content': expected a string",
        ),
        (
            {"id": "a", "messages": [{"role": "user", "content": "q"}]},
            ":2: field 'responses': missing",
        ),
        ({**task(9), "responses": ["only one"]}, ":2: field 'responses': has 1; "),
        ({**task(9), "responses": list("abcde")}, ":2: field 'responses': has 5; "),
        (
            {**task(9), "responses": ["x", 7]},
            ":2: field 'responses[1]': expected a string, got int",
        ),
        ({**task(9), "id": 3}, ":2: field 'id'"),
        (task(0), ":2: field 'id': 'p0' repeats line 1"),
    ],
)
def test_load_tasks_names_file_line_and_field(
    tmp_path: Path, record: dict[str, Any], message: str
) -> None:
    path = write_jsonl(tmp_path / "responses.jsonl", [task(0), record])
    with pytest.raises(UserError, match=re.escape(f"responses.jsonl{message}")):
        load_tasks(path)


def test_server_refuses_a_network_bind_unless_allowed_and_a_second_writer(tmp_path: Path) -> None:
    responses = write_jsonl(tmp_path / "r.jsonl", [task(0)])
    with pytest.raises(UserError, match="not a loopback address"):
        RankingServer(responses, tmp_path / "out.jsonl", host="0.0.0.0", port=0)
    with running(responses, tmp_path / "out.jsonl") as server:
        with pytest.raises(UserError, match="another ranking page is writing"):
            RankingServer(responses, tmp_path / "out.jsonl", port=0)
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{server.port}"):
            RankingServer(responses, tmp_path / "other.jsonl", port=server.port)


def test_a_network_bind_needs_the_flag_and_then_still_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    responses = write_jsonl(tmp_path / "r.jsonl", [task(0)])
    out = tmp_path / "out.jsonl"
    err = fails(capsys, "label", "--serve", str(responses), "--out", str(out), "--host", "0.0.0.0")
    assert "not a loopback address" in err and not out.exists()
    with running(responses, out, host="0.0.0.0", allow_remote=True) as server:
        port, token = server.port, server.token
        remote = {"Host": f"192.0.2.7:{port}"}  # any Host: the page is meant for the network
        assert call(port, "GET", "/api/next", headers=remote)[0] == 403
        assert call(port, "GET", "/", headers=remote)[0] == 403
        assert call(port, "GET", "/?token=wrong", headers=remote)[0] == 403
        assert judge(port, "", "p0", ranking=[0])[0] == 403
        assert call(port, "GET", "/api/next", headers={**remote, TOKEN_HEADER: token})[0] == 200
    assert read_records(out) == []


def test_every_response_forbids_inline_script(tmp_path: Path) -> None:
    responses = write_jsonl(tmp_path / "r.jsonl", [task(0)])
    with running(responses, tmp_path / "out.jsonl") as server:
        port, ok = server.port, {TOKEN_HEADER: server.token}
        answers = [
            request(port, "GET", f"/?token={server.token}"),  # the page: 200
            request(port, "GET", "/api/next", headers=ok),  # 200
            request(port, "GET", "/"),  # 403
            request(port, "GET", "/../etc/passwd", headers=ok),  # 404
            request(port, "PUT", "/api/judge", b"{}", ok),  # 405
            request(port, "POST", "/api/judge", b"{", ok),  # 400
            request(port, "POST", "/api/judge", b"x" * 70_000, ok),  # 413
        ]
    assert [a[0] for a in answers] == [200, 200, 403, 404, 405, 400, 413]
    for status, _, headers in answers:
        csp = {d.split()[0]: d.split()[1:] for d in headers["Content-Security-Policy"].split(";")}
        scripts = csp.get("script-src", csp["default-src"])
        # nothing, or only the page's nonce: never 'unsafe-inline', a host or a scheme
        assert scripts == ["'none'"] or (len(scripts) == 1 and scripts[0].startswith("'nonce-"))
        assert csp["frame-ancestors"] == ["'none'"], status


def test_log_ignores_a_torn_last_line_and_writes_each_id_once(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "ranking": [0]}\n{"id": "b", "rank')
    log = JudgmentLog(out)
    assert log.judged == {"a"} and log.torn
    assert log.append({"id": "b", "ranking": [1]}) and not log.append({"id": "b", "ranking": [0]})
    log.close()
    assert [r["id"] for r in read_records(out)] == ["a", "b"]
    out.write_text('{"id": "a"}\n{"id": "b"}')  # whole, only its newline missing: kept
    log = JudgmentLog(out)
    assert log.judged == {"a", "b"} and not log.torn
    log.close()
    out.write_text('{"id": "a"}\n{"id": "b\n{"id": "c"}\n')
    with pytest.raises(UserError, match="out.jsonl:2: invalid JSON"):
        JudgmentLog(out)


# ---------------------------------------------------------------------------------------------
# HTTP guards


def test_token_host_and_origin_are_checked(tmp_path: Path) -> None:
    responses = write_jsonl(tmp_path / "r.jsonl", [task(0), task(1)])
    with running(responses, tmp_path / "out.jsonl") as server:
        port, token = server.port, server.token
        ok = {TOKEN_HEADER: token}
        assert call(port, "GET", f"/?token={token}")[0] == 200
        assert call(port, "GET", "/api/next", headers=ok)[1]["task"]["id"] == "p0"
        forbidden = [
            call(port, "GET", "/"),
            call(port, "GET", "/?token=wrong"),
            call(port, "GET", "/api/next"),
            call(port, "GET", f"/api/next?token={token}"),  # the API wants the header
            judge(port, "", "p0", ranking=[0]),
            judge(port, token[:-1] + "x", "p0", ranking=[0]),
            call(port, "GET", f"/?token={token}", headers={"Host": f"evil.example:{port}"}),
            call(port, "GET", f"/?token={token}", headers={"Host": "127.0.0.1:1"}),
            call(port, "GET", "/api/next", headers={**ok, "Host": "attacker.localhost"}),
        ]
        body = {"id": "p0", "ranking": [0]}
        for origin in ("http://evil.example", "null", f"http://127.0.0.1:{port + 1}"):
            forbidden.append(call(port, "POST", "/api/judge", body, {**ok, "Origin": origin}))
        assert [status for status, _ in forbidden] == [403] * len(forbidden)
        same_origin = {**ok, "Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"}
        status, state = call(port, "POST", "/api/judge", body, same_origin)
        assert status == 200 and state["written"] and state["done"] == 1
    assert [r["id"] for r in read_records(tmp_path / "out.jsonl")] == ["p0"]


def test_paths_and_bodies_are_refused(tmp_path: Path) -> None:
    responses = write_jsonl(tmp_path / "r.jsonl", [task(0, k=3)])
    (tmp_path / "secret.txt").write_text("secret")
    with running(responses, tmp_path / "out.jsonl") as server:
        port, ok = server.port, {TOKEN_HEADER: server.token}
        for path in [
            "/../secret.txt",
            "/../../../../etc/passwd",
            "/%2e%2e/%2e%2e/etc/passwd",
            "/..%2f..%2fetc%2fpasswd",
            "/static/..%2F..%2Fsecret.txt",
            f"/{tmp_path}/secret.txt",
            "/etc/passwd",
            "//etc/passwd",
            "/api/../../etc/passwd",
            "/favicon.ico",
        ]:
            status, data = call(port, "GET", f"{path}?token={server.token}", headers=ok)
            assert status == 404, path
            assert b"secret" not in json.dumps(data).encode()
        big = b'{"id": "p0", "ranking": [0], "pad": "' + b"x" * 70_000 + b'"}'
        bad: list[tuple[bytes | dict[str, Any], dict[str, str], int]] = [
            (big, ok, 413),
            (b'{"id": "p0", "ranking": [0', ok, 400),
            (b"\xff\xfe", ok, 400),
            (b"[" * 60_000, ok, 400),  # nested past the parser's recursion limit
            (b'{"id": "p0", "ranking": [' + b"9" * 5000 + b"]}", ok, 400),
            (b'{"id": "\\ud800", "ranking": [0]}', ok, 400),
            (b"[1, 2]", ok, 400),
            ({"id": "p0", "ranking": [0]}, {**ok, "Content-Type": "text/plain"}, 415),
            ({"id": "nope", "ranking": [0]}, ok, 400),
            ({"id": "p0", "ranking": [3]}, ok, 400),
            ({"id": "p0", "ranking": [0, 0]}, ok, 400),
            ({"id": "p0", "ranking": ["0"]}, ok, 400),
            ({"id": "p0", "ranking": [True]}, ok, 400),
            ({"id": "p0", "ranking": []}, ok, 400),
            ({"id": "p0", "ranking": [1], "tie": True}, ok, 400),
            ({"id": "p0", "tie": True, "skip": True}, ok, 400),
            ({"id": "p0", "tie": "yes"}, ok, 400),
            ({"id": "p0", "ranking": [0], "extra": 1}, ok, 400),
        ]
        for body, headers, want in bad:
            assert call(port, "POST", "/api/judge", body, headers)[0] == want, body
        assert call(port, "PUT", "/api/judge", b"{}", ok)[0] == 405
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # no length: chunked
        chunks = iter([b'{"id": "p0", "ranking": [0], "pad": "', b"x" * 70_000, b'"}'])
        headers = {**ok, "Content-Type": "application/json"}
        conn.request("POST", "/api/judge", chunks, headers, encode_chunked=True)
        assert conn.getresponse().status == 413
        conn.close()
        assert call(port, "GET", "/api/next", headers=ok)[1]["done"] == 0
        assert judge(port, server.token, "p0", skip=True)[0] == 200
    (rec,) = read_records(tmp_path / "out.jsonl")
    assert rec["skip"] and rec["ranking"] == [] and not rec["tie"]


def test_concurrent_submissions_persist_each_prompt_exactly_once(tmp_path: Path) -> None:
    """50 prompts judged at once, each twice (with different judgments): all 50 are written,
    each exactly once, and every request is answered."""
    responses = write_jsonl(tmp_path / "r.jsonl", [task(i, k=3) for i in range(50)])
    out = tmp_path / "out.jsonl"
    with running(responses, out) as server:
        results: list[tuple[int, Any]] = [(0, None)] * 100
        barrier = threading.Barrier(100)

        def submit(n: int) -> None:
            barrier.wait()
            results[n] = judge(server.port, server.token, f"p{n % 50}", ranking=[n % 3])

        threads = [threading.Thread(target=submit, args=(n,)) for n in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [status for status, _ in results] == [200] * 100
        assert sum(data["written"] for _, data in results) == 50
        final = call(server.port, "GET", "/api/next", headers={TOKEN_HEADER: server.token})[1]
        assert final == {"task": None, "done": 50, "total": 50}
    records = read_records(out)
    assert sorted(r["id"] for r in records) == sorted(f"p{i}" for i in range(50))


# ---------------------------------------------------------------------------------------------
# durability across SIGKILL and restart

SERVE = (
    "import sys; from pathlib import Path; from lmforge.feedback.ranking_page import serve; "
    "serve(Path(sys.argv[1]), Path(sys.argv[2]), port=0)"
)


@contextmanager
def subprocess_server(responses: Path, out: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(responses), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        while not lines or not lines[-1].startswith("ranking page: "):
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line, f"server exited: {proc.communicate()[1]}"
            lines.append(line)
        yield proc, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def url_parts(banner: str) -> tuple[int, str]:
    url = urlsplit(re.search(r"ranking page: (\S+)", banner)[1])  # type: ignore[index]
    return url.port or 0, parse_qs(url.query)["token"][0]


def test_sigkill_loses_nothing_acknowledged_and_a_restart_continues(tmp_path: Path) -> None:
    responses = write_jsonl(tmp_path / "r.jsonl", [task(i, k=3) for i in range(5)])
    out = tmp_path / "out.jsonl"
    with subprocess_server(responses, out) as (proc, banner):
        assert "0 of 5 prompts judged" in banner
        port, token = url_parts(banner)
        for i, ranking in enumerate([[2, 0, 1], [1], [0, 2]]):
            status, data = judge(port, token, f"p{i}", ranking=ranking)
            assert status == 200 and data["written"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    records = read_records(out)
    assert [(r["id"], r["ranking"]) for r in records] == [
        ("p0", [2, 0, 1]),
        ("p1", [1]),
        ("p2", [0, 2]),
    ]
    with out.open("ab") as f:
        f.write(b'{"id": "p3", "prompt": [{"role": "us')  # a write cut short by a crash
    with subprocess_server(responses, out) as (proc, banner):
        assert "ignored a torn last line" in banner and "3 of 5 prompts judged" in banner
        port, token = url_parts(banner)
        state = call(port, "GET", "/api/next", headers={TOKEN_HEADER: token})[1]
        assert (state["task"]["id"], state["done"]) == ("p3", 3)
        assert judge(port, token, "p1", tie=True)[1]["written"] is False  # already judged
        assert judge(port, token, "p3", tie=True)[1]["done"] == 4
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop
        assert proc.wait(10) == 0
    records = read_records(out)
    assert [r["id"] for r in records] == ["p0", "p1", "p2", "p3"]
    assert records[3]["tie"] and records[3]["ranking"] == []


# ---------------------------------------------------------------------------------------------
# a real browser

# Counts dialogs instead of showing them, installed before any page script runs.
NO_DIALOGS = (
    "window.__dialogs = 0; for (const f of ['alert', 'confirm', 'prompt']) "
    "window[f] = () => { window.__dialogs += 1; };"
)


def chromium() -> Any:
    """Headless Debian Chromium through its own chromedriver (never a downloaded browser)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert binary and driver, (
        "the browser test needs Chromium: apt-get install chromium chromium-driver (.ci/run does)"
    )
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.set_capability("unhandledPromptBehavior", "ignore")
    browser = webdriver.Chrome(options=opts, service=Service(driver))
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": NO_DIALOGS})
    return browser


def test_browser_judges_prompts_end_to_end_and_shows_model_output_as_text(tmp_path: Path) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tasks = [task(0, responses=["1", *XSS]), task(1), task(2, k=4), task(3), task(4)]
    tasks[0]["messages"][1]["content"] = "<b>bold?</b> & <script>window.__xss = 3</script>"
    responses = write_jsonl(tmp_path / "r.jsonl", tasks)
    out = tmp_path / "out.jsonl"
    with running(responses, out) as server:
        browser = chromium()
        try:
            wait = WebDriverWait(browser, 10)

            def progress(text: str) -> None:
                wait.until(lambda b: b.find_element(By.ID, "count").text == text)

            def shown_id() -> str:
                return str(browser.find_element(By.CSS_SELECTOR, ".meta").text)

            def keys(*k: str) -> None:
                ActionChains(browser).send_keys(*k).perform()

            def click(element_id: str) -> None:
                browser.find_element(By.ID, element_id).click()

            browser.get(server.url)
            progress("0 / 5")
            assert shown_id() == "prompt id: p0"
            texts = browser.find_elements(By.CSS_SELECTOR, ".response")
            assert [e.get_property("textContent") for e in texts] == ["1", *XSS]
            user = browser.find_elements(By.CSS_SELECTOR, ".msg .text")[1]
            assert user.get_property("textContent") == tasks[0]["messages"][1]["content"]
            assert browser.find_elements(By.CSS_SELECTOR, "#task img, #task script, #task b") == []
            assert browser.execute_script("return [window.__xss, window.__dialogs]") == [None, 0]

            keys("2")  # pick best: response 2
            progress("1 / 5")
            assert shown_id() == "prompt id: p1"
            click("rank-mode")  # rank in click order: mouse, then keyboard; all ranked submits
            click("pick-1")
            assert "#1" in browser.find_element(By.ID, "pick-1").text
            keys("1")
            progress("2 / 5")
            click("pick-3")  # a ranked prefix of four, with one undo
            keys("2", "\ue003", "1", "\ue007")  # 2, Backspace, 1, Enter
            progress("3 / 5")

            browser.refresh()  # judged prompts are not shown again
            progress("3 / 5")
            assert shown_id() == "prompt id: p3"
            keys("t")
            progress("4 / 5")
            click("skip")
            progress("5 / 5")
            assert "All prompts are judged" in browser.find_element(By.ID, "task").text
            assert browser.execute_script("return [window.__xss, window.__dialogs]") == [None, 0]
            with pytest.raises(NoAlertPresentException):
                browser.switch_to.alert  # noqa: B018 - the property raises when no dialog is open
        finally:
            browser.quit()
    records = read_records(out)
    judged = [(r["id"], r["ranking"], r["tie"], r["skip"]) for r in records]
    assert judged == [
        ("p0", [1], False, False),
        ("p1", [1, 0], False, False),
        ("p2", [3, 0], False, False),
        ("p3", [], True, False),
        ("p4", [], False, True),
    ]
    first = records[0]
    assert set(first) == {
        "id",
        "prompt",
        "responses",
        "ranking",
        "tie",
        "skip",
        "annotator",
        "time",
    }
    assert first["prompt"] == tasks[0]["messages"] and first["responses"] == tasks[0]["responses"]
    assert first["annotator"]["kind"] == "human"
    assert len({r["annotator"]["session"] for r in records}) == 1
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["time"]) for r in records)
