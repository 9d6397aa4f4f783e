"""A scripted model server on loopback for the adapter contract suite: a tool call writing a file, then an answer.

It answers, well enough for the real CLIs:

- Anthropic Messages (`POST /v1/messages`, streaming SSE or not, and `count_tokens`) — Claude Code;
- OpenAI Responses (`POST /v1/responses`, SSE) — Codex;
- OpenAI Chat Completions (`POST /v1/chat/completions`, SSE or not) — aider (edit format `whole`);
- Gemini (`POST /v1beta/models/M:generateContent` and `:streamGenerateContent?alt=sse`, `:countTokens`) — Gemini CLI.

The script, per conversation: if the request offers a tool that can write files and carries no tool
result yet, answer with one call of that tool creating FILE_NAME; otherwise answer with FINAL_TEXT.
A test that sets `state.shell_commands` gets shell tool calls instead: the conversation's k-th
request (k tool results so far) calls the CLI's shell tool with the k-th command, then FINAL_TEXT.
A test that sets `state.tool_calls` (Anthropic only) gets its (tool name, input) calls the same way,
e.g. an MCP tool (`mcp__corral__run`, tests/test_mcp.py).
Side requests (titles, routing, next-speaker checks) get text or a JSON object shaped by their schema.
Every request is recorded in `requests`. The server also refuses CONNECT (point HTTPS_PROXY at it to
catch a CLI that tries to leave the machine: those land in `leaks`).

Run by hand: `python tests/helpers/model_server.py [PORT]` prints the base URL and serves until Ctrl-C.
"""

import contextlib
import json
import re
import sys
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FILE_NAME = "hello.txt"
FILE_TEXT = "hello from corral\n"
FINAL_TEXT = f"Created {FILE_NAME}."
USAGE_IN = 120
USAGE_OUT = 30
CWD_PATTERNS = (
    re.compile(r"Working directory: (/[^\s\"\\<]+)"),
    re.compile(r"<cwd>(/[^<]+)</cwd>"),
    re.compile(r"working in the directory:? [`'\"]?(/[^\s`'\"\\]+)"),
    re.compile(r"(/[^\s\"'\\<>]*/worktrees/[a-z0-9]{8})"),
)


@dataclass
class Recorded:
    method: str
    path: str
    body: Any


@dataclass
class ScriptState:
    requests: list[Recorded] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    # Requests the script could not serve as intended (a body it cannot read, no file-writing tool
    # where one was expected): a test reports these instead of timing out on a missing file.
    unserved: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: int = 0
    hold_until: threading.Event | None = None  # set by a test: the first tool-offering request waits for it
    held: threading.Event = field(default_factory=threading.Event)
    # Set by a test: shell commands to call one per round trip, in order (tests/test_shell_policy.py).
    shell_commands: list[str] | None = None
    # Set by a test: (tool name, input) calls to make one per round trip, in order (tests/test_mcp.py).
    tool_calls: list[tuple[str, dict[str, Any]]] | None = None

    def next_id(self) -> int:
        with self.lock:
            self.counter += 1
            return self.counter


def find_cwd(body: Any) -> str | None:
    """The agent's working directory as its CLI tells the model (system prompt or environment context)."""
    text = json.dumps(body)
    for pattern in CWD_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1).rstrip(".,;:")
    return None


def target_path(body: Any) -> str:
    cwd = find_cwd(body)
    return f"{cwd}/{FILE_NAME}" if cwd else FILE_NAME


def shell_line() -> str:
    return f"printf '{FILE_TEXT.strip()}\\n' > {FILE_NAME}"


