"""Minimal JSON-over-HTTP for the server runtimes (standard library only; loopback or remote)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from builder.errors import UserError


class ServerError(UserError):
    """A server that cannot be reached or answers with an error."""

    def __init__(self, message: str, status: int | None = None, body: str = ""):
        super().__init__(message)
        self.status, self.body = status, body


def request_json(url: str, body: dict[str, Any] | None = None, timeout: float = 300.0) -> Any:
    """GET (body None) or POST JSON; the decoded JSON answer. Errors name the URL and status."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            text = response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        text = err.read().decode("utf-8", "replace")
        raise ServerError(f"{url}: HTTP {err.code}: {text[:300]}", err.code, text) from None
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise ServerError(f"{url}: unreachable ({getattr(err, 'reason', err)})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ServerError(
            f"{url}: answered with something that is not JSON: {text[:200]!r}"
        ) from None
