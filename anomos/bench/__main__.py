"""``python -m anomos.bench node ...``: a benchmark worker peer (see :mod:`anomos.bench.node`).

gevent's monkey-patching happens here, as in :mod:`anomos.__main__`, before
anything imports sockets.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from anomos.bench.node import main as node_main

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "node":
        sys.stderr.write("usage: python -m anomos.bench node --state DIR --host IP [...]\n")
        return 2
    return node_main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
