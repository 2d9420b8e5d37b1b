#!/usr/bin/env python3
"""CPU per request of simple_api_proxy's hot path, component by component, in one thread.

    python3 bench/hot_path.py                      # the current simple_api_proxy.py
    python3 bench/hot_path.py --against 1.0.0      # and 1.0.0 (bcac229) next to it, measured the same way
    python3 bench/hot_path.py --proxy /path/to/simple_api_proxy.py --repeat 9

Everything runs in this process through the proxy's own entry points: a real ProxyServer object
(its port bound, unused) whose Ollama client is replaced by one replaying the benchmark stand-in's
100-token reply (bench/standin_ollama.py) through a real UpstreamExchange, and handlers set up by
their own setup() on a connection object holding the request's bytes. No socket carries data, so
system calls for the client and Ollama are not in the figures.

- request line and headers: handle_one_request() up to dispatch();
- upstream chunked parse and line split: UpstreamExchange.receive() and pop_lines() on the reply
  as it arrives, in one read (the 0 ms stream) or one read per token (--per-token);
- NDJSON decode: decode_ndjson() on the lines of each read;
- StreamTranslator feeds: the decoded lines through the translator as the handler passes them
  (translate() per batch where the proxy has it, without events for a miss; else feed() per line);
- SSE encode: the handler's framed() on the events in the groups stream_reply sends them in
  (LINES_PER_WRITE lines, then twice as many each write up to MAX_LINES_PER_WRITE;
  1.0.0: EVENTS_PER_WRITE events a write);
- everything else: a whole request (handle_one_request() of a unique request: a miss; of a cached
  one: a memory hit) less the components above, that is validation, the Ollama payload, the cache
  key and store, ids, the translator's set-up, the response head and sending.

Each figure is the lowest over --repeat rounds of the mean thread CPU time over --loops calls (µs
per request): on a shared machine the least disturbed round is the most repeatable figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run import PROXY_SCRIPT, materialize_baseline, release_label  # noqa: E402
from standin_ollama import EncodedReplies  # noqa: E402
from payloads import JSON_HEADERS, messages_request  # noqa: E402
from load import http_request  # noqa: E402

TOKENS = 100
MODEL = "qwen2.5-coder:7b"
COMPONENTS = ("request line and headers", "upstream chunked parse and line split", "NDJSON decode",
              "StreamTranslator feeds", "SSE encode", "everything else")
SCENARIOS = ("miss (non-stream)", "stream (100 tokens)", "memory hit")


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class ReplayedSocket:
    """What UpstreamExchange reads from: the reply in the given pieces, then EOF. Its descriptor
    is /dev/null's, which poll() always finds readable, so a wait for Ollama returns at once."""

    def __init__(self, pieces, fd):
        self.pieces = list(pieces)
        self.fd = fd

    def setblocking(self, flag):
        pass

    def settimeout(self, value):
        pass

    def fileno(self):
        return self.fd

    def recv(self, size):
        return self.pieces.pop(0) if self.pieces else b""

    def close(self):
        pass


class ClientConnection:
    """The client's side as the handler sees it: the request's bytes to read, a sink for the
    answer, and a descriptor (a pipe's quiet end) that poll() never finds readable."""

    def __init__(self, request_bytes, fd):
        self.request_bytes = request_bytes
        self.fd = fd
        self.sent = 0

    def setsockopt(self, *args):
        pass

    def settimeout(self, value):
        pass

    def makefile(self, mode, buffering=None):
        return io.BufferedReader(io.BytesIO(self.request_bytes)) if "r" in mode else io.BytesIO()

    def sendall(self, data):
        self.sent += len(data)

    def recv(self, size, flags=0):
        raise BlockingIOError()

    def fileno(self):
        return self.fd

    def getpeername(self):
        return ("127.0.0.1", 1)


class ReplayingOllama:
    """Stands in for the proxy's Ollama client (1.0.0's OllamaClient or the upstream pool): every
    chat answer is the stand-in's reply, read through a real UpstreamExchange."""

    def __init__(self, module, pieces, fd):
        self.module = module
        self.pieces = pieces
        self.fd = fd

    def capabilities(self, model):
        return frozenset({"completion", "tools"})

    def route(self, model, payload):
        return self

    def open(self, *args):
        return self.module.UpstreamExchange(ReplayedSocket(self.pieces, self.fd), "stand-in")

    def finish(self):
        pass

    def close(self):
        pass


