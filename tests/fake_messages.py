"""A small fake of the Anthropic Messages API on 127.0.0.1 for the Claude proposer's tests.

It serves ``POST /v1/messages`` from a script of replies, in order, and records every
request (headers and JSON body). A scripted reply is either a list of content blocks (a
200 message with ``stop_reason`` tool_use or end_turn and the given usage) or an ``Error``
(a status code with the API's error body, an error code in it if given, and a
``retry-after-ms`` header, so the SDK's retries are fast, with any other headers) or a ``Hang`` (no answer: the client's timeout). Past the end of the script it answers 500 and the test fails loudly.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 409: "conflict_error", 429: "rate_limit_error",
               500: "api_error", 529: "overloaded_error"}


@dataclass
class Error:
    status: int
    message: str = "scripted error"
    code: str | None = None  # error.details.error_code, which newer SDKs map to a subclass (a spend limit's)
    headers: dict = field(default_factory=dict)  # sent besides retry-after-ms


@dataclass
class Hang:
    seconds: float  # answer nothing for this long (past the client's timeout), then drop the request


@dataclass
class Reply:
    content: list  # content blocks
    usage: dict = field(default_factory=lambda: {"input_tokens": 1000, "output_tokens": 200,
                                                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 5000})
    stop_reason: str | None = None  # default: tool_use if any block is one, else end_turn


def tool(name: str, tool_input, id_: str | None = None) -> dict:
    tool.counter = getattr(tool, "counter", 0) + 1
    return {"type": "tool_use", "id": id_ or f"toolu_{tool.counter:04d}", "name": name, "input": tool_input}


def text(s: str) -> dict:
    return {"type": "text", "text": s}


class FakeMessagesAPI:
    def __init__(self):
        self.script: list = []
        self.requests: list[dict] = []  # {"headers": {...}, "body": {...}}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                server.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                        "body": body})
                item = server.script.pop(0) if server.script else Error(500, "the fake's script ran out")
                if isinstance(item, Hang):
                    time.sleep(item.seconds)
                    self.close_connection = True
                    return
                if isinstance(item, Error):
                    error = {"type": ERROR_TYPES.get(item.status, "api_error"), "message": item.message}
                    if item.code:
                        error["details"] = {"error_code": item.code}
                    payload = {"type": "error", "error": error}
                    self._send(item.status, payload, {"retry-after-ms": "1", **item.headers})
                    return
                stop = item.stop_reason or ("tool_use" if any(b.get("type") == "tool_use" for b in item.content)
                                            else "end_turn")
                n = len(server.requests)
                self._send(200, {"id": f"msg_{n:04d}", "type": "message", "role": "assistant",
                                 "model": body.get("model", "?"), "content": item.content, "stop_reason": stop,
                                 "stop_sequence": None, "usage": item.usage}, {})

            def _send(self, status, payload, headers):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
