#!/usr/bin/env python3
"""Load generator: N keep-alive HTTP/1.1 connections, each sending one request after another for a
bounded time, and every response parsed and checked.

One asyncio thread drives all connections. A response is read incrementally: the head, then the
body framed by Content-Length, by chunks, or by the connection closing. Three body shapes are
understood: a JSON object (an Anthropic message, or Ollama's "stream": false reply), Ollama's NDJSON
stream and Anthropic's server-sent events. For every request it records when it was sent, its first
byte, its first text and its last byte; each response is checked against an Expectation (status 200,
the x-cache header, the number of tokens in the text, a stream that ends properly) and any mismatch
is counted as an error. With stamped tokens (see standin_ollama.py) it also records how long each
token took from the stand-in's send to this client's receive.

Bounds: every connection stops starting requests when the time is up or after max_requests, and a
request that takes longer than `timeout` seconds is abandoned as an error.

    python3 bench/load.py http://127.0.0.1:8000/v1/messages --connections 16 --seconds 5 \\
        --body '{"model":"claude-opus-5-5","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}' \\
        --tokens 100
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import math
import re
import socket
import sys
import time
import urllib.parse


class ProtocolError(Exception):
    """The server broke HTTP/1.1 or the body's format."""


@dataclasses.dataclass(frozen=True)
class Expectation:
    """What every response must be; anything else counts as an error."""
    tokens: int  # words in the reply text
    stream: bool  # NDJSON or SSE rather than one JSON object
    cache: str | None = None  # the x-cache header every response must carry
    stamped: bool = False  # streamed tokens are send times: record each one's delay


# --- bodies ------------------------------------------------------------------------

class ErrorBody:
    """The body of a response whose status is not 200: kept whole, never interpreted."""

    def __init__(self):
        self.parts = []
        self.first_text = None
        self.text = ""
        self.ended = False

    def feed(self, data, now):
        self.parts.append(data)

    def finish(self, now):
        pass


class JsonBody(ErrorBody):
    """A whole JSON object: an Anthropic message or Ollama's non-streamed reply."""

    def finish(self, now):
        value = json.loads(b"".join(self.parts))
        if not isinstance(value, dict):
            raise ProtocolError("JSON body is not an object")
        if isinstance(value.get("message"), dict):  # Ollama
            self.text = value["message"].get("content") or ""
            self.ended = value.get("done") is True
        else:  # Anthropic
            self.text = "".join(block.get("text", "") for block in value.get("content") or ()
                                if block.get("type") == "text")
            self.ended = value.get("type") == "message" and value.get("stop_reason") is not None
        self.first_text = now


class StreamBody:
    """Common to the two stream shapes: the body split into records, each batch of complete records
    decoded with one json.loads, since per-record Python work is what limits this client at 200
    streams."""

    separator = b"\n"

    def __init__(self, stamped):
        self.stamped = stamped
        self.buffer = bytearray()
        self.pieces = []
        self.first_text = None
        self.delays = []  # ns from the stand-in's send of a stamped token to its arrival here
        self.ended = False

    @property
    def text(self):
        return "".join(self.pieces)

    def feed(self, data, now):
        buffer = self.buffer
        buffer += data
        end = buffer.rfind(self.separator)
        if end < 0:
            return
        complete = bytes(buffer[:end])
        del buffer[:end + len(self.separator)]
        self.records([record for record in complete.split(self.separator) if record], now)

    def finish(self, now):
        if self.buffer.strip():
            raise ProtocolError(f"stream ended inside a record: {bytes(self.buffer[:80])!r}")

    def add_text(self, text, now):
        if self.ended:
            raise ProtocolError("text after the end of the stream")
        if self.first_text is None:
            self.first_text = now
        self.pieces.append(text)
        if self.stamped:
            self.delays.extend([now - int(stamp) for stamp in text.split()])


def json_array(items):
    """Decode a list of JSON texts (bytes) with one call."""
    return json.loads(b"[" + b",".join(items) + b"]")


class NdjsonBody(StreamBody):
    """Ollama's /api/chat stream: one JSON object a line, the last with "done": true."""

    def records(self, lines, now):
        for value in json_array(lines):
            if "error" in value:
                raise ProtocolError(f"stream error: {value['error']}")
            content = value["message"]["content"]
            if content:
                self.add_text(content, now)
            if value["done"]:
                self.ended = True


SSE_EVENT = re.compile(rb"event: ([a-z_]+)\ndata: (\{[^\n]*\})")