class Profile:
    """The components and the whole requests of one proxy module."""

    def __init__(self, module, per_token):
        self.proxy = module
        env = {"OLLAMA_HOST": "127.0.0.1:9", "API_HOST": "127.0.0.1", "API_PORT": "0", "LOG_FILE": "",
               "CACHE": "on", "LOG_LEVEL": "WARNING"}
        self.config = module.load_config([], env)
        replies = EncodedReplies(MODEL, TOKENS)
        reply = replies.stream[True]
        if per_token:  # the head and each chunk in its own read, as tokens arriving apart do
            head_end = reply.index(b"\r\n\r\n") + 4
            chunk = replies.plain_token_chunk
            self.pieces = [reply[:head_end]] + [chunk] * TOKENS + [replies.end_of_stream]
        else:
            self.pieces = [reply]
        self.always_readable = os.open(os.devnull, os.O_RDONLY)
        self.quiet, self.quiet_writer = os.pipe()
        # A real server object (it binds a loopback port, which nothing uses) with the replaying Ollama.
        self.server = module.ProxyServer(self.config)
        # The upstream pool is server.pool since 1.1.0, server.ollama before.
        setattr(self.server, "pool" if hasattr(self.server, "pool") else "ollama",
                ReplayingOllama(module, self.pieces, self.always_readable))
        self.numbers = itertools.count()
        self.fixed = {stream: self.request_bytes("Say hello", stream) for stream in (False, True)}
        # The line batches, decoded chunks and events one reply makes, for the components.
        self.batches = self.parse()
        self.decoded = [self.proxy.decode_ndjson(lines, "x")[0] for lines in self.batches]
        self.event_groups = self.feed()
        streaming = self.handler(self.fixed[True], stop_before_dispatch=True)
        # The response framing is the request's own Response since 1.1.0, the handler's before.
        self.framing = getattr(streaming, "response", streaming)
        self.framing.begin_stream("MISS")
        self.framing.framed([])  # its head has left: encoding it is "everything else"

    def close(self):
        self.server.server_close()
        for fd in (self.always_readable, self.quiet, self.quiet_writer):
            os.close(fd)

    @staticmethod
    def request_bytes(prompt, stream):
        return http_request("POST", "/v1/messages", "127.0.0.1:8000",
                            json.dumps(messages_request(prompt, stream=stream)).encode(), JSON_HEADERS)

    def unique(self, stream):
        return self.request_bytes(f"Say hello {next(self.numbers)}", stream)

    def handler(self, request_bytes, stop_before_dispatch=False):
        """A handler set up by its own setup() on a connection holding request_bytes; with
        stop_before_dispatch, it has read the request's line and headers and stopped there."""
        handler = self.proxy.ProxyHandler.__new__(self.proxy.ProxyHandler)
        handler.request = ClientConnection(request_bytes, self.quiet)
        handler.client_address = ("127.0.0.1", 1)
        handler.server = self.server
        handler.setup()
        if stop_before_dispatch:
            handler.dispatch = int
            handler.handle_one_request()
            del handler.dispatch
        return handler

    # -- what is timed ------------------------------------------------------------------------
    def parse(self):
        exchange = self.proxy.UpstreamExchange(ReplayedSocket(self.pieces, self.always_readable), "x")
        batches = []
        while not exchange.finished:
            exchange.receive()
            lines = exchange.pop_lines()
            if lines:
                batches.append(lines)
        return batches

    def decode(self):
        for lines in self.batches:
            self.proxy.decode_ndjson(lines, "x")

    def feed(self, stream=True):
        """The events in the groups the handler writes them in (a miss: the message only)."""
        translator = self.proxy.StreamTranslator("claude-opus-5-5", 10)
        if not hasattr(translator, "translate"):  # 1.0.0: feed() per line, EVENTS_PER_WRITE events a write
            groups, events = [], translator.start()
            for chunks in self.decoded:
                for chunk in chunks:
                    events += translator.feed(chunk)
                    if len(events) >= self.proxy.ProxyHandler.EVENTS_PER_WRITE:
                        groups.append(events)
                        events = []
            return groups + [events]
        if not stream:
            for chunks in self.decoded:
                translator.translate(chunks)
            return []
        # Where the write cadence lives: Generation since 1.1.0, the handler before.
        handler = getattr(self.proxy, "Generation", self.proxy.ProxyHandler)
        groups, events = [], translator.start()
        for chunks in self.decoded:  # as stream_reply: LINES_PER_WRITE lines, then twice as many
            start, write_at = 0, handler.LINES_PER_WRITE
            while start < len(chunks):
                translator.translate(chunks[start:start + write_at], events)
                start += write_at
                if start < len(chunks):
                    groups.append(events)
                    events = []
                    write_at = min(2 * write_at, handler.MAX_LINES_PER_WRITE)
            groups.append(events)
            events = []
        return groups

    def encode(self):
        for events in self.event_groups:
            self.framing.framed(events)

    def table(self, loops, repeat):
        """{scenario: {component: µs or None}}: the components measured alone, "everything else"
        as a whole request's CPU less its components."""
        def handlers(make_request, stop_before_dispatch=False):
            return lambda: self.handler(make_request(), stop_before_dispatch)

        def answer(handler):
            handler.handle_one_request()
            if not handler.request.sent:
                raise RuntimeError("the profiled request got no answer")

        self.handler(self.fixed[False]).handle_one_request()  # the memory hit's entry
        headers = {stream: measure(lambda handler: handler.handle_one_request(), loops, repeat,
                                   handlers(lambda: self.unique(stream), stop_before_dispatch=False),
                                   patch_dispatch=True) for stream in (False, True)}
        parse, decode, encode = (measure(function, loops, repeat) for function in
                                 (self.parse, self.decode, self.encode))
        feeds = {stream: measure(lambda: self.feed(stream), loops, repeat) for stream in (False, True)}
        totals = {"miss": measure(answer, loops, repeat, handlers(lambda: self.unique(False))),
                  "stream": measure(answer, loops, repeat, handlers(lambda: self.unique(True))),
                  "hit": measure(answer, loops, repeat, handlers(lambda: self.fixed[False]))}
        table = {}
        for scenario, stream, total in (("miss (non-stream)", False, totals["miss"]),
                                        ("stream (100 tokens)", True, totals["stream"])):
            parts = {"request line and headers": headers[stream], "upstream chunked parse and line split": parse,
                     "NDJSON decode": decode, "StreamTranslator feeds": feeds[stream],
                     "SSE encode": encode if stream else None}
            parts["everything else"] = total - sum(v for v in parts.values() if v is not None)
            table[scenario] = parts
        table["memory hit"] = dict.fromkeys(COMPONENTS)
        table["memory hit"].update({"request line and headers": headers[False],
                                    "everything else": totals["hit"] - headers[False]})
        events = sum(len(group) for group in self.event_groups)
        return table, events


