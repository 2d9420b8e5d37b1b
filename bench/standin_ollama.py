#!/usr/bin/env python3
"""A fast stand-in for Ollama's HTTP API, the upstream of simple_api_proxy in the benchmark.

It answers what the proxy asks of Ollama: POST /api/chat (a chunked NDJSON stream, or one JSON
object for "stream": false, as Ollama does), POST /api/show, GET /api/version and GET /api/tags.
Every chat reply is the same: `tokens` tokens of text, one every `delay_ms` milliseconds.

It is built to be cheap, since a client talking to it directly is the benchmark's floor: one
asyncio thread, and replies without a delay are encoded once per model and leave in one write.
HTTP/1.1 keep-alive is honoured unless the request says `Connection: close`.

    python3 bench/standin_ollama.py --port 11434 --tokens 100 --delay-ms 5

The reply can be changed while it runs, by POST /bench/config with any of
{"tokens": 100, "delay_ms": 5, "stamp": true, "parallel": 4}; the new settings apply to requests
that arrive afterwards. With parallel > 0, like Ollama's OLLAMA_NUM_PARALLEL on a GPU, at most that
many timed replies are generated at once and the others wait, before any byte, for their turn. With stamp on, each streamed token is its own send time (time.monotonic_ns(), the
system-wide CLOCK_MONOTONIC, so comparable across processes on one machine) and a client can
measure how long each chunk took to reach it.

Importable too: `await StandinOllama(tokens=100).start("127.0.0.1", 0)` returns the asyncio server.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import signal
import sys
import time

DEFAULT_MODEL = "qwen2.5-coder:7b"
TOKEN = " tok"  # one token of reply text; clients count tokens as words
CREATED_AT = "2026-01-01T00:00:00.000000000Z"
PROMPT_EVAL_COUNT = 26
MAX_HEAD_BYTES = 65536


@dataclasses.dataclass(frozen=True)
class ReplySettings:
    tokens: int = 100
    delay_ms: float = 0.0
    stamp: bool = False
    parallel: int = 0  # timed replies generated at once; 0: no limit

    def checked(self):
        if not isinstance(self.tokens, int) or isinstance(self.tokens, bool) or self.tokens < 1:
            raise ValueError("tokens must be a positive integer")
        if not isinstance(self.delay_ms, (int, float)) or isinstance(self.delay_ms, bool) or self.delay_ms < 0:
            raise ValueError("delay_ms must be a number >= 0")
        if not isinstance(self.stamp, bool):
            raise ValueError("stamp must be true or false")
        if not isinstance(self.parallel, int) or isinstance(self.parallel, bool) or self.parallel < 0:
            raise ValueError("parallel must be an integer >= 0")
        return self


def compact_json(value):
    return json.dumps(value, separators=(",", ":")).encode()


def as_chunk(data):
    """One HTTP/1.1 chunk: Ollama flushes every NDJSON line as its own chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def response_head(status, content_type, keep_alive, content_length=None):
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 501: "Not Implemented"}.get(status, "Error")
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}"]
    lines.append("Transfer-Encoding: chunked" if content_length is None else f"Content-Length: {content_length}")
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class EncodedReplies:
    """Every byte of a chat reply for one model and token count, made once and reused."""

    def __init__(self, model, tokens):
        self.model = model
        self.tokens = tokens
        model_json = json.dumps(model)
        # A token line is this prefix, the token text (JSON-safe: letters, digits, spaces) and the suffix.
        self.token_prefix = ('{"model":%s,"created_at":"%s","message":{"role":"assistant","content":"'
                             % (model_json, CREATED_AT)).encode()
        self.token_suffix = b'"},"done":false}\n'
        final = {"model": model, "created_at": CREATED_AT, "message": {"role": "assistant", "content": ""},
                 "done": True, "done_reason": "stop", "total_duration": 1, "load_duration": 1,
                 "prompt_eval_count": PROMPT_EVAL_COUNT, "prompt_eval_duration": 1,
                 "eval_count": tokens, "eval_duration": 1}
        self.end_of_stream = as_chunk(compact_json(final) + b"\n") + b"0\r\n\r\n"
        self.plain_token_chunk = self.token_chunk(TOKEN)
        stream_body = self.plain_token_chunk * tokens + self.end_of_stream
        whole = dict(final, message={"role": "assistant", "content": TOKEN * tokens})
        single_body = compact_json(whole)
        self.stream = {keep: response_head(200, "application/x-ndjson", keep) + stream_body
                       for keep in (True, False)}
        self.single = {keep: response_head(200, "application/json; charset=utf-8", keep, len(single_body))
                       + single_body for keep in (True, False)}

    def token_chunk(self, text):
        return as_chunk(self.token_prefix + text.encode() + self.token_suffix)