class SseBody(StreamBody):
    """Anthropic's event stream: message_start ... message_stop, text in text_delta events."""

    separator = b"\n\n"

    def __init__(self, stamped):
        super().__init__(stamped)
        self.events = []

    def records(self, raws, now):
        names, datas = [], []
        for raw in raws:
            match = SSE_EVENT.fullmatch(raw)
            if match is None:
                raise ProtocolError(f"malformed event: {raw[:80]!r}")
            names.append(match[1].decode())
            datas.append(match[2])
        for name, data in zip(names, json_array(datas), strict=True):
            if data.get("type") != name:
                raise ProtocolError(f"event {name} carries data of type {data.get('type')}")
            self.events.append(name)
            if name == "content_block_delta" and data["delta"]["type"] == "text_delta":
                self.add_text(data["delta"]["text"], now)
            elif name == "message_stop":
                self.ended = True
            elif name == "error":
                raise ProtocolError(f"stream error event: {data['error']}")

    def finish(self, now):
        super().finish(now)
        if not self.events or self.events[0] != "message_start" or self.events[-1] != "message_stop":
            raise ProtocolError(f"events do not run from message_start to message_stop: {self.events[:3]}...")


BODY_KINDS = {"application/json": JsonBody, "application/x-ndjson": NdjsonBody, "text/event-stream": SseBody}


# --- responses ---------------------------------------------------------------------

class Response:
    """One HTTP/1.1 response, parsed as its bytes arrive."""

    def __init__(self, stamped):
        self.stamped = stamped
        self.sent_at = None
        self.first_byte_at = None
        self.ended_at = None
        self.status = None
        self.headers = {}
        self.body = None
        self.complete = False
        self.framing = None  # "length", "chunked" or "close"
        self._raw = bytearray()
        self._left = 0  # bytes still due in this body ("length") or in this chunk ("chunked")
        self._chunk_tail = False  # a chunk's data has been read; its CRLF has not

    @property
    def closes(self):
        return self.headers.get("connection", "").lower() == "close"

    def feed(self, data, now):
        self._raw += data
        if self.status is None and not self._parse_head():
            return
        if self.framing == "length":
            take = bytes(self._raw[:self._left])
            del self._raw[:len(take)]
            self._left -= len(take)
            if take:
                self.body.feed(take, now)
            if not self._left:
                self._finish(now)
        elif self.framing == "chunked":
            self._parse_chunks(now)
        else:
            self.body.feed(bytes(self._raw), now)
            self._raw.clear()

    def connection_closed(self, now):
        """The server closed the connection: the end of a close-delimited body, otherwise an error."""
        if self.framing != "close":
            raise ConnectionError("connection closed before the response was complete")
        self._finish(now)

    def _parse_head(self):
        end = self._raw.find(b"\r\n\r\n")
        if end < 0:
            if len(self._raw) > 65536:
                raise ProtocolError("response head too large")
            return False
        lines = bytes(self._raw[:end]).decode("latin-1").split("\r\n")
        del self._raw[:end + 4]
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
            raise ProtocolError(f"not an HTTP response: {lines[0][:80]!r}")
        self.status = int(rest[:3])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        content_type = self.headers.get("content-type", "").split(";")[0].strip().lower()
        kind = BODY_KINDS.get(content_type) if self.status == 200 else ErrorBody
        if kind is None:
            raise ProtocolError(f"unexpected Content-Type {content_type!r}")
        self.body = kind(self.stamped) if issubclass(kind, StreamBody) else kind()
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self.framing = "chunked"
        elif "content-length" in self.headers:
            self.framing = "length"
            self._left = int(self.headers["content-length"])
        else:
            self.framing = "close"
        return True

    def _parse_chunks(self, now):
        raw = self._raw
        payload = []  # the chunks' data in this read, handed to the body in one piece
        try:
            while not self.complete:
                if self._left:
                    take = bytes(raw[:self._left])
                    del raw[:len(take)]
                    self._left -= len(take)
                    payload.append(take)
                    if self._left:
                        return
                    self._chunk_tail = True
                if self._chunk_tail:
                    if len(raw) < 2:
                        return
                    if raw[:2] != b"\r\n":
                        raise ProtocolError("chunk data not followed by CRLF")
                    del raw[:2]
                    self._chunk_tail = False
                end = raw.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(raw[:end]).split(b";")[0], 16)
                if size == 0:
                    # The last chunk, then optional trailers, then an empty line.
                    finale = raw.find(b"\r\n\r\n", end)
                    if finale < 0:
                        return
                    del raw[:finale + 4]
                    self.body.feed(b"".join(payload), now)
                    payload = []
                    self._finish(now)
                    return
                del raw[:end + 2]
                self._left = size
        finally:
            if payload:
                self.body.feed(b"".join(payload), now)

    def _finish(self, now):
        if self._raw:
            raise ProtocolError(f"{len(self._raw)} bytes after the end of the response")
        self.ended_at = now
        self.body.finish(now)
        self.complete = True

    def problems(self, expect):
        """What is wrong with this response, as short error kinds; empty when it is as expected."""
        if self.status != 200:
            return [f"HTTP {self.status}"]
        found = []
        shape = (NdjsonBody, SseBody) if expect.stream else (JsonBody,)
        if not isinstance(self.body, shape):
            found.append(f"unexpected body {type(self.body).__name__}")
        if expect.cache is not None and self.headers.get("x-cache") != expect.cache:
            found.append(f"x-cache {self.headers.get('x-cache')} (expected {expect.cache})")
        tokens = len(self.body.text.split())
        if tokens != expect.tokens:
            found.append(f"{tokens} tokens (expected {expect.tokens})")
        if not self.body.ended:
            found.append("reply not finished")
        return found