def measure(function, loops, repeat, prepare=None, patch_dispatch=False):
    """The lowest over `repeat` rounds (the least disturbed, on a shared machine) of the mean thread
    CPU µs per call; with prepare, each call gets
    its own object made beforehand, outside the time. patch_dispatch stops each handler after the
    request's line and headers."""
    rounds = []
    for number in range(repeat + 1):  # the first round warms up
        items = [prepare() for _ in range(loops)] if prepare else [None] * loops
        if patch_dispatch:
            for handler in items:
                handler.dispatch = int
        began = time.thread_time()
        if prepare:
            for item in items:
                function(item)
        else:
            for _ in items:
                function()
        if number:
            rounds.append((time.thread_time() - began) / loops * 1e6)
    return min(rounds)


def cell(value):
    return "—" if value is None else f"{value:.0f} µs"


def render(tables, labels, events):
    columns = [f"{scenario}, {label}" for scenario in SCENARIOS for label in labels]
    out = ["| component | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for component in COMPONENTS + ("total",):
        cells = []
        for scenario in SCENARIOS:
            for table in tables:
                values = table[scenario]
                if component == "total":
                    cells.append(f"**{sum(v for v in values.values() if v is not None):.0f} µs**")
                else:
                    cells.append(cell(values[component]))
        name = f"**{component}**" if component == "total" else component
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    for label, table, count in zip(labels, tables, events):
        encode = table["stream (100 tokens)"]["SSE encode"]
        out.append(f"\nSSE encode, {label}: {count} events, {encode / count:.2f} µs per event")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy", default=str(PROXY_SCRIPT), help="the simple_api_proxy.py to profile")
    parser.add_argument("--against", metavar="REV", help="also profile simple_api_proxy.py of this release (1.0.0) or git revision")
    parser.add_argument("--per-token", action="store_true", help="the reply arrives one token per read")
    parser.add_argument("--loops", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)  # the profiled server's complaints about its absent Ollama
    sources = [("current", args.proxy)]
    with tempfile.TemporaryDirectory(prefix="simple_api_proxy_profile_") as scratch:
        if args.against:
            try:
                sources.append((release_label(args.against), str(materialize_baseline(args.against, scratch))))
            except RuntimeError as exc:
                parser.error(str(exc))
        tables, events = [], []
        for number, (label, path) in enumerate(sources):
            profile = Profile(load_module(path, f"profiled_proxy_{number}"), args.per_token)
            try:
                table, count = profile.table(args.loops, args.repeat)
            finally:
                profile.close()
            tables.append(table)
            events.append(count)
    arrival = "one read per token" if args.per_token else "the whole reply in one read"
    print(f"CPU per request, one thread, {TOKENS}-token reply from the stand-in ({arrival}); "
          f"lowest of {args.repeat} rounds of {args.loops}, Python {sys.version.split()[0]}\n")
    print(render(tables, [label for label, _ in sources], events))
    return 0


if __name__ == "__main__":
    sys.exit(main())