class StandinOllama:
    """The server: reply settings, the encoded replies, and one OllamaConnection per client."""

    def __init__(self, tokens=100, delay_ms=0.0, stamp=False, parallel=0):
        self.settings = ReplySettings(tokens, delay_ms, stamp, parallel).checked()
        self._encoded = {}
        self.generating = 0
        self.waiting = collections.deque()  # replies waiting for a generation slot

    def admit(self, begin):
        """Call begin() now, or when a generation ends if `parallel` are under way."""
        parallel = self.settings.parallel
        if parallel and self.generating >= parallel:
            self.waiting.append(begin)
            return
        self.generating += 1
        begin()

    def generation_over(self):
        self.generating -= 1
        parallel = self.settings.parallel
        while self.waiting and (not parallel or self.generating < parallel):
            self.generating += 1
            self.waiting.popleft()()

    def configure(self, changes):
        self.settings = dataclasses.replace(self.settings, **changes).checked()
        return dataclasses.asdict(self.settings)

    def encoded(self, model, tokens):
        replies = self._encoded.get((model, tokens))
        if replies is None:
            replies = self._encoded[(model, tokens)] = EncodedReplies(model, tokens)
        return replies

    async def start(self, host="127.0.0.1", port=0):
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: OllamaConnection(self), host, port, backlog=1024)


class OllamaConnection(asyncio.Protocol):
    """One client connection: requests are answered in order, one at a time."""

    def __init__(self, standin):
        self.standin = standin
        self.loop = asyncio.get_running_loop()
        self.transport = None
        self.buffer = bytearray()
        self.head = None  # (method, path, headers, body offset) of a request whose body is still arriving
        self.busy = False  # a reply is still being sent; later requests wait in the buffer
        self.closed = False
        self.timer = None
        self.generating = False  # holds one of the stand-in's generation slots

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        self.end_generation()

    def end_generation(self):
        if self.generating:
            self.generating = False
            self.standin.generation_over()

    def data_received(self, data):
        self.buffer += data
        if not self.busy:
            self.answer_waiting_requests()

    # -- requests ------------------------------------------------------------------
    def answer_waiting_requests(self):
        while not self.busy and not self.closed:
            request = self.next_request()
            if request is None:
                return
            self.route(*request)

    def next_request(self):
        """(method, path, body, keep_alive) of the next complete request in the buffer, or None."""
        if self.head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD_BYTES:
                    self.fail(400, "request head too large")
                return None
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                self.fail(400, "malformed request line")
                return None
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self.fail(501, "chunked request bodies are not supported by the stand-in")
                return None
            self.head = (parts[0], parts[1], parts[2], headers, end + 4)
        method, target, version, headers, body_start = self.head
        length = int(headers.get("content-length") or 0)
        if len(self.buffer) < body_start + length:
            return None
        body = bytes(self.buffer[body_start:body_start + length])
        del self.buffer[:body_start + length]
        self.head = None
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        return method, target.split("?", 1)[0], body, keep_alive

    def route(self, method, path, body, keep_alive):
        handler = ROUTES.get((method, path))
        if handler is None:
            self.send_json(404, {"error": f"{method} {path} not found"}, keep_alive)
        else:
            handler(self, body, keep_alive)

    # -- replies -----------------------------------------------------------------------
    def send(self, data, keep_alive):
        self.transport.write(data)
        if not keep_alive:
            self.transport.close()
            self.closed = True

    def send_json(self, status, value, keep_alive):
        body = compact_json(value)
        self.send(response_head(status, "application/json; charset=utf-8", keep_alive, len(body)) + body,
                  keep_alive)

    def fail(self, status, message):
        self.send_json(status, {"error": message}, keep_alive=False)

    def version(self, body, keep_alive):
        self.send_json(200, {"version": "0.12.6"}, keep_alive)

    def tags(self, body, keep_alive):
        models = [{"name": DEFAULT_MODEL, "model": DEFAULT_MODEL, "modified_at": CREATED_AT, "size": 4683087332,
                   "digest": "dae161e27b0e90dd1856c8bb3209201fd6736d8eb66298e75ed87571486f4364",
                   "details": {"format": "gguf", "family": "qwen2", "parameter_size": "7.6B",
                               "quantization_level": "Q4_K_M"}}]
        self.send_json(200, {"models": models}, keep_alive)

    def show(self, body, keep_alive):
        self.send_json(200, {"capabilities": ["completion", "tools"], "details": {"family": "qwen2"}}, keep_alive)

    def bench_config(self, body, keep_alive):
        try:
            settings = self.standin.configure(json.loads(body or b"{}"))
        except (ValueError, TypeError) as exc:
            return self.send_json(400, {"error": str(exc)}, keep_alive)
        self.send_json(200, settings, keep_alive)

    def chat(self, body, keep_alive):
        try:
            request = json.loads(body)
        except ValueError:
            return self.send_json(400, {"error": "request body is not JSON"}, keep_alive)
        settings = self.standin.settings
        replies = self.standin.encoded(request.get("model") or DEFAULT_MODEL, settings.tokens)
        streamed = request.get("stream", True) is not False  # Ollama streams unless told not to
        if settings.delay_ms == 0 and not (streamed and settings.stamp):
            return self.send((replies.stream if streamed else replies.single)[keep_alive], keep_alive)
        self.busy = True
        self.standin.admit(lambda: self.generate(replies, settings, streamed, keep_alive))

    def generate(self, replies, settings, streamed, keep_alive):
        self.generating = True
        if self.closed:
            return self.end_generation()
        if not streamed:
            self.timer = self.loop.call_later(settings.tokens * settings.delay_ms / 1000,
                                              self.finish_single, replies, keep_alive)
            return
        self.transport.write(response_head(200, "application/x-ndjson", keep_alive))
        TokenStream(self, replies, settings, keep_alive).start()

    def finish_single(self, replies, keep_alive):
        self.timer = None
        self.end_generation()
        self.reply_done(replies.single[keep_alive], keep_alive)

    def reply_done(self, data, keep_alive):
        self.busy = False
        self.send(data, keep_alive)
        if keep_alive:
            self.answer_waiting_requests()


