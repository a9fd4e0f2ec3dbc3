"""``anomos get`` dials its tracker before it imports the peer's modules."""

import subprocess
import sys
import textwrap

#: Runs ``anomos get`` on a magnet whose tracker is a listening socket of this
#: process; when ``anomos.tracker.client`` is first imported it says whether a TCP
#: connection is already waiting to be accepted (the kernel completes a loopback
#: handshake on its own), then ends the process.
LAUNCH = textwrap.dedent(
    """
    import os, socket, sys
    from anomos.entrypoints import patch_all
    patch_all()
    from gevent.monkey import get_original

    poll = get_original("select", "select")  # waits without letting greenlets run
    tracker = socket.socket()
    tracker.bind(("127.0.0.1", 0))
    tracker.listen()
    port = tracker.getsockname()[1]

    class Watch:
        def find_spec(self, name, path=None, target=None):
            if name == "anomos.tracker.client":
                waiting = bool(poll([tracker], [], [], 10)[0])
                print("dialled" if waiting else "not dialled", flush=True)
                os._exit(0)
            return None

    sys.meta_path.insert(0, Watch())
    from anomos.cli import run

    magnet = (
        "magnet:?xt=urn:anomos:" + "ab" * 20
        + f"&tr=https%3A%2F%2F127.0.0.1%3A{port}%2Fannounce&x.fp=" + "cd" * 32
    )
    run(["get", magnet, "--dest", sys.argv[1], "--state", sys.argv[2]])
    print("never imported", flush=True)
    """
)


def test_get_dials_its_tracker_before_importing_the_peer_modules(tmp_path):
    """Those imports are most of a launch's CPU time; the TCP handshake with the
    tracker completes meanwhile instead of after them."""
    result = _launch(LAUNCH, tmp_path)
    assert result.stdout.strip() == "dialled", result.stderr


#: The same launch, but asks, when the peer starts listening (after its own modules,
#: its identity and its torrent), whether the tracker has the TLS ClientHello yet.
HELLO = LAUNCH.replace(
    "sys.meta_path.insert(0, Watch())",
    textwrap.dedent(
        """
        def watch(frame, event, arg):
            code = frame.f_code
            if event == "call" and code.co_name == "start" and code.co_filename.endswith("node.py"):
                conn, _ = tracker.accept()  # waiting already (the test above)
                sent = bool(poll([conn], [], [], 10)[0]) and bool(conn.recv(1, socket.MSG_PEEK))
                print("hello sent" if sent else "no hello", flush=True)
                print(*sorted(m for m in sys.modules if m in UNNEEDED), flush=True)
                os._exit(0)

        UNNEEDED = {"anomos.peer.portmap", "anomos.tracker.server", "anomos.daemon.core"}
        sys.setprofile(watch)
        """
    ),
)


def test_the_tls_handshake_with_the_tracker_starts_before_the_peer_listens(tmp_path):
    """With the TCP handshake done during the imports, the ClientHello leaves when the
    peer is made; the tracker's answer then arrives while the peer still starts."""
    result = _launch(HELLO, tmp_path)
    assert result.stdout.strip() == "hello sent", result.stderr  # (no module it does not need)


def _launch(script: str, tmp_path) -> subprocess.CompletedProcess[str]:
    """``script`` run as a launch of ``anomos get`` into ``tmp_path``; it must exit 0."""
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "dest"), str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result
