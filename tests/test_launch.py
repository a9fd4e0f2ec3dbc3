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
    result = subprocess.run(
        [sys.executable, "-c", LAUNCH, str(tmp_path / "dest"), str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "dialled", result.stderr
