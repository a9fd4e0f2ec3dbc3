"""A small Transmission RPC client for anomos' own commands (add, list, pause, ...).

It does the X-Transmission-Session-Id handshake and basic auth like any remote;
anything the daemon refuses is an :class:`AnomosError` with its ``result`` string.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any

import attrs

from anomos.errors import AnomosError

#: Bytes of an answer read at most (a list of many torrents with files fits).
MAX_REPLY_SIZE = 64 * 1024 * 1024
TIMEOUT = 30.0


@attrs.define
class RpcClient:
    url: str
    username: str = ""
    password: str = attrs.field(default="", repr=False)
    session_id: str = ""

    def call(self, method: str, **arguments: Any) -> dict[str, Any]:
        body = json.dumps({"method": method, "arguments": arguments}).encode()
        for _attempt in range(2):
            request = urllib.request.Request(self.url, data=body, method="POST")
            request.add_header("Content-Type", "application/json")
            request.add_header("X-Transmission-Session-Id", self.session_id)
            if self.username or self.password:
                token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
                request.add_header("Authorization", f"Basic {token}")
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                    reply = json.loads(response.read(MAX_REPLY_SIZE))
                break
            except urllib.error.HTTPError as exc:
                if exc.code == 409:
                    self.session_id = exc.headers.get("X-Transmission-Session-Id", "")
                    continue
                if exc.code == 401:
                    raise AnomosError(
                        f"{self.url}: wrong or missing --auth USER:PASSWORD"
                    ) from None
                raise AnomosError(f"{self.url}: HTTP {exc.code} {exc.reason}") from None
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise AnomosError(
                    f"cannot reach the daemon at {self.url} ({reason}); is `anomos daemon` running?"
                ) from None
            except ValueError:
                raise AnomosError(f"{self.url}: the answer is not JSON") from None
        else:
            raise AnomosError(f"{self.url}: the session id handshake did not settle")
        if not isinstance(reply, dict) or reply.get("result") != "success":
            result = reply.get("result") if isinstance(reply, dict) else reply
            raise AnomosError(f"the daemon refused {method}: {result}")
        arguments_out = reply.get("arguments", {})
        return arguments_out if isinstance(arguments_out, dict) else {}
