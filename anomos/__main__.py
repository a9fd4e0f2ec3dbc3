"""Entry point of the ``anomos`` command.

gevent's monkey-patching happens here and in the test runner only, never when
the library is imported, so embedding applications keep control of it.
"""

from anomos.entrypoints import patch_all

patch_all()

import sys  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from anomos.cli import run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