class Connection(asyncio.Protocol):
    """One keep-alive client connection; exchange() sends a request and waits for its whole response."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.transport = None
        self.response = None
        self.waiter = None
        self.open = False

    def connection_made(self, transport):
        self.transport = transport
        self.open = True

    def data_received(self, data):
        now = time.monotonic_ns()
        response = self.response
        if response is None:
            self._fail(ProtocolError(f"{len(data)} bytes arrived while no request was waiting"))
            return
        if response.first_byte_at is None:
            response.first_byte_at = now
        try:
            response.feed(data, now)
        except (ProtocolError, ValueError) as exc:  # ValueError: bad JSON or a bad chunk size
            self._fail(exc if isinstance(exc, ProtocolError) else ProtocolError(f"malformed body: {exc}"))
            return
        if response.complete:
            self.response = None
            self.waiter.set_result(response)

    def connection_lost(self, exc):
        self.open = False
        response = self.response
        if response is None or self.waiter.done():
            return
        self.response = None
        try:
            response.connection_closed(time.monotonic_ns())
        except (ConnectionError, ProtocolError, ValueError) as error:
            self.waiter.set_exception(error)
        else:
            self.waiter.set_result(response)

    def _fail(self, exc):
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self.response = None
        self.transport.abort()

    def _time_out(self, timeout):
        self._fail(TimeoutError(f"no complete response within {timeout:g} s"))

    async def exchange(self, request, stamped, timeout):
        if not self.open:
            raise ConnectionError("the server closed the connection between requests")
        self.response = Response(stamped)
        self.waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, self._time_out, timeout)
        self.response.sent_at = time.monotonic_ns()
        self.transport.write(request)
        try:
            return await self.waiter
        finally:
            timer.cancel()

    def close(self):
        if self.transport is not None:
            self.transport.close()


# --- results -----------------------------------------------------------------------

def percentile(sorted_values, fraction):
    """Nearest-rank percentile of an ascending list; None when it is empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def distribution_ms(values_ns):
    """Median, p90, p99 and max of nanosecond durations, in milliseconds."""
    values = sorted(values_ns)
    figures = {name: percentile(values, fraction) for name, fraction in
               (("median", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))}
    return {name: None if value is None else value / 1e6 for name, value in figures.items()}


@dataclasses.dataclass
class LoadResult:
    """Every measured request of one run (or of several runs merged); warm-up requests are not in it."""
    connections: int
    seconds: float = 0.0  # measured wall time
    total: list = dataclasses.field(default_factory=list)  # ns per good request
    first_byte: list = dataclasses.field(default_factory=list)
    first_text: list = dataclasses.field(default_factory=list)
    chunk_delays: list = dataclasses.field(default_factory=list)
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    reconnects: int = 0

    @classmethod
    def merged(cls, results):
        merged = cls(results[0].connections)
        for result in results:
            merged.seconds += result.seconds
            merged.total += result.total
            merged.first_byte += result.first_byte
            merged.first_text += result.first_text
            merged.chunk_delays += result.chunk_delays
            merged.errors += result.errors
            merged.reconnects += result.reconnects
        return merged

    def add(self, response):
        self.total.append(response.ended_at - response.sent_at)
        self.first_byte.append(response.first_byte_at - response.sent_at)
        self.first_text.append(response.body.first_text - response.sent_at)
        self.chunk_delays.extend(getattr(response.body, "delays", ()))

    def summary(self):
        good = len(self.total)
        return {
            "connections": self.connections,
            "requests": good,
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
            "reconnects": self.reconnects,
            "seconds": self.seconds,
            "rps": good / self.seconds if self.seconds > 0 else 0.0,
            "total_ms": distribution_ms(self.total),
            "first_byte_ms": distribution_ms(self.first_byte),
            "first_text_ms": distribution_ms(self.first_text),
            "chunk_delay_ms": distribution_ms(self.chunk_delays),
        }


