#!/usr/bin/env python3
"""CPU per request of simple_api_proxy's hot path, component by component, in one thread.

    python3 bench/hot_path.py                      # the current simple_api_proxy.py
    python3 bench/hot_path.py --against bcac229    # and 1.0.0 next to it, measured the same way
    python3 bench/hot_path.py --proxy /path/to/simple_api_proxy.py --repeat 9

Each component runs through the proxy's own entry points, without sockets, on the bytes the
benchmark's stand-in Ollama sends (bench/standin_ollama.py, 100 tokens):

- request line and headers: the handler's handle_one_request() on a request in a byte buffer,
  with dispatch() (everything after the headers) left out;
- upstream chunked parse and line split: UpstreamExchange.receive() and pop_lines() on the reply
  as it arrives, either in one read (the 0 ms stream) or one read per token (--per-token);
- NDJSON decode: decode_ndjson() on the lines of each read;
- StreamTranslator feeds: feed() per decoded line;
- SSE encode: the handler's framed() on the events, EVENTS_PER_WRITE at a time, as stream_reply sends them;
- everything else: reading the request's JSON, validation, the Ollama payload, the cache key, token
  estimate, ids, the translator's set-up, the response head and the store (miss), or the lookup and
  the replay (hit).

Each figure is the median over --repeat rounds of the mean over --loops calls (µs per request).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run import PROXY_SCRIPT, materialize_baseline  # noqa: E402
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
    """What UpstreamExchange reads from: the reply in the given pieces, then EOF. fileno() is a real
    descriptor (a pipe's) only so that poll() accepts it."""

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


class StubDeadlines:
    def arm(self, sock, seconds):
        pass

    def disarm(self, sock):
        pass


class StubServer:
    def __init__(self, module, config):
        self.config = config
        self.read_deadlines = StubDeadlines()
        self.stopping = False
        self.cache = module.ResponseCache(config)

    def count(self, name, delta):
        pass


class Profile:
    """The components of one proxy module."""

    def __init__(self, module, per_token):
        self.proxy = module
        env = {"OLLAMA_HOST": "127.0.0.1:9", "LOG_FILE": "", "CACHE": "on", "LOG_LEVEL": "WARNING"}
        self.config = module.load_config([], env)
        self.server = StubServer(module, self.config)
        replies = EncodedReplies(MODEL, TOKENS)
        reply = replies.stream[True]
        if per_token:  # the head and each chunk in its own read, as tokens arriving apart do
            head_end = reply.index(b"\r\n\r\n") + 4
            chunk = replies.plain_token_chunk
            self.pieces = [reply[:head_end]] + [chunk] * TOKENS + [replies.end_of_stream]
        else:
            self.pieces = [reply]
        self.read_fd, self.write_fd = os.pipe()
        self.requests = {stream: http_request("POST", "/v1/messages", "127.0.0.1:8000",
                                              json.dumps(messages_request("Say hello", stream=stream)).encode(),
                                              JSON_HEADERS) for stream in (False, True)}
        # The line batches, decoded chunks and events one reply makes, for the later components.
        self.batches = self.parse()
        self.decoded = [self.proxy.decode_ndjson(lines, "x")[0] for lines in self.batches]
        self.event_groups = self.feed()
        # A handler whose stream has begun and whose head has left (that is "everything else").
        self.streaming = self.handler(self.requests[True])
        self.streaming.begin_stream("MISS")
        self.streaming.framed([])

    def handler(self, request_bytes):
        """A handler that has read the request's line and headers from request_bytes, through its own
        handle_one_request(), and stopped before dispatch()."""
        handler = self.proxy.ProxyHandler.__new__(self.proxy.ProxyHandler)
        handler.server = self.server
        handler.config = self.config
        handler.deadlines = self.server.read_deadlines
        handler.request = handler.connection = None
        handler.client_address = ("127.0.0.1", 1)
        handler.rfile = io.BytesIO(request_bytes)
        handler.wfile = io.BytesIO()
        handler.close_connection = False
        handler.dispatch = int  # stop where the request's head has been read and parsed
        handler.handle_one_request()
        del handler.dispatch
        return handler

    # -- components ------------------------------------------------------------------------
    def headers(self, stream):
        self.handler(self.requests[stream])

    def parse(self):
        exchange = self.proxy.UpstreamExchange(ReplayedSocket(self.pieces, self.read_fd), "x")
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

    def feed(self):
        translator = self.proxy.StreamTranslator("claude-opus-5-5", 10)
        groups, events = [], translator.start()
        for chunks in self.decoded:
            for chunk in chunks:
                events += translator.feed(chunk)
                if len(events) >= self.proxy.ProxyHandler.EVENTS_PER_WRITE:
                    groups.append(events)
                    events = []
        groups.append(events)
        return groups

    def encode(self):
        for events in self.event_groups:
            self.streaming.framed(events)

    def miss_outside_components(self, stream):
        """A miss without the upstream components: request bytes to stored answer. Less the request
        line and headers, that is "everything else"."""
        handler = self.handler(self.requests[stream])
        request = self.proxy.validate_messages_request(handler.read_json())
        ollama_model = self.proxy.resolve_model(request["model"], self.config)
        payload = self.proxy.anthropic_to_ollama(request, ollama_model, self.config)
        cache, key, lookup, store = handler.cache_policy(request, payload)
        cache.get(key)
        input_tokens = self.proxy.estimate_tokens(payload)
        translator = self.proxy.StreamTranslator(request["model"], input_tokens, tool_names=[])
        self.proxy.json_bytes(payload)  # the body sent to Ollama
        translator.feed({"message": {"role": "assistant", "content": " tok"}, "done": True})
        message = translator.message
        if stream:
            handler.begin_stream("MISS")
            handler.framed(translator.start())
        else:
            handler.send_json(200, message, {"x-cache": "MISS"})
        cache.put(key, message)

    def hit(self):
        """A memory-tier hit: request bytes, lookup and replay."""
        handler = self.handler(self.requests[False])
        request = self.proxy.validate_messages_request(handler.read_json())
        ollama_model = self.proxy.resolve_model(request["model"], self.config)
        payload = self.proxy.anthropic_to_ollama(request, ollama_model, self.config)
        cache, key, lookup, store = handler.cache_policy(request, payload)
        handler.replay(cache.get(key), request["model"], False)

    def prime_hit(self):
        handler = self.handler(self.requests[False])
        request = self.proxy.validate_messages_request(handler.read_json())
        payload = self.proxy.anthropic_to_ollama(request, self.proxy.resolve_model(request["model"], self.config),
                                                 self.config)
        cache, key, _, _ = handler.cache_policy(request, payload)
        translator = self.proxy.StreamTranslator(request["model"], 10)
        for chunks in self.decoded:
            for chunk in chunks:
                translator.feed(chunk)
        cache.put(key, translator.message)

    def table(self, loops, repeat):
        """{scenario: {component: µs or None}}"""
        self.prime_hit()
        timed = {
            ("headers", False): lambda: self.headers(False), ("headers", True): lambda: self.headers(True),
            "parse": self.parse, "decode": self.decode, "feed": self.feed, "encode": self.encode,
            ("else", False): lambda: self.miss_outside_components(False),
            ("else", True): lambda: self.miss_outside_components(True),
            "hit": self.hit,
        }
        figures = {name: measure(function, loops, repeat) for name, function in timed.items()}
        for stream in (False, True):
            figures[("else", stream)] -= figures[("headers", stream)]
        figures["hit"] -= figures[("headers", False)]
        table = {}
        for scenario, stream in (("miss (non-stream)", False), ("stream (100 tokens)", True)):
            table[scenario] = {
                "request line and headers": figures[("headers", stream)],
                "upstream chunked parse and line split": figures["parse"],
                "NDJSON decode": figures["decode"],
                "StreamTranslator feeds": figures["feed"],
                "SSE encode": figures["encode"] if stream else None,
                "everything else": figures[("else", stream)],
            }
        table["memory hit"] = dict.fromkeys(COMPONENTS)
        table["memory hit"].update({"request line and headers": figures[("headers", False)],
                                    "everything else": figures["hit"]})
        events = sum(len(group) for group in self.event_groups)
        return table, events


def measure(function, loops, repeat):
    """Median over `repeat` rounds of the mean thread CPU µs per call."""
    function()  # warm
    rounds = []
    for _ in range(repeat):
        began = time.thread_time()
        for _ in range(loops):
            function()
        rounds.append((time.thread_time() - began) / loops * 1e6)
    return statistics.median(rounds)


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
    parser.add_argument("--against", metavar="REV", help="also profile simple_api_proxy.py of this git revision")
    parser.add_argument("--per-token", action="store_true", help="the reply arrives one token per read")
    parser.add_argument("--loops", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    sources = [("current", args.proxy)]
    with tempfile.TemporaryDirectory(prefix="simple_api_proxy_profile_") as scratch:
        if args.against:
            try:
                sources.append((args.against, str(materialize_baseline(args.against, scratch))))
            except RuntimeError as exc:
                parser.error(str(exc))
        tables, events = [], []
        for number, (label, path) in enumerate(sources):
            profile = Profile(load_module(path, f"profiled_proxy_{number}"), args.per_token)
            table, count = profile.table(args.loops, args.repeat)
            tables.append(table)
            events.append(count)
    arrival = "one read per token" if args.per_token else "the whole reply in one read"
    print(f"CPU per request, one thread, {TOKENS}-token reply from the stand-in ({arrival}); "
          f"median of {args.repeat} rounds of {args.loops}, Python {sys.version.split()[0]}\n")
    print(render(tables, [label for label, _ in sources], events))
    return 0


if __name__ == "__main__":
    sys.exit(main())