class TokenStream:
    """A streamed chat reply whose tokens leave on a schedule: token i at start + (i + 1) * delay.

    The schedule is absolute, so a late event loop sends the overdue tokens together instead of
    letting the delays add up; that keeps the floor's total at tokens x delay."""

    def __init__(self, connection, replies, settings, keep_alive):
        self.connection = connection
        self.replies = replies
        self.delay = settings.delay_ms / 1000
        self.stamp = settings.stamp
        self.keep_alive = keep_alive
        self.started = connection.loop.time()
        self.sent = 0

    def start(self):
        self.connection.timer = self.connection.loop.call_at(self.started + self.delay, self.send_due)

    def send_due(self):
        connection = self.connection
        connection.timer = None
        if connection.closed:
            return
        total = self.replies.tokens
        due = total if self.delay == 0 else int((connection.loop.time() - self.started) / self.delay)
        # A timer may fire a hair early; it was set for the next token, so that one is due.
        due = min(total, max(due, self.sent + 1))
        chunks = []
        while self.sent < due:
            chunks.append(self.replies.token_chunk(f" {time.monotonic_ns()}") if self.stamp
                          else self.replies.plain_token_chunk)
            self.sent += 1
        if self.sent < total:
            connection.transport.write(b"".join(chunks))
            connection.timer = connection.loop.call_at(self.started + (self.sent + 1) * self.delay, self.send_due)
            return
        connection.end_generation()
        connection.reply_done(b"".join(chunks) + self.replies.end_of_stream, self.keep_alive)


ROUTES = {
    ("POST", "/api/chat"): OllamaConnection.chat,
    ("POST", "/api/show"): OllamaConnection.show,
    ("GET", "/api/version"): OllamaConnection.version,
    ("GET", "/api/tags"): OllamaConnection.tags,
    ("POST", "/bench/config"): OllamaConnection.bench_config,
}


async def serve(standin, host, port):
    server = await standin.start(host, port)
    bound = server.sockets[0].getsockname()
    print(f"standin_ollama listening on http://{bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port (printed on stdout)")
    parser.add_argument("--tokens", type=int, default=100, help="tokens in every chat reply")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="milliseconds before each token")
    parser.add_argument("--stamp", action="store_true", help="streamed tokens carry their send time in ns")
    parser.add_argument("--parallel", type=int, default=0,
                        help="timed replies generated at once, the rest wait (OLLAMA_NUM_PARALLEL); 0: no limit")
    args = parser.parse_args(argv)
    try:
        standin = StandinOllama(args.tokens, args.delay_ms, args.stamp, args.parallel)
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(serve(standin, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