# --- the load loop -----------------------------------------------------------------

async def connect(host, port):
    loop = asyncio.get_running_loop()
    _, connection = await loop.create_connection(Connection, host, port)
    return connection


class Driver:
    """The connections of one run and their request loops."""

    def __init__(self, host, port, make_request, expect, timeout):
        self.host = host
        self.port = port
        self.make_request = make_request  # () -> the bytes of the next request
        self.expect = expect
        self.timeout = timeout

    async def one(self, connection, result):
        """One exchange on the connection, recorded in result (None: warm-up); returns the connection
        to use next, a new one if this one failed or was closed."""
        try:
            response = await connection.exchange(self.make_request(), self.expect.stamped, self.timeout)
        except (ConnectionError, TimeoutError, ProtocolError, OSError) as exc:
            if result is not None:
                result.errors[type(exc).__name__ + ": " + str(exc)[:100]] += 1
            return await self.reconnect(connection, result)
        problems = response.problems(self.expect)
        if result is not None:
            if problems:
                result.errors.update(problems)
            else:
                result.add(response)
        if response.closes or not connection.open:
            return await self.reconnect(connection, result)
        return connection

    async def reconnect(self, connection, result):
        connection.close()
        if result is not None:
            result.reconnects += 1
        return await connect(self.host, self.port)

    async def warm_up(self, connection, requests):
        for _ in range(requests):
            connection = await self.one(connection, None)
        return connection

    async def measure(self, connection, result, stop_at, max_requests):
        for _ in range(max_requests):
            if time.monotonic_ns() >= stop_at:
                break
            connection = await self.one(connection, result)
        connection.close()


async def run_load(host, port, make_request, expect, *, connections=1, seconds=3.0, warmup=1,
                   max_requests=100_000, timeout=30.0, meters=()):
    """Open the connections, warm each up with `warmup` requests, then keep all of them busy for
    `seconds`; meters (objects with start() and stop()) bracket exactly the measured part."""
    driver = Driver(host, port, make_request, expect, timeout)
    opened = await asyncio.gather(*(connect(host, port) for _ in range(connections)))
    ready = await asyncio.gather(*(driver.warm_up(connection, warmup) for connection in opened))
    result = LoadResult(connections)
    for meter in meters:
        meter.start()
    started = time.monotonic_ns()
    stop_at = started + int(seconds * 1e9)
    await asyncio.gather(*(driver.measure(connection, result, stop_at, max_requests) for connection in ready))
    result.seconds = (time.monotonic_ns() - started) / 1e9
    for meter in meters:
        meter.stop()
    return result


def free_port():
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port, seconds=15):
    """Return once something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def http_request(method, path, host_header, body=b"", headers=()):
    """The bytes of one HTTP/1.1 request with a Content-Length body."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host_header}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="http://host:port/path; POST with --body, GET without")
    parser.add_argument("--body", help="JSON request body, or @file")
    parser.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--max-requests", type=int, default=100_000, help="per connection")
    parser.add_argument("--tokens", type=int, default=100, help="tokens every reply must have")
    parser.add_argument("--stream", action="store_true", help="replies must be NDJSON or SSE streams")
    parser.add_argument("--expect-cache", help="x-cache value every reply must carry (HIT, MISS, BYPASS)")
    args = parser.parse_args(argv)
    url = urllib.parse.urlsplit(args.url)
    body = b""
    if args.body and args.body.startswith("@"):
        with open(args.body[1:], "rb") as file:
            body = file.read()
    elif args.body:
        body = args.body.encode()
    headers = [tuple(part.strip() for part in header.split(":", 1)) for header in args.header]
    if body:
        headers.append(("Content-Type", "application/json"))
    path = url.path + (f"?{url.query}" if url.query else "")
    request = http_request("POST" if body else "GET", path or "/", url.netloc, body, headers)
    expect = Expectation(args.tokens, args.stream, args.expect_cache)
    result = asyncio.run(run_load(url.hostname, url.port or 80, lambda: request, expect,
                                  connections=args.connections, seconds=args.seconds,
                                  max_requests=args.max_requests))
    print(json.dumps(result.summary(), indent=2))
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