def json_for_schema(schema: Any) -> Any:
    """A small value that satisfies a JSON schema well enough for a CLI's side request."""
    if not isinstance(schema, dict):
        return "scripted"
    if schema.get("enum"):
        return schema["enum"][0]
    kind = str(schema.get("type", "object")).lower()
    if kind == "object":
        return {name: json_for_schema(sub) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        return []
    if kind in ("number", "integer"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return False
    return "scripted"


# --- Anthropic Messages ------------------------------------------------------------------------


def anthropic_reply(
    body: dict[str, Any],
    n: int,
    shell: list[str] | None = None,
    calls: list[tuple[str, dict[str, Any]]] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The whole message and its content blocks."""
    tools = {t.get("name") for t in body.get("tools") or []}
    results = sum(
        1
        for message in body.get("messages") or []
        if isinstance(message.get("content"), list)
        for block in message["content"]
        if isinstance(block, dict) and block.get("type") == "tool_result"
    )
    answered = results > 0
    blocks: list[dict[str, Any]]
    if calls is not None and results < len(calls) and calls[results][0] in tools:
        name, arguments = calls[results]
        blocks = [{"type": "tool_use", "id": f"toolu_{n:04d}", "name": name, "input": arguments}]
        stop = "tool_use"
    elif calls is not None:
        blocks = [{"type": "text", "text": FINAL_TEXT}]
        stop = "end_turn"
    elif shell is not None and "Bash" in tools and results < len(shell):
        command = shell[results]
        blocks = [{"type": "tool_use", "id": f"toolu_{n:04d}", "name": "Bash", "input": {"command": command}}]
        stop = "tool_use"
    elif shell is not None:
        blocks = [{"type": "text", "text": FINAL_TEXT}]
        stop = "end_turn"
    elif "Write" in tools and not answered:
        blocks = [
            {"type": "text", "text": f"I will create {FILE_NAME}."},
            {
                "type": "tool_use",
                "id": f"toolu_{n:04d}",
                "name": "Write",
                "input": {"file_path": target_path(body), "content": FILE_TEXT},
            },
        ]
        stop = "tool_use"
    elif "Bash" in tools and not answered:
        blocks = [{"type": "tool_use", "id": f"toolu_{n:04d}", "name": "Bash", "input": {"command": shell_line()}}]
        stop = "tool_use"
    else:
        blocks = [{"type": "text", "text": FINAL_TEXT}]
        stop = "end_turn"
    message = {
        "id": f"msg_{n:04d}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "claude-sonnet-4-5"),
        "content": blocks,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": USAGE_IN,
            "output_tokens": USAGE_OUT,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }
    return message, blocks


def anthropic_events(message: dict[str, Any], blocks: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    start = {**message, "content": [], "stop_reason": None, "usage": {**message["usage"], "output_tokens": 1}}
    events: list[tuple[str, dict[str, Any]]] = [("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(blocks):
        if block["type"] == "text":
            events.append(
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
                )
            )
            delta = {"type": "text_delta", "text": block["text"]}
        else:
            opened = {**block, "input": {}}
            events.append(
                ("content_block_start", {"type": "content_block_start", "index": index, "content_block": opened})
            )
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        events.append(("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    events.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": USAGE_OUT},
            },
        )
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return events


# --- OpenAI Responses --------------------------------------------------------------------------


SERVED_CALL = re.compile(r"^call_\d{4,}$")  # the call ids this server hands out


def responses_tools(tools: Any) -> dict[str, dict[str, Any]]:
    """Every tool a Responses request offers, by name: top-level ones, Chat-style `function.name`
    ones and those grouped inside `namespace` tools (Codex groups some tools that way)."""
    found: dict[str, dict[str, Any]] = {}
    for tool in tools if isinstance(tools, list) else []:
        if not isinstance(tool, dict):
            continue
        if isinstance(tool.get("tools"), list):
            found.update(responses_tools(tool["tools"]))
        function = tool.get("function") if isinstance(tool.get("function"), dict) else {}
        name = tool.get("name") or function.get("name") or tool.get("type")
        if name:
            found.setdefault(str(name), tool)
    return found


def responses_answered(body: dict[str, Any]) -> bool:
    """Whether the conversation already carries the result of a call this server made. A CLI may put
    call outputs of its own into a first request (context it gathered itself); those do not count."""
    items = body.get("input") if isinstance(body.get("input"), list) else []
    return any(
        isinstance(item, dict)
        and str(item.get("type", "")).endswith("call_output")
        and SERVED_CALL.match(str(item.get("call_id", "")))
        for item in items
    )


def responses_shell_call(tools: dict[str, dict[str, Any]], n: int, command: str) -> list[dict[str, Any]]:
    """A call of whichever shell tool the request offers, running `command`."""
    for name, args in (
        ("shell_command", {"command": command}),
        ("exec_command", {"cmd": command}),
        ("shell", {"command": ["bash", "-lc", command]}),
    ):
        if name in tools:
            return [
                {
                    "type": "function_call",
                    "id": f"fc_{n}",
                    "call_id": f"call_{n:04d}",
                    "name": name,
                    "arguments": json.dumps(args),
                    "status": "completed",
                }
            ]
    return []


def responses_results(body: dict[str, Any]) -> int:
    """How many results of calls this server made the conversation carries."""
    found = body.get("input")
    items: list[Any] = found if isinstance(found, list) else []
    return sum(
        1
        for item in items
        if isinstance(item, dict)
        and str(item.get("type", "")).endswith("call_output")
        and SERVED_CALL.match(str(item.get("call_id", ""))) is not None
    )


def responses_output(
    body: dict[str, Any], n: int, unserved: list[str] | None = None, shell: list[str] | None = None
) -> list[dict[str, Any]]:
    tools = responses_tools(body.get("tools"))
    answered = responses_answered(body)
    call_id = f"call_{n:04d}"
    if shell is not None and tools:
        done = responses_results(body)
        called = responses_shell_call(tools, n, shell[done]) if done < len(shell) else []
        if called:
            return called
        answered = True  # the script is done: the final answer
    if not answered and tools and unserved is not None and not WRITING_TOOLS.intersection(tools):
        unserved.append(f"request {n}: none of {sorted(WRITING_TOOLS)} among the tools offered: {sorted(tools)}")
    if not answered:
        patch = f"*** Begin Patch\n*** Add File: {FILE_NAME}\n+{FILE_TEXT.strip()}\n*** End Patch\n"
        if tools.get("apply_patch", {}).get("type") == "custom":
            return [
                {
                    "type": "custom_tool_call",
                    "id": f"ctc_{n}",
                    "call_id": call_id,
                    "name": "apply_patch",
                    "input": patch,
                    "status": "completed",
                }
            ]
        if "apply_patch" in tools:
            arguments = json.dumps({"input": patch})
            return [
                {
                    "type": "function_call",
                    "id": f"fc_{n}",
                    "call_id": call_id,
                    "name": "apply_patch",
                    "arguments": arguments,
                    "status": "completed",
                }
            ]
        for name, args in (
            ("shell_command", {"command": shell_line()}),
            ("exec_command", {"cmd": shell_line()}),
            ("shell", {"command": ["bash", "-lc", shell_line()]}),
        ):
            if name in tools:
                return [
                    {
                        "type": "function_call",
                        "id": f"fc_{n}",
                        "call_id": call_id,
                        "name": name,
                        "arguments": json.dumps(args),
                        "status": "completed",
                    }
                ]
    text = FINAL_TEXT
    if (body.get("text") or {}).get("format", {}).get("type") == "json_schema":
        text = json.dumps(json_for_schema(body["text"]["format"].get("schema")))
    return [
        {
            "type": "message",
            "id": f"msg_{n}",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
    ]


WRITING_TOOLS = frozenset({"apply_patch", "shell_command", "exec_command", "shell"})


def responses_usage() -> dict[str, Any]:
    return {
        "input_tokens": USAGE_IN,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": USAGE_OUT,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": USAGE_IN + USAGE_OUT,
    }


def responses_events(
    body: dict[str, Any], n: int, unserved: list[str] | None = None, shell: list[str] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    response = {"id": f"resp_{n:04d}", "object": "response", "model": body.get("model"), "status": "in_progress"}
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"type": "response.created", "response": response})
    ]
    output = responses_output(body, n, unserved, shell)
    for index, item in enumerate(output):
        events.append(
            ("response.output_item.added", {"type": "response.output_item.added", "output_index": index, "item": item})
        )
        if item["type"] == "message":
            text = item["content"][0]["text"]
            events.append(
                (
                    "response.output_text.delta",
                    {
                        "type": "response.output_text.delta",
                        "item_id": item["id"],
                        "output_index": index,
                        "content_index": 0,
                        "delta": text,
                    },
                )
            )
        events.append(
            ("response.output_item.done", {"type": "response.output_item.done", "output_index": index, "item": item})
        )
    done = {**response, "status": "completed", "output": output, "usage": responses_usage()}
    events.append(("response.completed", {"type": "response.completed", "response": done}))
    return events


# --- OpenAI Chat Completions (aider) ----------------------------------------------------------


def chat_text(body: dict[str, Any], shell: list[str] | None = None) -> str:
    if body.get("tools"):
        return FINAL_TEXT
    if shell is not None:  # aider: shell commands are suggested in a fenced block of the answer
        return f"{FINAL_TEXT}\n\n```bash\n" + "\n".join(shell) + "\n```\n"
    return f"{FINAL_TEXT}\n\n{FILE_NAME}\n```\n{FILE_TEXT}```\n"


def chat_usage() -> dict[str, int]:
    return {"prompt_tokens": USAGE_IN, "completion_tokens": USAGE_OUT, "total_tokens": USAGE_IN + USAGE_OUT}


# --- Gemini ------------------------------------------------------------------------------------


def gemini_reply(body: dict[str, Any], model: str, shell: list[str] | None = None) -> dict[str, Any]:
    declared = {
        str(decl.get("name"))
        for tool in body.get("tools") or []
        for decl in tool.get("functionDeclarations") or tool.get("function_declarations") or []
    }
    results = sum(
        1
        for content in body.get("contents") or []
        for part in content.get("parts") or []
        if "functionResponse" in part or "function_response" in part
    )
    answered = results > 0
    config = body.get("generationConfig") or {}
    parts: list[dict[str, Any]]
    if config.get("responseMimeType") == "application/json":
        schema = config.get("responseJsonSchema") or config.get("responseSchema")
        parts = [{"text": json.dumps(json_for_schema(schema))}]
    elif shell is not None and "run_shell_command" in declared and results < len(shell):
        parts = [{"functionCall": {"name": "run_shell_command", "args": {"command": shell[results]}}}]
    elif shell is not None and declared:
        parts = [{"text": FINAL_TEXT}]
    elif "write_file" in declared and not answered:
        parts = [
            {"functionCall": {"name": "write_file", "args": {"file_path": target_path(body), "content": FILE_TEXT}}}
        ]
    elif "run_shell_command" in declared and not answered:
        parts = [{"functionCall": {"name": "run_shell_command", "args": {"command": shell_line()}}}]
    else:
        parts = [{"text": FINAL_TEXT}]
    return {
        "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {
            "promptTokenCount": USAGE_IN,
            "candidatesTokenCount": USAGE_OUT,
            "totalTokenCount": USAGE_IN + USAGE_OUT,
        },
        "modelVersion": model,
    }


def decode_body(raw: bytes, encoding: str) -> bytes:
    """A request body as sent with Content-Encoding gzip, deflate or zstd (a CLI may compress)."""
    if encoding in ("identity", ""):
        return raw
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompress(raw, 16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompress(raw)
    if encoding == "zstd":
        import zstandard  # dev dependency

        return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    raise ValueError(f"unknown Content-Encoding {encoding!r}")


# --- HTTP --------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "ModelHTTPServer"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_CONNECT(self) -> None:
        self.server.state.leaks.append(self.path)
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        if self.path.startswith("http"):
            self.server.state.leaks.append(self.path)
            self._json({"error": "no network here"}, status=403)
            return
        self.server.state.requests.append(Recorded("GET", self.path, None))
        self._json({"data": [], "models": []})

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        if self.path.startswith("http"):
            self.server.state.leaks.append(self.path)
            self._json({"error": "no network here"}, status=403)
            return
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        state = self.server.state
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        try:
            body: Any = json.loads(decode_body(raw, encoding)) if raw else {}
        except (ValueError, OSError, zlib.error) as exc:
            state.requests.append(Recorded("POST", self.path, None))
            state.unserved.append(f"POST {self.path}: unreadable body ({encoding}, {len(raw)} bytes): {exc}")
            self._json({"error": {"message": f"the scripted model server cannot read this body: {exc}"}}, status=400)
            return
        state.requests.append(Recorded("POST", self.path, body))
        n = state.next_id()
        path = self.path.split("?", 1)[0]
        if path.endswith("/messages/count_tokens"):
            self._json({"input_tokens": USAGE_IN})
        elif path.endswith("/messages"):
            if state.hold_until is not None and body.get("tools") and not state.held.is_set():
                state.held.set()
                state.hold_until.wait(120)
            tooled = bool(body.get("tools"))
            message, blocks = anthropic_reply(
                body, n, state.shell_commands if tooled else None, state.tool_calls if tooled else None
            )
            if body.get("stream"):
                self._sse([(kind, data) for kind, data in anthropic_events(message, blocks)])
            else:
                self._json(message)
        elif path.endswith("/responses"):
            self._sse(responses_events(body, n, state.unserved, state.shell_commands))
        elif path.endswith("/chat/completions"):
            self._chat(body, n)
        elif ":countTokens" in path:
            self._json({"totalTokens": USAGE_IN})
        elif ":streamGenerateContent" in path or ":generateContent" in path:
            model = path.rsplit("/", 1)[-1].split(":", 1)[0]
            reply = gemini_reply(body, model, state.shell_commands)
            if ":stream" in path:
                self._sse([(None, reply)])
            else:
                self._json(reply)
        elif path.endswith("/embeddings"):
            self._json({"data": [{"embedding": [0.0] * 8, "index": 0}], "usage": chat_usage()})
        else:
            self._json({"error": {"message": f"the scripted model server does not serve {path}"}}, status=404)

    def _chat(self, body: dict[str, Any], n: int) -> None:
        text = chat_text(body, self.server.state.shell_commands)
        model = body.get("model", "test-model")
        if not body.get("stream"):
            self._json(
                {
                    "id": f"chatcmpl-{n}",
                    "object": "chat.completion",
                    "created": 0,
                    "model": model,
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                    ],
                    "usage": chat_usage(),
                }
            )
            return
        base = {"id": f"chatcmpl-{n}", "object": "chat.completion.chunk", "created": 0, "model": model}
        chunks: list[tuple[str | None, Any]] = [
            (
                None,
                {
                    **base,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}],
                },
            ),
            (None, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": chat_usage()}),
        ]
        self._sse(chunks, done_marker=True)

    def _json(self, payload: Any, *, status: int = 200) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _sse(self, events: Sequence[tuple[str | None, Any]], *, done_marker: bool = False) -> None:
        parts = []
        for kind, data in events:
            head = f"event: {kind}\n" if kind else ""
            parts.append(f"{head}data: {json.dumps(data)}\n\n")
        if done_marker:
            parts.append("data: [DONE]\n\n")
        payload = "".join(parts).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class ModelHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.state = ScriptState()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ModelServer:
    """The scripted server in a background thread: `with ModelServer() as server: server.url`."""

    def __init__(self, port: int = 0) -> None:
        self.http = ModelHTTPServer(port)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return self.http.url

    @property
    def requests(self) -> list[Recorded]:
        return self.http.state.requests

    @property
    def leaks(self) -> list[str]:
        return self.http.state.leaks

    @property
    def unserved(self) -> list[str]:
        return self.http.state.unserved

    def explain(self) -> str:
        """What the server saw, for a test's failure message."""
        posts = [f"{r.method} {r.path}" for r in self.requests]
        return f"model server: {len(posts)} requests {posts[-8:]}; unserved: {self.unserved or 'none'}"

    def __enter__(self) -> "ModelServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.shutdown()
        self.http.server_close()


if __name__ == "__main__":
    with ModelServer(int(sys.argv[1]) if len(sys.argv) > 1 else 0) as running:
        print(running.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
