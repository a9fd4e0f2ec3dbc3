"""The daemon's web page in a real headless browser, and its defences over raw HTTP.

Debian's chromium, driven by chromedriver through selenium, opens the page of a
real `anomos daemon` process in a LocalNetwork (tracker, relays, seeder): it
adds a torrent by file upload, sees it finish, pauses and resumes it, opens its
files, meets the magnet and file-selection answers of the RPC, sees the
neighbourhood drawn, shows a stranger's hostile torrent name as text, and
removes a torrent. Raw HTTP checks the Host-header check (DNS rebinding), the
security headers, authentication and the bound on event streams.

ANOMOS_WEBUI_SCREENSHOT=PATH copies the screenshot the test takes there
(docs/webui.png is made so).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest_daemon import SIZE, DaemonProc, new_daemon, wait_for

from anomos.daemon.web import MAX_EVENT_STREAMS, host_allowed
from anomos.localnet import LocalNetwork
from anomos.torrent.magnet import Magnet
from anomos.torrent.metainfo import Metainfo, make_metainfo

pytestmark = [pytest.mark.slow, pytest.mark.integration]

#: A name a stranger may give a torrent: it must show as text, never become markup.
HOSTILE_NAME = '<img src=x onerror="document.title=1">&amp;.bin'


def chromium() -> tuple[str, str]:
    """The chromium and chromedriver programs; skipped (not as root: CI installs them)."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    why = "needs Debian's chromium and chromium-driver (python3 dev.py test installs them as root)"
    if os.geteuid() == 0:
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def daemon(
    network: tuple[LocalNetwork, Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[DaemonProc, str]]:
    """One daemon (no authentication) and its web page URL."""
    net, _, _ = network
    proc = new_daemon(net, tmp_path_factory.mktemp("webui") / "home")
    url = proc.start()
    web = json.loads((proc.state_dir / "rpc.json").read_text())["web"]
    assert web == url.replace("/transmission/rpc", "/web/")
    assert f"web page at {web}" in proc.log()
    try:
        yield proc, web
    finally:
        assert proc.stop() == 0, proc.log()
    assert "Traceback" not in proc.log()


@pytest.mark.parametrize(
    ("host", "served"),
    [
        ("127.0.0.1:9091", True),
        ("127.0.0.2", True),
        ("[::1]:9091", True),
        ("LOCALHOST.:9091", True),
        ("", True),  # no Host: not a browser
        ("evil.example:9091", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.nip.io:9091", False),
        ("[::1", False),
        ("::1", True),
    ],
)
def test_host_names_a_rebinding_page_could_send_are_refused(host: str, served: bool) -> None:
    assert host_allowed(host, auth_required=False) is served
    assert host_allowed(host, auth_required=True)  # a foreign page has no password


def request(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=20)
    try:
        conn.request(method, parts.path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_a_foreign_host_header_is_refused_and_the_page_is_locked_down(
    daemon: tuple[DaemonProc, str],
) -> None:
    proc, web = daemon
    port = urllib.parse.urlsplit(web).port
    rpc = web.replace("/web/", "/transmission/rpc")
    get = json.dumps({"method": "session-get"}).encode()
    # A DNS-rebinding page: its own name in Host, the daemon's address underneath.
    for host in (f"evil.example:{port}", "attacker.test", f"localhost.evil.example:{port}"):
        for url, method, body in ((web, "GET", b""), (rpc, "POST", get)):
            code, headers, reply = request(url, method, {"Host": host}, body)
            assert code == 421, (host, url, code, reply)
            assert b"not a loopback name" in reply
            assert "X-Transmission-Session-Id" not in headers  # no handshake for it
    # Loopback names and IP literals are served; the page allows no foreign code or framing.
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        code, headers, page = request(web, headers={"Host": host})
        assert code == 200 and b'<script src="app.js"' in page, (host, code)
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert headers["X-Frame-Options"] == "DENY"
    assert request(rpc, "POST", {"Host": f"localhost:{port}"}, get)[0] == 409
    code, headers, script = request(web + "app.js")
    assert code == 200 and headers["Content-Type"].startswith("text/javascript")
    assert b"innerHTML" not in script  # text from strangers goes in as textContent
    assert request(web + "../../etc/passwd")[0] == 404
    assert request(web, "POST", body=b"x")[0] == 405
    assert request(web + "events", "HEAD")[0] == 405  # (a stream nobody reads)

    # The event stream: one JSON document per event.
    parts = urllib.parse.urlsplit(web)
    event = json.loads(_first_event(web))
    assert {"torrents", "session", "neighbourhood"} <= set(event)

    # Event streams are bounded, and a client that stops reading loses its stream:
    # as many clients as the bound, each with a tiny receive window and never
    # reading, hold every stream only for a few events.
    stalled: list[socket.socket] = []

    def stall() -> bool:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        sock.settimeout(20)
        sock.connect((parts.hostname, parts.port))
        sock.sendall(f"GET /web/events HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
        if sock.recv(12) != b"HTTP/1.1 200":  # (an earlier stream not yet seen closed)
            sock.close()
            return False
        stalled.append(sock)  # and never read again
        return len(stalled) == MAX_EVENT_STREAMS

    try:
        wait_for("every stream taken by a stalled reader", stall, 20, proc.log)
        code, _, reply = request(web + "events")
        assert code == 503 and b"event streams" in reply
        taken = time.monotonic()
        wait_for("a stalled reader's stream closed", lambda: _first_event(web), 40, proc.log)
        assert time.monotonic() - taken > 1  # (they were held: the bound is real)
        assert "reads too slowly" in proc.log()
    finally:
        for sock in stalled:
            sock.close()


def _first_event(web: str) -> bytes:
    """The data of the first event of a new stream (b"" if the stream is refused)."""
    parts = urllib.parse.urlsplit(web)
    with socket.create_connection((parts.hostname, parts.port), timeout=20) as sock:
        sock.sendall(f"GET /web/events HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
        data = b""
        while b"\ndata: " not in data or b"}\n\n" not in data[data.index(b"\ndata: ") :]:
            chunk = sock.recv(65536)
            data += chunk
            if not chunk or data.startswith(b"HTTP/1.1 503"):
                return b""
        assert data.startswith(b"HTTP/1.1 200") and b"text/event-stream" in data, data[:300]
        body = data[data.index(b"\ndata: ") + 7 :]
        return body[: body.index(b"}\n\n") + 1]


def test_the_page_needs_the_rpc_credentials_when_they_are_set(
    network: tuple[LocalNetwork, Path, Path], tmp_path: Path
) -> None:
    net, _, _ = network
    proc = new_daemon(net, tmp_path / "home", **{"rpc-username": "bob", "rpc-password": "pw"})
    url = proc.start()
    web = url.replace("/transmission/rpc", "/web/")
    try:
        good = {"Authorization": "Basic " + base64.b64encode(b"bob:pw").decode()}
        wrong = {"Authorization": "Basic " + base64.b64encode(b"bob:guess").decode()}
        for path in ("", "app.js", "events"):
            assert request(web + path)[0] == 401
            assert request(web + path, headers=wrong)[0] == 401
        code, headers, _ = request(web, headers=good)
        assert code == 200 and "Content-Security-Policy" in headers
    finally:
        assert proc.stop() == 0, proc.log()


# ---------------------------------------------------------------------------- the browser


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    program, driver_program = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = program
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1200",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    service = Service(executable_path=driver_program, log_output=str(tmp_path / "driver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_adds_a_torrent_sees_it_finish_pauses_resumes_and_draws_the_neighbours(
    network: tuple[LocalNetwork, Path, Path],
    daemon: tuple[DaemonProc, str],
    browser: Any,
    tmp_path: Path,
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    net, atorrent, data = network
    proc, web = daemon

    def page(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
        def tolerant() -> Any:
            try:
                return check()
            except StaleElementReferenceException:  # a row redrawn by the next event
                return None

        return wait_for(what, tolerant, timeout, lambda: proc.log()[-3000:])

    def row(tid: int) -> Any:
        found = browser.find_elements(By.ID, f"torrent-{tid}")
        return found[0] if found else None

    def click(tid: int, css: str) -> None:
        page(f"{css} clicked", lambda: row(tid).find_element(By.CSS_SELECTOR, css).click() or 1)

    def message() -> str:
        return str(browser.find_element(By.ID, "message").text)

    browser.get(web)
    page("the event stream live", lambda: browser.find_element(By.ID, "connection").text == "live")
    assert browser.find_element(By.ID, "empty").is_displayed()

    # Add by file upload, then watch it finish in the list.
    browser.find_element(By.ID, "file").send_keys(str(atorrent))
    browser.find_element(By.ID, "add-file-button").click()
    page("added", lambda: message().startswith("added: "))
    seeding = page(
        "seeding at 100 %",
        lambda: (
            (r := row(1)) is not None
            and r.get_attribute("data-status") == "6"
            and r.get_attribute("data-percent") == "1"
            and r
        ),
    )
    assert seeding.find_element(By.CSS_SELECTOR, "td.name button").text == data.name
    assert "100%" in seeding.find_element(By.CSS_SELECTOR, "td.done").text
    assert (proc.home / "downloads" / data.name).read_bytes() == data.read_bytes()

    # Pause and resume from the page.
    click(1, "button.pause")
    page("paused", lambda: row(1).get_attribute("data-status") == "0")
    assert "Stopped" in row(1).find_element(By.CSS_SELECTOR, "td.state").text
    click(1, "button.resume")
    page("seeding again", lambda: row(1).get_attribute("data-status") == "6")

    # The neighbourhood: this peer and its neighbours by NID, links drawn.
    nodes = page(
        "neighbours drawn",
        lambda: browser.find_elements(By.CSS_SELECTOR, "#neighbourhood g.node:not(.down)"),
    )
    nids = {n.get_attribute("data-nid") for n in nodes}
    assert all(nid and nid.isdigit() for nid in nids), nids
    # Live per-link figures: the download crossed this peer's links.
    assert sum(int(n.get_attribute("data-bytes")) for n in nodes) > SIZE
    assert all(int(n.get_attribute("data-relayed")) >= 0 for n in nodes)
    assert any(f"NID {nid}" in browser.find_element(By.ID, "neighbourhood").text for nid in nids)
    assert browser.find_elements(By.CSS_SELECTOR, "#neighbourhood line.link")
    assert "127.0.0." not in browser.find_element(By.TAG_NAME, "body").text  # never an address

    # A magnet goes to torrent-add as its file name; a BitTorrent one is refused, shown.
    browser.find_element(By.ID, "magnet").send_keys("magnet:?xt=urn:btih:not-a-hash")
    browser.find_element(By.ID, "add-magnet-button").click()
    page("the magnet refused", lambda: message().startswith("torrent-add: "))
    assert "error" in browser.find_element(By.ID, "message").get_attribute("class")
    browser.find_element(By.ID, "magnet").clear()

    # Details: the files with check boxes; applying a selection shows the RPC's answer.
    click(1, "button.open-detail")
    page("details shown", lambda: browser.find_element(By.ID, "detail-name").text == data.name)
    boxes = browser.find_elements(By.CSS_SELECTOR, "#file-rows input.wanted")
    assert len(boxes) == 1 and boxes[0].is_selected()
    browser.find_element(By.ID, "apply-files").click()
    page("the selection applied", lambda: message() == "file selection applied")

    # A stranger's hostile name is shown as text and never becomes markup.
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / HOSTILE_NAME).write_bytes(os.urandom(1000))
    meta = make_metainfo(
        hostile / HOSTILE_NAME,
        trackers=[net.tracker_url],
        fingerprint=net.fingerprint,
        progress=False,
    )
    hostile_atorrent = tmp_path / "hostile.atorrent"
    meta.save(hostile_atorrent)
    browser.find_element(By.ID, "add-paused").click()
    browser.find_element(By.ID, "file").send_keys(str(hostile_atorrent))
    browser.find_element(By.ID, "add-file-button").click()
    shown = page("the hostile name listed", lambda: (r := row(2)) and r.text)
    assert HOSTILE_NAME in shown
    assert not browser.find_elements(By.CSS_SELECTOR, "#torrents img")
    assert browser.title == "anomos"

    time.sleep(1.5)  # (one more event, so the picture shows the latest figures)
    shot = tmp_path / "webui.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("ANOMOS_WEBUI_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["ANOMOS_WEBUI_SCREENSHOT"])

    # Remove (after a confirmation) the hostile one.
    click(2, "button.remove")
    browser.switch_to.alert.accept()
    page("removed", lambda: row(2) is None)
    assert row(1) is not None

    # The same torrent again, from its anomos magnet pasted into the page: removed with
    # its data first, it comes back by metadata from a source and a whole download.
    click(1, "button.remove")
    browser.switch_to.alert.accept()
    page("the first removed", lambda: row(1) is None)
    (proc.home / "downloads" / data.name).unlink()
    magnet = str(Magnet.from_metainfo(Metainfo.load(atorrent)))
    browser.find_element(By.ID, "add-paused").click()  # (ticked above: untick)
    browser.find_element(By.ID, "magnet").send_keys(magnet)
    browser.find_element(By.ID, "add-magnet-button").click()
    page(
        "the magnet's download seeding at 100 %",
        lambda: (
            (r := row(3)) is not None
            and r.get_attribute("data-status") == "6"
            and r.get_attribute("data-percent") == "1"
        ),
        120,
    )
    assert (proc.home / "downloads" / data.name).read_bytes() == data.read_bytes()
