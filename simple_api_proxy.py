#!/usr/bin/env python3
"""simple_api_proxy: the Anthropic Messages API in front of Ollama, in one file.

Claude Code and the Anthropic SDKs talk to this server as if it were
api.anthropic.com; it answers with a model that Ollama serves, and keeps
complete answers in a response cache (in memory, and in Redis when one is
configured).

    Claude CLI -> ANTHROPIC_BASE_URL -> SSH tunnel -> simple_api_proxy -> cache -> Ollama

Run it with the standard library alone: ``python3 simple_api_proxy.py``.
``python3 simple_api_proxy.py --help`` lists every setting. redis-py is the
one optional import, used only when a Redis server is configured.

Sections, each using only those above it (dependency order, as in bottle.py; not the order a
request meets them): configuration; errors; helpers used everywhere (JSON and ids); fitting the
context window; translation: Anthropic <-> Ollama (pure functions); tool calls written as text;
translation: Ollama's stream -> Anthropic events; upstream client (Ollama over HTTP/1.1); upstream
pool (several Ollama hosts, failover, warm-up); generation (one request's conversation with
Ollama); cache; request reader; origin and host checks; metrics; HTTP handler; main().

A request's path: ProxyServer.process_request() gives the connection a thread and a
ProxyHandler, whose handle_one_request() makes the request's Response and read_and_answer()
reads the request line and headers with RequestReader.read_head(); dispatch() runs admit()
(OriginPolicy.refusal(), the route, the API key, RequestReader.read_body()) and then the route.
For POST /v1/messages, route_messages() checks the body (validate_messages_request()), builds
Ollama's request (anthropic_to_ollama(), which fits it to the window with fit_to_window()), and
looks in the ResponseCache; on a miss, UpstreamPool.route() picks the hosts, a Generation sends
the request (UpstreamRoute.open() -> OllamaClient.open() -> UpstreamExchange), reads Ollama's
answer as it arrives (Generation.batches(): UpstreamResponse parses it, decode_ndjson() decodes
its lines, UpstreamRoute.fail_over() moves it while no line was given out), and passes it through
a StreamTranslator, whose TextCallGate holds text that may be a tool call written as text
(find_text_tool_calls() decides at the end); Generation.stream() hands each burst of events to
Response.write_events(), which frames them (sse_event(), one HTTP chunk per write), until
Response.end_stream() writes message_stop and the last chunk. The message goes to the cache,
Generation.close() gives Ollama's connection back, and the handler logs the request and counts
it in Metrics.
"""

from __future__ import annotations

import argparse
import ast
import base64
import binascii
import bisect
import collections
import contextlib
import dataclasses
import email.utils
import functools
import hashlib
import hmac
import http.server
import ipaddress
import json
import logging
import math
import os
import random
import re
import secrets
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse

__version__ = "1.1.0"

log = logging.getLogger("simple_api_proxy")


###############################################################################
# Configuration
###############################################################################

# name, type, default, help. Each setting is an environment variable of that
# name and a flag (--api-port for API_PORT); the flag wins.
SETTINGS = (
    ("API_HOST", str, "127.0.0.1", "address to listen on; the SSH tunnel reaches 127.0.0.1"),
    ("API_PORT", int, 8000, "port to listen on"),
    ("OLLAMA_HOST", str, "localhost:11434",
     "Ollama address: host, host:port or http(s)://host[:port] (Ollama's port rules); "
     "several, comma-separated, to spread requests over several Ollama servers"),
    ("OLLAMA_MODEL", str, "qwen2.5-coder:7b", "Ollama model that claude-* model names map to"),
    ("MODEL_MAP", str, "",
     "per-family models, e.g. haiku=llama3.2:3b,sonnet=qwen2.5-coder:7b,opus=qwen2.5-coder:32b"),
    ("OLLAMA_TIMEOUT", float, 30.0, "seconds: connecting to Ollama, and any silence once tokens flow"),
    ("OLLAMA_FIRST_TOKEN_TIMEOUT", float, 300.0,
     "seconds before the first token: model load plus prompt processing"),
    ("OLLAMA_NUM_CTX", int, 32768, "context window sent to Ollama on every request (num_ctx)"),
    ("OLLAMA_KEEP_ALIVE", str, "", "how long Ollama keeps the model loaded (e.g. 30m, -1); unset: Ollama's default"),
    ("DEFAULT_MAX_TOKENS", int, 4096, "max_tokens for a request that does not say (the integration guide's checks)"),
    ("OLLAMA_WARMUP", str, "on",
     "load OLLAMA_MODEL on each Ollama host at start and when a host comes back: on, off, or all "
     "(also the MODEL_MAP models)"),
    ("PING_INTERVAL", float, 10.0, "seconds between SSE pings while a stream waits for the model"),
    ("CACHE", str, "on", "response cache: on or off"),
    ("CACHE_TTL", int, 86400, "seconds a cached answer lives, in memory and in Redis"),
    ("CACHE_MAX_ENTRIES", int, 1000, "most answers the in-memory cache holds"),
    ("CACHE_MAX_BYTES", int, 64 * 1024 * 1024, "most bytes the in-memory cache holds"),
    ("REDIS_URL", str, "", "redis:// or rediss:// URL of a shared cache (overrides REDIS_HOST...)"),
    ("REDIS_HOST", str, "", "Redis host of a shared cache; unset: no Redis"),
    ("REDIS_PORT", int, 6379, "Redis port"),
    ("REDIS_PASSWORD", str, "", "Redis password"),
    ("REDIS_SSL", str, "off", "on for TLS to Redis (Redis Cloud needs it)"),
    ("REDIS_DB", int, 0, "Redis database number"),
    ("REDIS_TIMEOUT", float, 0.25, "seconds for any Redis operation before Redis is marked down"),
    ("TOOL_CALL_RECOVERY", str, "on", "turn tool calls a model writes as text into tool_use blocks: on or off"),
    ("THINKING_KEY_FILE", str, "",
     "file with the key that seals hidden thinking (display omitted) into its signature; created when "
     "missing; unset: a new key each start, so thinking sealed before a restart is left out"),
    ("PROXY_API_KEY", str, "", "when set, /v1/* requests need this key (x-api-key or Authorization: Bearer)"),
    ("ALLOWED_ORIGINS", str, "",
     "browser origins allowed besides loopback pages and desktop apps: comma list, * wildcards, * for any"),
    ("MAX_BODY_BYTES", int, 32 * 1024 * 1024, "largest request body accepted"),
    ("MAX_CONCURRENT", int, 256, "most generations in flight; past that: 529 overloaded_error"),
    ("MAX_CONNECTIONS", int, 1024, "most open client connections (a thread each); past that: 529"),
    ("CLIENT_TIMEOUT", float, 60.0,
     "seconds a client may take to send its request line and headers, and again its body; idle keep-alive time"),
    ("SHUTDOWN_GRACE", float, 10.0, "seconds requests in flight may finish after SIGTERM/SIGINT"),
    ("LOG_LEVEL", str, "INFO", "DEBUG, INFO, WARNING or ERROR"),
    ("LOG_FILE", str, "simple_api_proxy.log", "log file (also logged to stderr); empty: stderr only"),
    ("LOG_BODIES", str, "0", "1 to log request bodies (prompts); off by default"),
)

SECRET_SETTINGS = {"REDIS_PASSWORD", "PROXY_API_KEY"}
MODEL_FAMILIES = ("haiku", "sonnet", "opus")
TRUE_WORDS = {"1", "on", "true", "yes"}
FALSE_WORDS = {"0", "off", "false", "no", ""}


@dataclasses.dataclass(frozen=True)
class OllamaAddress:
    """Where one Ollama server listens; `url` is how logs, errors and /metrics name it."""
    scheme: str
    hostname: str
    port: int

    @property
    def url(self):
        hostname = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return f"{self.scheme}://{hostname}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Config:
    api_host: str
    api_port: int
    ollama_addresses: tuple  # of OllamaAddress, in OLLAMA_HOST's order
    ollama_model: str
    model_map: dict
    ollama_timeout: float
    ollama_first_token_timeout: float
    ollama_num_ctx: int
    ollama_keep_alive: str
    default_max_tokens: int
    ollama_warmup: str
    ping_interval: float
    cache_enabled: bool
    cache_ttl: int
    cache_max_entries: int
    cache_max_bytes: int
    redis_url: str
    redis_timeout: float
    tool_call_recovery: bool
    thinking_key_file: str
    proxy_api_key: str
    allowed_origins: tuple  # of compiled patterns, from parse_allowed_origins
    max_body_bytes: int
    max_concurrent: int
    max_connections: int
    client_timeout: float
    shutdown_grace: float
    log_level: str
    log_file: str
    log_bodies: bool

    def describe(self):
        """The effective configuration as one log-safe line."""
        redis = mask_url_password(self.redis_url) if self.redis_url else "off"
        models = ",".join(f"{k}={v}" for k, v in self.model_map.items()) or "-"
        return (
            f"listen={self.api_host}:{self.api_port} ollama={','.join(a.url for a in self.ollama_addresses)} "
            f"model={self.ollama_model} warmup={self.ollama_warmup} "
            f"model_map={models} num_ctx={self.ollama_num_ctx} timeout={self.ollama_timeout:g}s "
            f"first_token_timeout={self.ollama_first_token_timeout:g}s "
            f"keep_alive={self.ollama_keep_alive or 'default'} "
            f"cache={'on' if self.cache_enabled else 'off'} ttl={self.cache_ttl}s redis={redis} "
            f"tool_call_recovery={'on' if self.tool_call_recovery else 'off'} "
            f"api_key={'set' if self.proxy_api_key else 'none'} max_concurrent={self.max_concurrent} "
            f"log_file={self.log_file or '-'}"
        )


def parse_ollama_host(value):
    """Ollama's own rules: no scheme means http and 11434; a scheme without a port means 80 or 443."""
    value = value.strip()
    if not value:
        raise ValueError("OLLAMA_HOST is empty")
    if "://" not in value:
        parsed = urllib.parse.urlsplit("http://" + value)
        default_port = 11434
    else:
        parsed = urllib.parse.urlsplit(value)
        if parsed.scheme not in ("http", "https"):
            raise ValueError(f"OLLAMA_HOST scheme must be http or https, not {parsed.scheme!r}")
        default_port = 443 if parsed.scheme == "https" else 80
    try:
        port = parsed.port
    except ValueError as exc:
        raise ValueError(f"OLLAMA_HOST has a bad port: {value!r}") from exc
    hostname = parsed.hostname or "127.0.0.1"
    if hostname in ("0.0.0.0", "::"):
        # A bind address is not connectable everywhere; Ollama's client rewrites it too.
        hostname = "127.0.0.1"
    return OllamaAddress(parsed.scheme, hostname, port or default_port)


def parse_ollama_hosts(value):
    """OLLAMA_HOST: one address, or several separated by commas."""
    addresses = tuple(parse_ollama_host(part) for part in value.split(",") if part.strip())
    if not addresses:
        raise ValueError("OLLAMA_HOST is empty")
    urls = [address.url for address in addresses]
    for url in urls:
        if urls.count(url) > 1:
            raise ValueError(f"OLLAMA_HOST lists {url} more than once")
    return addresses


def parse_allowed_origins(value):
    """ALLOWED_ORIGINS: a comma list of origins, each may use * as a wildcard; a lone * allows any."""
    patterns = []
    for item in filter(None, (part.strip().lower().rstrip("/") for part in value.split(","))):
        if "://" not in item and item != "*":
            raise ValueError(f"ALLOWED_ORIGINS entry {item!r} is not an origin like https://app.example.com")
        patterns.append(re.compile(".*".join(re.escape(piece) for piece in item.split("*"))))
    return tuple(patterns)


def parse_warmup(value):
    word = value.strip().lower() or "on"
    if word == "all":
        return "all"
    if word in TRUE_WORDS:
        return "on"
    if word in FALSE_WORDS:
        return "off"
    raise ValueError(f"OLLAMA_WARMUP must be on, off or all, not {value!r}")


def parse_model_map(value):
    mapping = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        family, sep, model = item.partition("=")
        family, model = family.strip().lower(), model.strip()
        if not sep or not family or not model:
            raise ValueError(f"MODEL_MAP entry {item!r} is not family=model")
        mapping[family] = model
    return mapping


def parse_switch(name, value):
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{name} must be on or off, not {value!r}")


def build_redis_url(values):
    if values["REDIS_URL"]:
        return values["REDIS_URL"]
    if not values["REDIS_HOST"]:
        return ""
    scheme = "rediss" if parse_switch("REDIS_SSL", values["REDIS_SSL"]) else "redis"
    auth = ""
    if values["REDIS_PASSWORD"]:
        auth = ":" + urllib.parse.quote(values["REDIS_PASSWORD"], safe="") + "@"
    return f"{scheme}://{auth}{values['REDIS_HOST']}:{values['REDIS_PORT']}/{values['REDIS_DB']}"


def mask_url_password(url):
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def argument_parser():
    parser = argparse.ArgumentParser(
        prog="simple_api_proxy.py",
        description="Anthropic Messages API proxy to Ollama, with a response cache. "
        "Every setting is a flag or the environment variable of the same name (the flag wins).",
    )
    for name, _, default, help_text in SETTINGS:
        flag = "--" + name.lower().replace("_", "-")
        shown = "(secret)" if name in SECRET_SETTINGS else repr(default)
        parser.add_argument(flag, dest=name, metavar=name, default=None,
                            help=f"{help_text} [env {name}, default {shown}]")
    parser.add_argument("--version", action="version", version=f"simple_api_proxy {__version__}")
    return parser


def load_config(argv=None, environ=None):
    """Build the Config from flags and environment; raise SystemExit with a clear message on bad values."""
    environ = os.environ if environ is None else environ
    parser = argument_parser()
    args = vars(parser.parse_args(argv))
    values = {}
    for name, kind, default, _ in SETTINGS:
        raw = args[name] if args[name] is not None else environ.get(name)
        if raw is None or (raw == "" and kind is not str):
            values[name] = default
            continue
        try:
            values[name] = kind(raw)
        except ValueError:
            parser.error(f"{name} must be {'an integer' if kind is int else 'a number'}, not {raw!r}")
    try:
        config = Config(
            api_host=values["API_HOST"],
            api_port=values["API_PORT"],
            ollama_addresses=parse_ollama_hosts(values["OLLAMA_HOST"]),
            ollama_model=values["OLLAMA_MODEL"],
            model_map=parse_model_map(values["MODEL_MAP"]),
            ollama_timeout=values["OLLAMA_TIMEOUT"],
            ollama_first_token_timeout=values["OLLAMA_FIRST_TOKEN_TIMEOUT"],
            ollama_num_ctx=values["OLLAMA_NUM_CTX"],
            ollama_keep_alive=values["OLLAMA_KEEP_ALIVE"],
            default_max_tokens=values["DEFAULT_MAX_TOKENS"],
            ollama_warmup=parse_warmup(values["OLLAMA_WARMUP"]),
            ping_interval=values["PING_INTERVAL"],
            cache_enabled=parse_switch("CACHE", values["CACHE"]),
            cache_ttl=values["CACHE_TTL"],
            cache_max_entries=values["CACHE_MAX_ENTRIES"],
            cache_max_bytes=values["CACHE_MAX_BYTES"],
            redis_url=build_redis_url(values),
            redis_timeout=values["REDIS_TIMEOUT"],
            tool_call_recovery=parse_switch("TOOL_CALL_RECOVERY", values["TOOL_CALL_RECOVERY"]),
            thinking_key_file=values["THINKING_KEY_FILE"],
            proxy_api_key=values["PROXY_API_KEY"],
            allowed_origins=parse_allowed_origins(values["ALLOWED_ORIGINS"]),
            max_body_bytes=values["MAX_BODY_BYTES"],
            max_concurrent=values["MAX_CONCURRENT"],
            max_connections=values["MAX_CONNECTIONS"],
            client_timeout=values["CLIENT_TIMEOUT"],
            shutdown_grace=values["SHUTDOWN_GRACE"],
            log_level=values["LOG_LEVEL"].upper(),
            log_file=values["LOG_FILE"],
            log_bodies=parse_switch("LOG_BODIES", values["LOG_BODIES"]),
        )
    except ValueError as exc:
        parser.error(str(exc))
    if not 0 <= config.api_port <= 65535:
        parser.error(f"API_PORT must be a port number (0 picks a free one), not {config.api_port}")
    for name, value in (("OLLAMA_NUM_CTX", config.ollama_num_ctx), ("MAX_CONCURRENT", config.max_concurrent),
                        ("MAX_CONNECTIONS", config.max_connections), ("MAX_BODY_BYTES", config.max_body_bytes),
                        ("OLLAMA_TIMEOUT", config.ollama_timeout), ("PING_INTERVAL", config.ping_interval),
                        ("OLLAMA_FIRST_TOKEN_TIMEOUT", config.ollama_first_token_timeout),
                        ("CLIENT_TIMEOUT", config.client_timeout), ("CACHE_TTL", config.cache_ttl),
                        ("REDIS_TIMEOUT", config.redis_timeout),
                        ("DEFAULT_MAX_TOKENS", config.default_max_tokens)):
        if not (math.isfinite(value) and value > 0):
            parser.error(f"{name} must be a number greater than 0, not {value}")
    if config.shutdown_grace < 0 or config.cache_max_entries < 0 or config.cache_max_bytes < 0:
        parser.error("SHUTDOWN_GRACE, CACHE_MAX_ENTRIES and CACHE_MAX_BYTES cannot be negative")
    if config.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        parser.error(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, not {config.log_level!r}")
    return config


###############################################################################
# Errors
###############################################################################

# HTTP status -> Anthropic error type, for statuses that reach a client.
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
    500: "api_error", 502: "api_error", 504: "timeout_error", 529: "overloaded_error",
}


class ProxyError(Exception):
    """A failure to report to the client as an Anthropic error envelope."""

    def __init__(self, status, message, error_type=None, *, retry=None, retry_after=None, allow=None,
                 upstream_failure=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
        # None lets the SDK decide from the status; False says a retry cannot help.
        self.retry = retry
        self.retry_after = retry_after
        self.allow = allow  # a 405's methods (RFC 9110 §15.5.6)
        self.upstream_failure = upstream_failure  # why an Ollama host failed, when no OSError says

    def headers(self):
        headers = {"Allow": self.allow} if self.allow else {}
        if self.retry is not None:
            headers["x-should-retry"] = "true" if self.retry else "false"
        if self.retry_after is not None:
            headers["retry-after"] = str(self.retry_after)
        return headers

    def body(self, request_id):
        return {"type": "error", "error": {"type": self.error_type, "message": self.message},
                "request_id": request_id}


class ClientGone(Exception):
    """The client closed its connection; nothing more can be sent."""


# A client that closes or resets is noticed while Ollama generates. POLLRDHUP (Linux) reports the
# close even after the client sent bytes of its next request; elsewhere POLLIN and a peek must do.
CLIENT_GONE_EVENTS = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR | select.POLLNVAL
CLIENT_WATCH_EVENTS = getattr(select, "POLLRDHUP", select.POLLIN)


def invalid(message):
    return ProxyError(400, message, "invalid_request_error", retry=False)


###############################################################################
# Helpers used everywhere: JSON and ids
###############################################################################

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_id_random = random.Random(secrets.randbits(128))
# Each random byte becomes one base62 character through a table: 248 of the 256 values spread
# evenly, the last 8 add a slight lean to 8 characters, which leaves about 142 bits per id.
_ID_CHARACTERS = bytes((BASE62 * 5)[:256], "ascii")


def new_id(prefix):
    """prefix + 24 base62 characters. Ids must be unique, not unguessable: a seeded generator
    spares a system call per id."""
    return prefix + _id_random.getrandbits(192).to_bytes(24, "little").translate(_ID_CHARACTERS).decode()


class NonFiniteNumber(ValueError):
    """A JSON number too large for a float (1e400): json.loads would make it inf, which no JSON
    encoder can send on."""


def finite_float(text):
    """json.loads' parse_float: refuses what would become inf instead of passing it upstream."""
    value = float(text)
    if value - value != 0:
        raise NonFiniteNumber(text)
    return value


def reject_json_constant(name):
    raise ValueError(f"{name} is not valid JSON")


# Strict JSON for all that comes in (request bodies, a forced tool call's output, cache entries):
# no NaN/Infinity, no number that would become inf. Built once: json.loads with hooks builds a
# new decoder on every call.
decode_strict_json = json.JSONDecoder(parse_constant=reject_json_constant, parse_float=finite_float).decode


_compact_json = json.JSONEncoder(separators=(",", ":")).encode
_decode_json = json.JSONDecoder().decode


def json_bytes(value):
    return _compact_json(value).encode()


# The JSON string encoder _compact_json itself uses (ensure_ascii), so a template filled with it
# gives the very bytes json would.
_json_string = json.encoder.encode_basestring_ascii


###############################################################################
# Fitting the context window
###############################################################################
# Claude Code caps one Read at 25,000 tokens on top of a ~14k-token base prompt: at a 32k
# window a single full-size read would end the session with `prompt is too long`. Tool results
# are what grows, so when the prompt would not leave room for an answer, the largest ones are
# cut in the middle (start and end kept, one line saying what was cut). Cuts come from a fixed
# ladder of sizes, so the same result is cut the same way turn after turn and Ollama's prompt
# cache keeps its prefix; the ladder steps down only when the conversation outgrows a step.

TRIM_LADDER = (65536, 49152, 32768, 24576, 16384, 12288, 8192, 6144, 4096, 3072, 2048)  # characters kept
ANSWER_ROOM_FLOOR = 1024  # tokens
# Claude Code 2.1.332's first request with all its tools, by Ollama's count (13,447 measured).
CLAUDE_CODE_PROMPT_TOKENS = 13500


def answer_room(max_tokens, num_ctx):
    """Tokens kept free for the answer when results must be cut: an eighth of the window
    (4096 at 32k), at least ANSWER_ROOM_FLOOR, never more than the client asked for."""
    return min(max_tokens, max(num_ctx // 8, ANSWER_ROOM_FLOOR))


def prompt_limit(max_tokens, num_ctx):
    """The largest prompt served: one that leaves the answer less than ANSWER_ROOM_FLOOR tokens, a
    quarter of the window or max_tokens, whichever is least, would get a few tokens and stop at
    max_tokens; `prompt is too long` has Claude Code compact the conversation instead. Never
    below num_ctx - answer_room(), so a prompt cut to answer_room() is always served."""
    return num_ctx - min(max_tokens, ANSWER_ROOM_FLOOR, num_ctx // 4)


def small_window_warning(num_ctx):
    """A warning for a window that cannot hold Claude Code's prompt with all its tools plus room for
    an answer (answer_room() of the window), else None. Its first request would be refused as too
    long, which ends the session before anything is done."""
    needed = CLAUDE_CODE_PROMPT_TOKENS + answer_room(num_ctx, num_ctx)
    if num_ctx >= needed:
        return None
    return (f"OLLAMA_NUM_CTX={num_ctx} cannot hold Claude Code's prompt with all its tools (about "
            f"{CLAUDE_CODE_PROMPT_TOKENS:,} tokens) plus room for an answer ({needed:,} tokens in all): its first "
            f"request will be refused as too long, or leave the conversation next to no room. Use "
            f"OLLAMA_NUM_CTX=16384 or more if the GPU holds it, or run Claude Code with fewer tools "
            f"(claude_start.sh --lean) and a smaller CLAUDE_CODE_MAX_OUTPUT_TOKENS. Other clients are not affected.")


def trimmed_tool_text(text, keep, num_ctx):
    """text cut to about `keep` characters from the middle, at line ends where there are any."""
    half = keep // 2
    head, tail = text[:half], text[len(text) - half:]
    newline = head.rfind("\n")
    if newline >= half * 3 // 4:
        head = head[:newline + 1]
    newline = tail.find("\n")
    if 0 <= newline < half // 4:
        tail = tail[newline + 1:]
    cut = len(text) - len(head) - len(tail)
    separator = "" if head.endswith("\n") else "\n"
    return (f"{head}{separator}[simple_api_proxy: {cut:,} characters cut from the middle of this tool result "
            f"to fit the model's {num_ctx}-token window; read the rest in ranges (Read with offset/limit, "
            f"or sed -n / head / tail) to see them]\n{tail}")


def fit_to_window(payload, max_tokens, num_ctx):
    """Cut the largest tool results when the prompt leaves less than answer_room() in the window,
    then cap num_predict at what the window has left. Returns (a note on what was cut or None,
    the prompt's estimated tokens).

    When even the smallest step cannot bring the prompt within prompt_limit(), nothing is cut:
    the caller answers `prompt is too long` with the size the client really sent."""
    estimate = estimate_tokens(payload)
    target = num_ctx - answer_room(max_tokens, num_ctx)
    note = None
    if estimate > target:
        originals = [(message, message["content"]) for message in payload["messages"]
                     if message["role"] == "tool" and len(message["content"]) > TRIM_LADDER[-1]]
        fitted = None
        for keep in TRIM_LADDER:
            trimmed = [(message, text) for message, text in originals if len(text) > keep]
            if not trimmed:
                continue
            for message, text in trimmed:
                message["content"] = trimmed_tool_text(text, keep, num_ctx)
            smaller = estimate_tokens(payload)
            fitted = (keep, len(trimmed), smaller)
            if smaller <= target:
                break
        if fitted and fitted[2] <= prompt_limit(max_tokens, num_ctx):
            keep, count, smaller = fitted
            note = (f"{count} tool result(s) cut to about {keep:,} characters each to fit the "
                    f"{num_ctx}-token window ({estimate} -> {smaller} tokens)")
            estimate = smaller
        else:
            for message, text in originals:
                message["content"] = text
    if estimate <= num_ctx and max_tokens > 0:
        payload["options"]["num_predict"] = max(1, min(max_tokens, num_ctx - estimate))
    return note, estimate


CHARS_PER_TOKEN = 3.5  # qwen-style tokenizers: ~4 for prose, ~3 for code; err towards more tokens
IMAGE_TOKENS = 768  # what Ollama's own truncation assumes per image
MESSAGE_OVERHEAD_TOKENS = 4  # role markers of a chat template


def estimate_tokens(ollama_payload):
    """Tokens the prompt will take: characters / 3.5 plus per-message and per-image overheads.

    Ollama has no tokenizer endpoint; erring high makes Claude Code compact a little early
    instead of letting Ollama silently drop the start of the conversation."""
    chars = 0
    extra = 0
    for message in ollama_payload["messages"]:
        chars += len(message.get("content", "")) + len(message.get("thinking", ""))
        for call in message.get("tool_calls", ()):
            chars += len(call["function"]["name"]) + len(json.dumps(call["function"]["arguments"]))
        extra += MESSAGE_OVERHEAD_TOKENS + IMAGE_TOKENS * len(message.get("images", ()))
    if "tools" in ollama_payload:
        chars += len(json.dumps(ollama_payload["tools"], separators=(",", ":")))
    return math.ceil(chars / CHARS_PER_TOKEN) + extra


###############################################################################
# Translation: Anthropic <-> Ollama, pure functions without I/O
###############################################################################

BILLING_HEADER_PREFIX = "x-anthropic-billing-header:"
STOP_REASONS = {"length": "max_tokens"}
# Stop sequences are matched by the proxy; these bound the matcher's size per request.
MAX_STOP_SEQUENCES = 64
MAX_STOP_SEQUENCE_CHARS = 128
MIN_THINKING_BUDGET = 1024  # Anthropic's floor for thinking.budget_tokens
REDACT_THINKING_BETA = "redact-thinking-"  # anthropic-beta: thinking comes back as redacted_thinking
TOOL_SCHEMA_TYPES = (None, "custom")


def resolve_model(name, config):
    """Claude names go to the configured model (per family via MODEL_MAP); other names pass through."""
    lowered = name.lower()
    if not lowered.startswith("claude"):
        return name
    for family in MODEL_FAMILIES:
        if family in lowered and family in config.model_map:
            return config.model_map[family]
    return config.model_map.get("default", config.ollama_model)


def strip_billing_header(text):
    """Drop Claude Code's per-request billing line: it is no instruction, and a prefix that changes on
    every call would make Ollama re-process the whole prompt each turn."""
    if BILLING_HEADER_PREFIX not in text:
        return text
    return "\n".join(line for line in text.split("\n")
                     if not line.lstrip().startswith(BILLING_HEADER_PREFIX)).strip("\n")


def _require_type(value, kinds, path, description):
    if isinstance(value, bool) and bool not in kinds:
        raise invalid(f"{path}: Input should be {description}")
    if not isinstance(value, kinds):
        raise invalid(f"{path}: Input should be {description}")
    return value


NON_FINITE_MARK = object()


def non_finite_field(text):
    """Where the first non-finite number of a JSON text stands, as a field path (a.0.b): for the
    400 that names it. Runs only for a body that already failed finite_float."""
    found = []

    def mark(number):
        value = float(number)
        if value - value != 0 and not found:
            found.append(number)
            return NON_FINITE_MARK
        return value

    try:
        stack = [("", json.loads(text, parse_float=mark))]
    except (ValueError, RecursionError):
        return "body"
    while stack:
        path, value = stack.pop()
        if value is NON_FINITE_MARK:
            return path or "body"
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        stack.extend((f"{path}.{key}" if path else str(key), item) for key, item in items)
    return "body"


def _require_number_between(body, key, low, high):
    value = body.get(key)
    if value is None:
        return
    _require_type(value, (int, float), key, "a valid number")
    if not low <= value <= high:
        raise invalid(f"{key}: Input should be between {low} and {high} (got {value})")


def _validate_thinking(thinking, max_tokens):
    if thinking.get("type") != "enabled":
        return
    if "budget_tokens" not in thinking:
        raise invalid("thinking.enabled.budget_tokens: Field required")
    budget = _require_type(thinking["budget_tokens"], (int,), "thinking.budget_tokens", "a valid integer")
    if budget < MIN_THINKING_BUDGET:
        raise invalid(f"thinking.budget_tokens: Input should be greater than or equal to {MIN_THINKING_BUDGET}")
    if max_tokens is not None and budget >= max_tokens:
        raise invalid(f"thinking.budget_tokens: `max_tokens` must be greater than `thinking.budget_tokens` "
                      f"({max_tokens} <= {budget})")


def _validate_stop_sequences(stops):
    _require_type(stops, (list,), "stop_sequences", "a valid list")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid(f"stop_sequences: at most {MAX_STOP_SEQUENCES} stop sequences are accepted "
                      f"(got {len(stops)})")
    for index, stop in enumerate(stops):
        _require_type(stop, (str,), f"stop_sequences.{index}", "a valid string")
        if len(stop) > MAX_STOP_SEQUENCE_CHARS:
            raise invalid(f"stop_sequences.{index}: a stop sequence may have at most "
                          f"{MAX_STOP_SEQUENCE_CHARS} characters (got {len(stop)})")


def validate_messages_request(body, *, default_max_tokens, for_count=False):
    """Check the fields the proxy uses, with messages that name the field; leave the rest alone.

    Without max_tokens the request gets default_max_tokens (DEFAULT_MAX_TOKENS)."""
    if not isinstance(body, dict):
        raise invalid("Request body must be a JSON object")
    if "model" not in body:
        raise invalid("model: Field required")
    model = _require_type(body["model"], (str,), "model", "a valid string")
    if not model.strip():
        raise invalid("model: String should have at least 1 character")
    if not for_count:
        if "max_tokens" not in body:
            body["max_tokens"] = default_max_tokens
        max_tokens = _require_type(body["max_tokens"], (int,), "max_tokens", "a valid integer")
        if max_tokens < 0:
            raise invalid("max_tokens: Input should be greater than or equal to 0")
        if "stream" in body and body["stream"] is not None:
            _require_type(body["stream"], (bool,), "stream", "a valid boolean")
    if "messages" not in body:
        raise invalid("messages: Field required")
    messages = _require_type(body["messages"], (list,), "messages", "a valid list")
    if not messages:
        raise invalid("messages: at least one message is required")
    for index, message in enumerate(messages):
        path = f"messages.{index}"
        _require_type(message, (dict,), path, "a valid dictionary")
        role = message.get("role")
        if role not in ("user", "assistant", "system"):
            raise invalid(f"{path}.role: Input should be 'user', 'assistant' or 'system'")
        if "content" not in message:
            raise invalid(f"{path}.content: Field required")
        _validate_content(message["content"], f"{path}.content")
    system = body.get("system")
    if system is not None:
        _validate_content(system, "system")
    _require_number_between(body, "temperature", 0, 1)
    _require_number_between(body, "top_p", 0, 1)
    if body.get("top_k") is not None:
        if _require_type(body["top_k"], (int,), "top_k", "a valid integer") < 0:
            raise invalid("top_k: Input should be greater than or equal to 0")
    stops = body.get("stop_sequences")
    if stops is not None:
        _validate_stop_sequences(stops)
    tools = body.get("tools")
    if tools is not None:
        _require_type(tools, (list,), "tools", "a valid list")
        for index, tool in enumerate(tools):
            _require_type(tool, (dict,), f"tools.{index}", "a valid dictionary")
            _require_type(tool.get("name"), (str,), f"tools.{index}.name", "a valid string")
            if tool.get("type") in TOOL_SCHEMA_TYPES:
                _require_type(tool.get("input_schema"), (dict,), f"tools.{index}.input_schema",
                              "a valid dictionary")
    choice = body.get("tool_choice")
    if choice is not None:
        _require_type(choice, (dict,), "tool_choice", "a valid dictionary")
        if choice.get("type") not in ("auto", "any", "tool", "none"):
            raise invalid("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
        if choice["type"] == "tool":
            _require_type(choice.get("name"), (str,), "tool_choice.name", "a valid string")
            if choice["name"] not in {tool.get("name") for tool in tools or ()}:
                raise invalid(f"tool_choice.name: tool {choice['name']!r} is not in tools")
    for key in ("thinking", "metadata", "output_config"):
        if body.get(key) is not None:
            _require_type(body[key], (dict,), key, "a valid dictionary")
    if body.get("thinking") is not None:
        _validate_thinking(body["thinking"], None if for_count else body["max_tokens"])
    return body


def _validate_content(content, path):
    if isinstance(content, str):
        return
    _require_type(content, (list,), path, "a valid string or a list of content blocks")
    for index, block in enumerate(content):
        block_path = f"{path}.{index}"
        _require_type(block, (dict,), block_path, "a valid dictionary")
        _require_type(block.get("type"), (str,), f"{block_path}.type", "a valid string")


def system_text(system):
    """The system prompt as one string: blocks joined by blank lines, billing header removed."""
    if system is None:
        return ""
    if isinstance(system, str):
        return strip_billing_header(system)
    parts = []
    for block in system:
        text = block.get("text")
        if isinstance(text, str):
            text = strip_billing_header(text)
            if text:
                parts.append(text)
    return "\n\n".join(parts)


def system_reminder(text):
    """A system note as user-role text, the way Claude Code itself writes its reminders."""
    if text.startswith("<system-reminder>"):
        return text
    return f"<system-reminder>\n{text}\n</system-reminder>"


def merge_consecutive_turns(messages):
    """The Messages API treats consecutive same-role turns as one turn; so do we.

    A `system` entry inside messages becomes user-role text at its place: Ollama's templates
    join every system message into the head of the prompt, so a nudge between turns would
    change the prompt from the top (losing Ollama's prompt cache) and reach the model out of place.

    Each merged turn is (role, [(path, block)]): the path is where the block stood in the
    client's request, so an error names what the client sent."""
    merged = []
    for index, message in enumerate(messages):
        content = message["content"]
        role = message["role"]
        if role == "system":
            text = system_text(content)
            if not text:
                continue
            role, blocks = "user", [(f"messages.{index}.content", {"type": "text", "text": system_reminder(text)})]
        elif isinstance(content, str):
            blocks = [(f"messages.{index}.content", {"type": "text", "text": content})]
        else:
            blocks = [(f"messages.{index}.content.{n}", block) for n, block in enumerate(content)]
        if merged and merged[-1][0] == role:
            merged[-1][1].extend(blocks)
        else:
            merged.append((role, blocks))
    return merged


class MessageConversion:
    """What converting one request's messages carries from turn to turn."""

    def __init__(self, can_see=True, thinking_seal=None):
        self.can_see = can_see
        self.thinking_seal = thinking_seal
        self.tool_names = {}  # tool_use id -> tool name, for Ollama's tool_name
        self.call_positions = {}  # tool_use id -> place in the latest assistant turn
        self.left_out = []  # notes for blocks the model can't read, logged once per request

    def note(self, text):
        self.left_out.append(text)
        return text

    def sealed_thinking(self, sealed, path):
        """The thinking this proxy sealed, or None (and a note) for a seal it cannot open."""
        if not isinstance(sealed, str) or not sealed:
            return None
        text = self.thinking_seal.open(sealed) if self.thinking_seal is not None else None
        if text is None:
            self.note(f"[thinking at {path} left out: sealed by another key (THINKING_KEY_FILE changed, "
                      f"the proxy restarted without one, or another server made it)]")
        return text


def human_size(size):
    if size < 1024:
        return f"{size} bytes"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KB"
    return f"{size / (1024 * 1024):.1f} MB"


def _base64_size(data):
    return len(data) * 3 // 4 - data[-2:].count("=")


def _one_line(value, limit=200):
    """A client's string as it may appear in a note and the log: one line, bounded."""
    text = re.sub(r"[\x00-\x1f\x7f]", " ", str(value))
    return text if len(text) <= limit else text[:limit] + "..."


def _unreadable_note(kind, source, why):
    """A one-line stand-in for content Ollama can't take: what it was, how big, and why it is left out."""
    source_kind = source.get("type")
    if source_kind == "base64" and isinstance(source.get("data"), str):
        media = _one_line(source.get("media_type") or "unknown type", 80)
        what = f"{kind} ({media}, {human_size(_base64_size(source['data']))})"
    elif source_kind == "url":
        what = f"{kind} at {_one_line(source.get('url'))}"
    elif source_kind == "file":
        what = f"{kind} file {_one_line(source.get('file_id'), 80)}"
    else:
        what = f"{kind} ({_one_line(source_kind, 40)} source)"
    return f"[{what} left out: {why}]"


def _image(block, path, conversion):
    """An image -> ("image", base64 data) for Ollama, or ("text", note) when the model can't take it."""
    source = block.get("source")
    if not isinstance(source, dict):
        raise invalid(f"{path}.source: Field required")
    if source.get("type") == "base64":
        data = source.get("data")
        if not isinstance(data, str) or not data:
            raise invalid(f"{path}.source.data: Field required")
        if conversion.can_see:
            return "image", data
        return "text", conversion.note(_unreadable_note("image", source, "this model can't see images"))
    return "text", conversion.note(_unreadable_note("image", source, "this proxy passes on only inline images"))


def _document_text(block, path, conversion):
    source = block.get("source")
    if not isinstance(source, dict):
        raise invalid(f"{path}.source: Field required")
    kind = source.get("type")
    if kind == "text" and isinstance(source.get("data"), str):
        text = source["data"]
    elif kind == "content":
        inner = source.get("content")
        if isinstance(inner, str):
            text = inner
        elif isinstance(inner, list):
            text = "\n".join(b["text"] for b in inner if isinstance(b, dict) and isinstance(b.get("text"), str))
        else:
            raise invalid(f"{path}.source.content: Input should be a valid string or list")
    else:
        # Claude Code's Read of a PDF sends one; a 400 would end the session, as the block stays in history.
        kind_name = "PDF document" if source.get("media_type") == "application/pdf" else "document"
        return conversion.note(_unreadable_note(kind_name, source, f"this model can't read {kind_name}s"))
    title = block.get("title")
    return f"{title}\n\n{text}" if isinstance(title, str) and title else text


def _tool_result_message(block, path, conversion):
    tool_use_id = block.get("tool_use_id")
    _require_type(tool_use_id, (str,), f"{path}.tool_use_id", "a valid string")
    content = block.get("content")
    texts, images = [], []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for index, inner in enumerate(content):
            inner_path = f"{path}.content.{index}"
            _require_type(inner, (dict,), inner_path, "a valid dictionary")
            kind = inner.get("type")
            if kind == "image":
                shape, value = _image(inner, inner_path, conversion)
                (images if shape == "image" else texts).append(value)
            elif kind == "document":
                texts.append(_document_text(inner, inner_path, conversion))
            elif kind == "tool_reference":
                texts.append(f"Tool loaded: {inner.get('tool_name', '')}")
            elif isinstance(inner.get("text"), str):
                texts.append(inner["text"])
            else:
                raise invalid(f"{inner_path}.type: content block {kind!r} is not supported in a tool_result")
    elif content is not None:
        raise invalid(f"{path}.content: Input should be a valid string or list")
    text = "\n".join(texts)
    if block.get("is_error") is True:
        # Ollama has no error flag on tool messages; the model still has to know.
        text = "Error: " + text
    message = {"role": "tool", "content": text, "tool_call_id": tool_use_id}
    name = conversion.tool_names.get(tool_use_id)
    if name:
        message["tool_name"] = name
    if images:
        message["images"] = images
    return message


def _user_messages(blocks, conversion):
    tool_messages, texts, images = [], [], []
    for block_path, block in blocks:
        kind = block["type"]
        if kind == "text":
            texts.append(_require_type(block.get("text"), (str,), f"{block_path}.text", "a valid string"))
        elif kind == "tool_result":
            tool_messages.append(_tool_result_message(block, block_path, conversion))
        elif kind == "image":
            shape, value = _image(block, block_path, conversion)
            (images if shape == "image" else texts).append(value)
        elif kind == "document":
            texts.append(_document_text(block, block_path, conversion))
        elif kind in ("thinking", "redacted_thinking"):
            continue
        elif isinstance(block.get("text"), str):
            texts.append(block["text"])
        else:
            raise invalid(f"{block_path}.type: content block {kind!r} is not supported by this proxy")
    # Parallel calls finish in any order, but Ollama's templates pair results with calls by
    # position: results go in the order of the calls they answer, unmatched ones after.
    unmatched = len(conversion.call_positions)
    out = sorted(tool_messages, key=lambda m: conversion.call_positions.get(m["tool_call_id"], unmatched))
    if texts or images:
        user = {"role": "user", "content": "\n\n".join(texts)}
        if images:
            user["images"] = images
        out.append(user)
    return out


def _assistant_message(blocks, conversion):
    texts, thinking, calls = [], [], []
    for block_path, block in blocks:
        kind = block["type"]
        if kind == "text":
            texts.append(_require_type(block.get("text"), (str,), f"{block_path}.text", "a valid string"))
        elif kind == "tool_use":
            call_id = _require_type(block.get("id"), (str,), f"{block_path}.id", "a valid string")
            name = _require_type(block.get("name"), (str,), f"{block_path}.name", "a valid string")
            arguments = block.get("input", {})
            _require_type(arguments, (dict,), f"{block_path}.input", "a valid dictionary")
            conversion.tool_names[call_id] = name
            calls.append({"id": call_id, "function": {"name": name, "arguments": arguments}})
        elif kind == "thinking" and isinstance(block.get("thinking"), str) and block["thinking"]:
            thinking.append(block["thinking"])
        elif kind in ("thinking", "redacted_thinking"):
            # Hidden thinking (display omitted, redact-thinking): its text travels in the seal.
            text = conversion.sealed_thinking(block.get("signature" if kind == "thinking" else "data"),
                                              block_path)
            if text:
                thinking.append(text)
        # Server-tool blocks are the model's own artefacts: nothing to pass on.
    conversion.call_positions = {call["id"]: position for position, call in enumerate(calls)}
    if not texts and not thinking and not calls:
        return None
    message = {"role": "assistant", "content": "\n\n".join(texts)}
    if thinking:
        message["thinking"] = "\n\n".join(thinking)
    if calls:
        message["tool_calls"] = calls
    return message


def ollama_messages(request, conversion=None):
    """Anthropic system + messages -> Ollama chat messages (PROTOCOL C.2)."""
    conversion = conversion or MessageConversion()
    out = []
    system = system_text(request.get("system"))
    if system:
        out.append({"role": "system", "content": system})
    for role, blocks in merge_consecutive_turns(request["messages"]):
        if role == "user":
            out.extend(_user_messages(blocks, conversion))
        else:
            assistant = _assistant_message(blocks, conversion)
            if assistant:
                out.append(assistant)
    return out


def carries_images(request):
    """Whether any message holds an image block, at the top of a turn or inside a tool result."""
    for message in request["messages"]:
        content = message["content"]
        if not isinstance(content, list):
            continue
        for block in content:
            if block.get("type") == "image":
                return True
            inner = block.get("content") if block.get("type") == "tool_result" else None
            if isinstance(inner, list) and any(isinstance(b, dict) and b.get("type") == "image" for b in inner):
                return True
    return False


def loaded_tool_names(messages):
    """Deferred tools the conversation has loaded: names in tool_reference blocks of tool results
    (what ToolSearch returns), in the order they were first loaded."""
    names = {}
    for message in messages:
        if message["role"] != "user" or not isinstance(message["content"], list):
            continue
        for block in message["content"]:
            inner = block.get("content") if block.get("type") == "tool_result" else None
            if not isinstance(inner, list):
                continue
            for reference in inner:
                if isinstance(reference, dict) and reference.get("type") == "tool_reference" \
                        and isinstance(reference.get("tool_name"), str):
                    names.setdefault(reference["tool_name"], None)
    return list(names)


def client_tools(request):
    """Tools the model may call: client tools, plus deferred ones the conversation has loaded,
    minus any tool_choice excludes.

    Loaded deferred tools go last, in the order they were loaded: Ollama renders the tool list
    near the head of the prompt, so appending keeps the longest prefix it has already processed."""
    tools = request.get("tools") or []
    choice = request.get("tool_choice") or {}
    if choice.get("type") == "none":
        return []
    client = [tool for tool in tools if tool.get("type") in TOOL_SCHEMA_TYPES]
    offered = [tool for tool in client if not tool.get("defer_loading")]
    deferred = {tool["name"]: tool for tool in client if tool.get("defer_loading")}
    offered += [deferred[name] for name in loaded_tool_names(request["messages"]) if name in deferred]
    if choice.get("type") == "tool":  # naming a deferred tool loads it: the forced call must be possible
        offered = [tool for tool in client if tool["name"] == choice["name"]]
    return offered


# JSON-Schema keys that tell a validator about the schema itself, not the model about the
# arguments; Ollama drops them before rendering anyway (PROTOCOL B.2), so sending them only
# inflates the request and the token estimate. Constraints (enum, minimum, maxLength, default,
# format, ...) stay: they say what a valid argument is.
SCHEMA_METADATA_KEYS = frozenset(("$schema", "$id", "$comment", "title", "examples"))
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def lean_schema(schema):
    """A tool's input schema without validator metadata; property names are kept whatever they are."""
    if not isinstance(schema, dict):
        return schema
    lean = {}
    for key, value in schema.items():
        if key in SCHEMA_METADATA_KEYS or (key == "additionalProperties" and isinstance(value, bool)):
            continue
        if key in SCHEMA_MAPS and isinstance(value, dict):
            value = {name: lean_schema(inner) for name, inner in value.items()}
        elif key in SCHEMA_LISTS and isinstance(value, list):
            value = [lean_schema(inner) for inner in value]
        elif key in ("items", "not", "additionalProperties", "contains"):
            value = [lean_schema(inner) for inner in value] if isinstance(value, list) else lean_schema(value)
        lean[key] = value
    return lean


def forces_tool_use(request):
    """tool_choice any or tool: Anthropic guarantees the answer is a tool_use."""
    return (request.get("tool_choice") or {}).get("type") in ("any", "tool")


def forced_tool_format(tools):
    """Ollama's `format` (a JSON schema its sampler enforces) that leaves the model no answer but a
    call to one of the tools: {"name": N, "arguments": N's input}, one branch per tool, so that one
    tool's name never comes with another tool's arguments."""
    calls = [{"type": "object",
              "properties": {"name": {"const": tool["name"]}, "arguments": lean_schema(tool["input_schema"])},
              "required": ["name", "arguments"]}
             for tool in tools]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


# How much of a schema one check may walk: a $ref cycle or nested anyOf branches (a client's
# schema, so possibly made to explode) must end. What lies beyond is taken as valid: Ollama's
# sampler has already held the output to the schema where it can.
SCHEMA_CHECK_STEPS = 10000
SCHEMA_CHECK_DEPTH = 64  # and how deep: each level of a value or a $ref is a call
JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
              "number": (int, float), "integer": int}


def schema_violation(value, schema):
    """Where decoded JSON breaks a tool's input_schema, or None."""
    return SchemaCheck(schema).violation(value, schema, "input")


class SchemaCheck:
    """One check of a value against a JSON schema, which finds only what is surely wrong: type,
    enum, const, properties, required, additionalProperties, items, prefixItems, lengths and
    bounds, allOf, anyOf and local $refs are checked. What it cannot judge counts as valid: a
    client's regular expressions (pattern, patternProperties) are not run on a model's output,
    as they could take any time; oneOf is read as anyOf and `not` is skipped, since an unjudged
    keyword would make a valid value seem to match more branches, or the excluded one."""

    def __init__(self, root):
        self.root = root
        self.steps_left = SCHEMA_CHECK_STEPS

    def violation(self, value, schema, path, depth=0):
        self.steps_left -= 1
        if not isinstance(schema, dict) or self.steps_left < 0 or depth > SCHEMA_CHECK_DEPTH:
            return None
        reference = schema.get("$ref")
        if isinstance(reference, str) and reference.startswith("#"):
            found = self.violation(value, self._resolve(reference), path, depth + 1)
            if found:
                return found
        kinds = schema.get("type")
        kinds = [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else None
        if kinds is not None and not any(_json_type_is(value, kind) for kind in kinds):
            return f"{path} is not of type {' or '.join(map(str, kinds))}"
        if "const" in schema and not _json_equal(value, schema["const"]):
            return f"{path} is not {schema['const']!r}"
        if isinstance(schema.get("enum"), list) and not any(_json_equal(value, item) for item in schema["enum"]):
            return f"{path} is not one of the allowed values"
        found = _bound_violation(value, schema, path)
        if found is None and isinstance(value, dict):
            found = self._object(value, schema, path, depth)
        elif found is None and isinstance(value, list):
            found = self._array(value, schema, path, depth)
        return found or self._combined(value, schema, path, depth)

    def _resolve(self, reference):
        target = self.root
        for part in reference[2:].split("/") if reference != "#" else ():
            target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
        return target

    def _object(self, value, schema, path, depth):
        required = schema.get("required")
        for name in required if isinstance(required, list) else ():
            if isinstance(name, str) and name not in value:
                return f"{path} lacks the required {name!r}"
        properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        additional = schema.get("additionalProperties")
        for name, item in value.items():
            if name in properties:
                found = self.violation(item, properties[name], f"{path}.{name}", depth + 1)
            elif schema.get("patternProperties"):
                found = None  # which pattern a name matches is not judged: neither allowed nor refused
            elif additional is False:
                found = f"{path} has {name!r}, which the schema does not allow"
            else:
                found = self.violation(item, additional, f"{path}.{name}", depth + 1)
            if found:
                return found
        return None

    def _array(self, value, schema, path, depth):
        prefix = schema.get("prefixItems") if isinstance(schema.get("prefixItems"), list) else []
        items = schema.get("items")
        if isinstance(items, list):  # draft 4-7 tuples
            prefix, items = items, schema.get("additionalItems")
        for index, item in enumerate(value):
            inner = prefix[index] if index < len(prefix) else items
            if inner is False:
                return f"{path} has more items than the schema allows"
            found = self.violation(item, inner, f"{path}[{index}]", depth + 1)
            if found:
                return found
        return None

    def _combined(self, value, schema, path, depth):
        for key in ("allOf", "anyOf", "oneOf"):
            branches = schema.get(key)
            if not isinstance(branches, list) or not branches:
                continue
            matching = sum(1 for inner in branches if self.violation(value, inner, path, depth + 1) is None)
            if key == "allOf" and matching < len(branches) or key != "allOf" and not matching:
                return f"{path} does not match {key}"
        return None


def _json_type_is(value, kind):
    wanted = JSON_TYPES.get(kind)
    if wanted is None:
        return True  # a type this check does not know: not ours to refuse
    if isinstance(value, bool):
        return kind == "boolean"
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, wanted)


def _json_equal(a, b):
    """JSON equality: true is not 1, and 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    return a == b


def _bound_violation(value, schema, path):
    if isinstance(value, str):
        checks = (("minLength", lambda n: len(value) < n), ("maxLength", lambda n: len(value) > n))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        checks = (("minimum", lambda n: value < n), ("maximum", lambda n: value > n),
                  ("exclusiveMinimum", lambda n: value <= n), ("exclusiveMaximum", lambda n: value >= n))
    elif isinstance(value, list):
        checks = (("minItems", lambda n: len(value) < n), ("maxItems", lambda n: len(value) > n))
    else:
        return None
    for key, broken in checks:
        bound = schema.get(key)
        if isinstance(bound, (int, float)) and not isinstance(bound, bool) and broken(bound):
            return f"{path} breaks {key} {bound}"
    return None


def ollama_tools(tools):
    return [{"type": "function",
             "function": {"name": tool["name"], "description": tool.get("description", ""),
                          "parameters": lean_schema(tool["input_schema"])}}
            for tool in tools]


def thinking_requested(request):
    thinking = request.get("thinking") or {}
    return thinking.get("type") in ("enabled", "adaptive")


def ollama_think(request):
    """Ollama's think value for a model that can think: it turns thinking on by itself when the
    field is missing, so always say what the client asked."""
    if not thinking_requested(request):
        return False
    effort = (request.get("output_config") or {}).get("effort")
    if not isinstance(effort, str):
        return True
    return {"xhigh": "high", "max": "high"}.get(effort, effort)


def thinking_hidden(request, beta):
    """How thinking the client may not read goes back: "omitted" (a thinking block with empty text
    and the text sealed in its signature, for display omitted), "redacted" (a redacted_thinking
    block whose data is the seal, under the redact-thinking beta), or None (shown, or not asked)."""
    if not thinking_requested(request):
        return None
    if any(name.strip().startswith(REDACT_THINKING_BETA) for name in beta.split(",")):
        return "redacted"
    return "omitted" if (request.get("thinking") or {}).get("display") == "omitted" else None


class ThinkingKeyError(Exception):
    """THINKING_KEY_FILE cannot be read, created, or holds too short a key."""


class ThinkingSeal:
    """Thinking text sealed into an opaque string that only a proxy with the same key can open,
    so that a client can neither read hidden thinking nor plant text the model takes for its own
    reasoning.

    A seal is base64 of: version byte, 16-byte random nonce, the UTF-8 text XORed with a SHAKE-256
    keystream of (cipher key, nonce), and an HMAC-SHA256 over all of that (encrypt-then-MAC). Both
    keys derive from the one key by HMAC. A seal made with another key (THINKING_KEY_FILE changed,
    or a restart without one) or altered in any bit opens to None: that thinking is left out."""

    VERSION = b"\x01"
    NONCE_BYTES = 16
    TAG_BYTES = 32
    MIN_KEY_BYTES = 16

    def __init__(self, key):
        self._cipher_key = hmac.digest(key, b"simple_api_proxy thinking cipher", "sha256")
        self._mac_key = hmac.digest(key, b"simple_api_proxy thinking mac", "sha256")

    @classmethod
    def from_key_file(cls, path):
        """The key in path (created with a random key, readable by its owner only, when missing);
        without a path, a random key that lives as long as the process."""
        if not path:
            return cls(secrets.token_bytes(32))
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ThinkingKeyError(f"cannot create THINKING_KEY_FILE {path!r}: {exc.strerror}") from None
        else:
            with os.fdopen(descriptor, "w") as created:
                created.write(secrets.token_hex(32) + "\n")
        try:
            with open(path, "rb") as existing:
                key = existing.read(4096).strip()
        except OSError as exc:
            raise ThinkingKeyError(f"cannot read THINKING_KEY_FILE {path!r}: {exc.strerror}") from None
        if len(key) < cls.MIN_KEY_BYTES:
            raise ThinkingKeyError(f"THINKING_KEY_FILE {path!r} holds {len(key)} bytes; a key needs at least "
                                   f"{cls.MIN_KEY_BYTES} (delete the file to have a new one made)")
        return cls(key)

    def _xor(self, nonce, data):
        stream = hashlib.shake_256(self._cipher_key + nonce).digest(len(data))
        return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(len(data), "big")

    def seal(self, text):
        nonce = secrets.token_bytes(self.NONCE_BYTES)
        body = self.VERSION + nonce + self._xor(nonce, text.encode("utf-8"))
        return base64.b64encode(body + hmac.digest(self._mac_key, body, "sha256")).decode("ascii")

    def open(self, sealed):
        """The text in a seal this key made, else None."""
        try:
            raw = base64.b64decode(sealed, validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(raw) < 1 + self.NONCE_BYTES + self.TAG_BYTES or raw[:1] != self.VERSION:
            return None
        body, tag = raw[:-self.TAG_BYTES], raw[-self.TAG_BYTES:]
        if not hmac.compare_digest(tag, hmac.digest(self._mac_key, body, "sha256")):
            return None
        nonce = body[1:1 + self.NONCE_BYTES]
        return self._xor(nonce, body[1 + self.NONCE_BYTES:]).decode("utf-8", "replace")


# Tools Anthropic runs on its own servers, by the start of their type (web_search_20250305, ...):
# the block that carries their result and that block's error type (the SDKs' types).
SERVER_TOOL_RESULTS = (("web_search_", "web_search_tool_result", "web_search_tool_result_error"),
                       ("web_fetch_", "web_fetch_tool_result", "web_fetch_tool_result_error"),
                       ("code_execution_", "code_execution_tool_result", "code_execution_tool_result_error"),
                       ("tool_search_tool_", "tool_search_tool_result", "tool_search_tool_result_error"))


def server_tool_result_types(tool):
    """(result block type, error type) for a server tool, None for any other tool."""
    kind = tool.get("type")
    if not isinstance(kind, str):
        return None
    for prefix, result_type, error_type in SERVER_TOOL_RESULTS:
        if kind.startswith(prefix):
            return result_type, error_type
    return None


def server_tools(request):
    return [tool for tool in request.get("tools") or () if server_tool_result_types(tool)]


def demanded_server_tool(request):
    """The server tool a request is made for, else None: the one tool_choice names, or the first
    when server tools are all the tools offered (Claude Code's WebSearch sends web_search alone,
    with tool_choice auto) and tool_choice is not none. The proxy cannot run one, and a model that
    answers such a request makes up what the tool would have found."""
    tools = server_tools(request)
    choice = request.get("tool_choice") or {}
    if not tools or choice.get("type") == "none":
        return None
    if choice.get("type") == "tool":
        return next((tool for tool in tools if tool["name"] == choice["name"]), None)
    return None if client_tools(request) else tools[0]


def server_tool_unavailable(tool, model, input_tokens):
    """Anthropic's answer when a server tool cannot run: its call, then its result holding the
    error `unavailable`; no request was made, so the server_tool_use counts are 0."""
    result_type, error_type = server_tool_result_types(tool)
    call_id = new_id("srvtoolu_")
    content = [{"type": "server_tool_use", "id": call_id, "name": tool["name"], "input": {}},
               {"type": result_type, "tool_use_id": call_id,
                "content": {"type": error_type, "error_code": "unavailable"}}]
    message = message_object(new_id("msg_"), model, content, "end_turn", None, input_tokens, 0)
    message["usage"]["server_tool_use"] = {"web_search_requests": 0, "web_fetch_requests": 0}
    return message


def server_tools_note(tools):
    """What the model is told when server tools are offered beside tools it can call: it is not
    offered them, and must not answer as if it had used them."""
    names = ", ".join(sorted({tool["name"] for tool in tools}))
    return (f"The tools {names} are not available here (they run on Anthropic's servers, which this "
            f"model cannot reach). Never answer as if you had used them or seen their results; if a task "
            f"needs them, say that they are not available.")


def anthropic_to_ollama(request, ollama_model, config, *, can_see=True, notes=None, thinking_seal=None):
    """A validated Anthropic Messages request -> (the body of Ollama's POST /api/chat, the prompt's
    estimated tokens).

    can_see: the model takes images (else they become notes). notes, a list, gets one line per
    thing the model will not see as sent (blocks it can't read, tool results cut to fit).
    thinking_seal opens the thinking this proxy sealed into signatures (ThinkingSeal)."""
    options = {"num_ctx": config.ollama_num_ctx, "num_predict": request["max_tokens"]}
    for key in ("temperature", "top_p", "top_k"):
        if request.get(key) is not None:
            options[key] = request[key]
    conversion = MessageConversion(can_see=can_see, thinking_seal=thinking_seal)
    messages = ollama_messages(request, conversion)
    unrunnable = server_tools(request)
    if unrunnable:
        note = server_tools_note(unrunnable)
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] += "\n\n" + note
        else:
            messages.insert(0, {"role": "system", "content": note})
    payload = {"model": ollama_model, "messages": messages, "stream": True, "options": options}
    tools = client_tools(request)
    if tools:
        payload["tools"] = ollama_tools(tools)
    output_format = (request.get("output_config") or {}).get("format")
    if isinstance(output_format, dict) and isinstance(output_format.get("schema"), dict):
        payload["format"] = output_format["schema"]
    if tools and forces_tool_use(request):
        # The tools go along too: their descriptions are in the model's prompt that way.
        payload["format"] = forced_tool_format(tools)
    if config.ollama_keep_alive:
        payload["keep_alive"] = keep_alive_value(config.ollama_keep_alive)
    cut, input_tokens = fit_to_window(payload, request["max_tokens"], config.ollama_num_ctx)
    if notes is not None:
        notes.extend(conversion.left_out)
        if cut:
            notes.append(cut)
    return payload, input_tokens


def keep_alive_value(text):
    """OLLAMA_KEEP_ALIVE as Ollama reads it: a bare number is seconds, else a duration like 30m."""
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def load_request(ollama_model, config):
    """The body that makes Ollama load a model and answer at once (done_reason "load"), with the
    num_ctx and keep_alive real requests carry: another num_ctx would load it again."""
    payload = {"model": ollama_model, "messages": [], "stream": False,
               "options": {"num_ctx": config.ollama_num_ctx}}
    if config.ollama_keep_alive:
        payload["keep_alive"] = keep_alive_value(config.ollama_keep_alive)
    return payload


def conversation_key(payload):
    """A conversation's identity across turns: its system prompt and first user message."""
    system, first_user = "", ""
    for message in payload["messages"]:
        if message["role"] == "system" and not system:
            system = message.get("content") or ""
        elif message["role"] == "user":
            first_user = message.get("content") or ""
            break
    digest = hashlib.blake2b(system.encode("utf-8", "replace"), digest_size=16)
    digest.update(b"\0" + first_user.encode("utf-8", "replace"))
    return digest.digest()


def same_model(wanted, name):
    """Ollama's naming: a model without a tag is its :latest."""
    return name == wanted or (":" not in wanted and name == wanted + ":latest")


def model_object(model):
    """An entry of Ollama's /api/tags as an Anthropic model object."""
    created = model.get("modified_at") or "1970-01-01T00:00:00Z"
    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)", str(created))
    details = model.get("details") or {}
    size = details.get("parameter_size")
    display = f"{model['name']} ({size})" if size else model["name"]
    return {"type": "model", "id": model["name"], "display_name": display,
            "created_at": (match.group(1) + "Z") if match else "1970-01-01T00:00:00Z"}


def message_object(message_id, model, content, stop_reason, stop_sequence, input_tokens, output_tokens):
    """An Anthropic Message; Ollama has no prompt caching to report, so its cache counts are 0."""
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}


def empty_message(model, input_tokens, stop_reason="end_turn"):
    return message_object(new_id("msg_"), model, [], stop_reason, None, input_tokens, 0)


def message_to_events(message):
    """A complete Anthropic message as the SSE events that would have streamed it (cache replays)."""
    start = dict(message, content=[], stop_reason=None, stop_sequence=None,
                 usage=dict(message["usage"], output_tokens=0))
    events = [("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(message["content"]):
        kind = block["type"]
        deltas = []
        if kind == "text":
            opening, deltas = {"type": "text", "text": ""}, [{"type": "text_delta", "text": block["text"]}]
        elif kind == "thinking":
            opening = {"type": "thinking", "thinking": "", "signature": ""}
            if block["thinking"] or not block["signature"]:
                deltas.append({"type": "thinking_delta", "thinking": block["thinking"]})
            if block["signature"]:
                deltas.append({"type": "signature_delta", "signature": block["signature"]})
        elif kind in ("tool_use", "server_tool_use"):
            opening = {"type": kind, "id": block["id"], "name": block["name"], "input": {}}
            deltas.append({"type": "input_json_delta", "partial_json": json.dumps(block["input"])})
        else:  # redacted thinking and server tool results arrive whole
            opening = block
        events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                               "content_block": opening}))
        events.extend(("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
                      for delta in deltas)
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    events.append(("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": message["stop_reason"],
                                               "stop_sequence": message["stop_sequence"]},
                                     "usage": message["usage"]}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


###############################################################################
# Tool calls written as text
###############################################################################
# Small models often write a tool call as text instead of Ollama's structured tool_calls:
# qwen2.5-coder as bare JSON (ollama/ollama#12174), qwen3-coder and qwen3.5 as Qwen's XML
# (ollama/ollama#14745), Llama, Gemma 4 and Mistral behind their own markers. A reply becomes
# tool_use blocks only when it consists of such calls, each naming an offered tool; a tagged
# call may follow a short preamble. Everything else stays text. StreamTranslator's gate uses
# call_prospect() to hold text back only while it can still become a call, and the final
# decision is always find_text_tool_calls() on the whole reply, so streamed and collected
# replies agree.

# Markers that open calls after an optional preamble, each at the start of a line.
TAGGED_OPENERS = ("<tool_call>", "<function=", "<function_calls>", "<|python_tag|>",
                  "<|python_start|>", "<|tool_call>", "[TOOL_CALLS]")
# What opens a reply that is nothing but calls: JSON, bare or in a fence.
UNTAGGED_OPENERS = ("{", "[", "```")
# Special tokens some runtimes leave in the text after the calls.
END_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|python_end|>", "<tool_call|>", "<|tool_response>")
# How a reply that holds complete calls ends. One cut short (max_tokens, a stop sequence) must end
# so: Qwen's XML parses without its closing tags, and a cut argument ("rm -rf /tmp/build" stopped
# at "rm -rf /") must never run.
CLOSED_CALL_ENDINGS = ("</function>", "</tool_call>", "</function_calls>", "}", "]", "```") + END_TOKENS
PREAMBLE_LIMIT = 1000  # characters of prose a tagged call may follow
# A preamble that shows an example or refuses: the call after it must not run.
EXAMPLE_OR_REFUSAL = re.compile(
    r"\b(?:for (?:example|instance)|an example|example\s*:|e\.g\.|would look like|the syntax|cannot|can ?not"
    r"|can['’]t|won['’]t|unable to|not able to|not allowed|looks? like (?:this|so|the following)|instead of"
    r"|how to|you (?:would|could|can|might|should)"
    r"|(?:do not|don['’]t|never|should ?not|shouldn['’]t|must ?not|mustn['’]t)\s+(?:\w+\s+){0,2}?"
    r"(?:run|execute|use|call|type|try)\b)", re.I)
LINE_START_OPENER = re.compile(r"^[ \t]*(?:" + "|".join(map(re.escape, TAGGED_OPENERS)) + ")", re.M)

CALL_KEYS = frozenset({"name", "arguments", "parameters", "args", "input", "type", "id"})
ARGUMENT_KEYS = ("arguments", "parameters", "args", "input")
NESTED_CALL_KEYS = frozenset({"type", "function", "id", "index"})  # OpenAI's {"function": {...}}
FIRST_KEYS = CALL_KEYS | NESTED_CALL_KEYS | {"tool_calls"}

# Every pattern and loop below is linear in the reply's length: the parse holds the interpreter lock,
# so a reply of whitespace, unclosed fences or thousands of tags must not stall other clients.
# Closing markers are found with str.find or one search from where the call starts, never by a lazy
# (.*?) that a missing close turns into a rescan per character.
SPACE = re.compile(r"\s*")
END_TOKEN = re.compile("|".join(map(re.escape, END_TOKENS)))
QWEN_PARAMETER = re.compile(r"<parameter=(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>)|\Z)", re.S)
INVOKE = re.compile(r'\s*<invoke name="([^"]*)">(.*?)(?:</invoke>|\Z)', re.S)
INVOKE_PARAMETER = re.compile(r'\s*<parameter name="([^"]*)">(.*?)</parameter>', re.S)
MISTRAL_NAMED = re.compile(r"\s*([\w.-]+)\s*(?:\[CALL_ID\]\s*\w*\s*)?\[ARGS\]")
GEMMA_QUOTE = '<|"|>'
GEMMA_KEY = re.compile(r"\s*([A-Za-z_][\w.-]*)")
GEMMA_ATOM = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null")


def offered_tools(tools):
    """Offered tools as {name: input_schema}, from such a mapping or from bare names."""
    if isinstance(tools, dict):
        return {name: schema if isinstance(schema, dict) else {} for name, schema in tools.items()}
    return {name: {} for name in tools}


def _skip_space(text, position):
    return SPACE.match(text, position).end()


def _json_values(text, separators=""):
    """Consecutive JSON values making up the whole text, or None. separators: one character that
    may stand, with whitespace around it, between two values."""
    values, position = [], 0
    skip = re.compile(r"[\s%s]*" % re.escape(separators)) if separators else SPACE
    while True:
        position = skip.match(text, position).end()
        if position == len(text):
            return values or None
        try:
            value, position = _decode_json_value(text, position)
        except ValueError:
            return None
        values.append(value)


_decode_json_value = json.JSONDecoder().raw_decode


def _bracket_end(text, position):
    """Index just past the bracket that closes the one at position, minding quoted strings."""
    depth, quote, escaped = 0, None, False
    for index in range(position, len(text)):
        char = text[index]
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                return index + 1
    return None


def _literal_value(text, position):
    """A JSON value at position, else a Python literal (Mistral writes both), and where it ends."""
    try:
        return _decode_json_value(text, position)
    except ValueError:
        pass
    end = _bracket_end(text, position)
    if end is None:
        return None
    try:
        value = ast.literal_eval(text[position:end])
        _compact_json(value)  # sets, bytes and the like are no tool input
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return value, end


def _json_call(item, tools):
    """{"name", "arguments"} and its variants (parameters, args, input; OpenAI's nesting) -> a call."""
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("function"), dict):
        if set(item) - NESTED_CALL_KEYS or item.get("type", "function") != "function":
            return None
        item = item["function"]
    if set(item) - CALL_KEYS or item.get("type", "function") != "function":
        return None
    name = item.get("name")
    if not isinstance(name, str) or name not in tools:
        return None
    given = [key for key in ARGUMENT_KEYS if key in item]
    if len(given) > 1:
        return None
    arguments = item[given[0]] if given else {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"name": name, "input": arguments}


def _calls_from_json(value, tools):
    """The calls a decoded JSON value is: one, a list of them, or {"tool_calls": [...]}; else None."""
    if isinstance(value, dict) and set(value) == {"tool_calls"}:
        value = value["tool_calls"]
    calls = [_json_call(item, tools) for item in (value if isinstance(value, list) else [value])]
    return calls if calls and None not in calls else None


def _calls_from_json_text(body, tools, separators=""):
    values = _json_values(body, separators)
    calls = []
    for value in values or ():
        found = _calls_from_json(value, tools)
        if not found:
            return None
        calls.extend(found)
    return calls or None


def _typed_argument(value, schema, key):
    """A parameter value written as text, converted only when the tool's input_schema types the
    property as something other than a string and the text parses as that (Qwen's own rule)."""
    spec = ((schema or {}).get("properties") or {}).get(key)
    kind = spec.get("type") if isinstance(spec, dict) else None
    if isinstance(kind, list):
        kind = "string" if "string" in kind else next((k for k in kind if k != "null"), None)
    if kind in (None, "string") or not isinstance(kind, str):
        return value
    text = value.strip()
    if text == "null":
        return None
    if kind == "boolean":
        return {"true": True, "false": False}.get(text.lower(), value)
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = value
        if kind in ("array", "object"):
            literal = _literal_value(text, 0) if text[:1] in "[{" else None
            if literal and literal[1] == len(text):
                parsed = literal[0]
    wanted = {"integer": int, "number": (int, float), "array": list, "object": dict}.get(kind)
    if wanted and isinstance(parsed, wanted) and not isinstance(parsed, bool):
        return parsed
    return value


def _tool_call_tag(text, position, tools):
    """<tool_call> JSON or Qwen XML </tool_call>; the closing tag may be missing at the end."""
    close = text.find("</tool_call>", position)
    body = text[position:] if close < 0 else text[position:close]
    end = len(text) if close < 0 else close + len("</tool_call>")
    if body.lstrip().startswith("<function="):
        return _tagged_calls(body, 0, tools), end
    return _calls_from_json_text(body, tools), end


def _qwen_function(text, position, tools):
    """Qwen3-Coder's <function=NAME><parameter=P>value</parameter></function>, parsed as Qwen's own
    parser does: one leading and one trailing newline of a value are the format's, not the value's."""
    close = text.find("</function>", position)
    body = text[position:] if close < 0 else text[position:close]
    end = len(text) if close < 0 else close + len("</function>")
    name, bracket, parameters = body.partition(">")
    name = name.strip()
    if not bracket or name not in tools:
        return None
    arguments, last = {}, 0
    for match in QWEN_PARAMETER.finditer(parameters):
        key, bracket, value = match.group(1).partition(">")
        if parameters[last:match.start()].strip() or not bracket:
            return None
        value = value[1:] if value.startswith("\n") else value
        value = value[:-1] if value.endswith("\n") else value
        arguments[key.strip()] = _typed_argument(value, tools[name], key.strip())
        last = match.end()
    if parameters[last:].strip():
        return None
    return [{"name": name, "input": arguments}], end


def _invoke_block(text, position, tools):
    """Anthropic-style <function_calls><invoke name="N"><parameter name="P">v</parameter></invoke>."""
    close = text.find("</function_calls>", position)
    body = text[position:] if close < 0 else text[position:close]
    end = len(text) if close < 0 else close + len("</function_calls>")
    calls, at = [], 0
    while _skip_space(body, at) < len(body):
        invoke = INVOKE.match(body, at)
        if not invoke or invoke.group(1) not in tools:
            return None
        name, inner, arguments, inside = invoke.group(1), invoke.group(2), {}, 0
        while _skip_space(inner, inside) < len(inner):
            parameter = INVOKE_PARAMETER.match(inner, inside)
            if not parameter:
                return None
            arguments[parameter.group(1)] = _typed_argument(parameter.group(2), tools[name], parameter.group(1))
            inside = parameter.end()
        calls.append({"name": name, "input": arguments})
        at = invoke.end()
    return calls, end


def _python_tag(text, position, tools):
    """Llama 3.1's <|python_tag|> then JSON calls (several separated by ;) to the end of the turn."""
    token = END_TOKEN.search(text, position)
    end = token.start() if token else len(text)
    return _calls_from_json_text(text[position:end], tools, separators=";"), end


def _python_start(text, position, tools):
    """Llama 4's <|python_start|> JSON <|python_end|>; the closing marker may be missing at the end."""
    close = text.find("<|python_end|>", position)
    end = len(text) if close < 0 else close + len("<|python_end|>")
    return _calls_from_json_text(text[position:] if close < 0 else text[position:close], tools), end


def _gemma_value(text, position):
    """A value in Gemma 4's call syntax: <|"|>strings<|"|>, JSON strings, numbers, true, false,
    null, and objects with bare keys or arrays of these. (value, end) or None."""
    position = _skip_space(text, position)
    if text.startswith(GEMMA_QUOTE, position):
        close = text.find(GEMMA_QUOTE, position + len(GEMMA_QUOTE))
        return None if close < 0 else (text[position + len(GEMMA_QUOTE):close], close + len(GEMMA_QUOTE))
    if position >= len(text):
        return None
    char = text[position]
    if char == '"':
        try:
            return _decode_json_value(text, position)
        except ValueError:
            return None
    if char in "{[":
        closing, items, position = "}]"["{[".index(char)], ({} if char == "{" else []), position + 1
        while True:
            position = _skip_space(text, position)
            if text.startswith(closing, position):
                return items, position + 1
            if items and text.startswith(",", position):
                position = _skip_space(text, position + 1)
            if char == "{":
                key = _gemma_key(text, position)
                if key is None:
                    return None
                name, position = key
                position = _skip_space(text, position)
                if not text.startswith(":", position):
                    return None
                position += 1
            value = _gemma_value(text, position)
            if value is None:
                return None
            if char == "{":
                items[name] = value[0]
            else:
                items.append(value[0])
            position = value[1]
    atom = GEMMA_ATOM.match(text, position)
    return (json.loads(atom.group()), atom.end()) if atom else None


def _gemma_key(text, position):
    if text.startswith((GEMMA_QUOTE, '"'), position):
        key = _gemma_value(text, position)
        return key if key and isinstance(key[0], str) else None
    match = GEMMA_KEY.match(text, position)
    return (match.group(1), match.end()) if match else None


def _gemma_call(text, position, tools):
    """Gemma 4's <|tool_call>call:NAME{key:<|"|>value<|"|>}<tool_call|>; the close may be missing."""
    brace = text.find("{", position)
    if not text.startswith("call:", position) or brace < 0:
        return None
    name = text[position + len("call:"):brace].strip()
    parsed = _gemma_value(text, brace) if name in tools else None
    if parsed is None or not isinstance(parsed[0], dict):
        return None
    end = parsed[1] + len("<tool_call|>") if text.startswith("<tool_call|>", parsed[1]) else parsed[1]
    return [{"name": name, "input": parsed[0]}], end


def _mistral_calls(text, position, tools):
    """Mistral's [TOOL_CALLS] then a JSON or Python-literal list of calls, or NAME[ARGS]{...}.
    What follows the calls is the model answering for tools that have not run yet: dropped."""
    position = _skip_space(text, position)
    if text.startswith(("[", "{"), position):
        literal = _literal_value(text, position)
        calls = literal and _calls_from_json(literal[0], tools)
    else:
        named = MISTRAL_NAMED.match(text, position)
        literal = named and named.group(1) in tools and _literal_value(text, named.end())
        calls = literal and isinstance(literal[0], dict) and [{"name": named.group(1), "input": literal[0]}]
    if not calls:
        return None
    following = _skip_space(text, literal[1])
    return calls, following if text.startswith("[TOOL_CALLS]", following) else len(text)


TAGGED_PARSERS = {"<tool_call>": _tool_call_tag, "<function=": _qwen_function, "<function_calls>": _invoke_block,
                  "<|python_tag|>": _python_tag, "<|python_start|>": _python_start, "<|tool_call>": _gemma_call,
                  "[TOOL_CALLS]": _mistral_calls}


def _tagged_calls(text, position, tools):
    """The calls from position to the end, each behind its marker; None if anything else is there."""
    calls = []
    while True:
        position = _skip_space(text, position)
        if position == len(text):
            return calls or None
        token = next((token for token in END_TOKENS if text.startswith(token, position)), None)
        if token and calls:
            position += len(token)
            continue
        opener = next((opener for opener in TAGGED_OPENERS if text.startswith(opener, position)), None)
        parsed = opener and TAGGED_PARSERS[opener](text, position + len(opener), tools)
        if not parsed or not parsed[0]:
            return None
        calls.extend(parsed[0])
        position = parsed[1]


def _fence_bodies(text):
    """What the ```json fences that make up the whole text hold, or None: an unclosed fence, or
    anything but whitespace between them."""
    bodies, position = [], 0
    while True:
        position = _skip_space(text, position)
        if position == len(text):
            return bodies or None
        if not text.startswith("```", position):
            return None
        position += 3
        if text.startswith("json", position):
            position += 4
        close = text.find("```", position)
        if close < 0:
            return None
        bodies.append(text[position:close])
        position = close + 3


def _untagged_calls(text, tools):
    """A reply that is JSON calls, bare or in ```json fences with nothing around them."""
    bodies = _fence_bodies(text) if text.startswith("```") else [text]
    if bodies is None:
        return None
    calls = []
    for body in bodies:
        found = _calls_from_json_text(body, tools)
        if not found:
            return None
        calls.extend(found)
    return calls


def preamble_allows(preamble):
    """Prose a tagged call may follow: short, no code fence (the call would be inside it), and
    neither an example nor a refusal."""
    preamble = preamble.strip()
    return len(preamble) <= PREAMBLE_LIMIT and "```" not in preamble and not EXAMPLE_OR_REFUSAL.search(preamble)


def find_text_tool_calls(text, tools):
    """(where the calls begin, the calls) when the reply is tool calls written as text, else None.

    tools: {name: input_schema} of the offered tools. A reply that begins with a marker, or with
    JSON or a fence, must be calls from there on; otherwise the calls start at the first line that
    begins with a marker, after a preamble that preamble_allows()."""
    start = _skip_space(text, 0)
    try:
        if text.startswith(UNTAGGED_OPENERS, start) and not text.startswith("[TOOL_CALLS]", start):
            calls = _untagged_calls(text[start:], tools)
        else:
            opener = LINE_START_OPENER.search(text)
            if opener is None:
                return None
            start = _skip_space(text, opener.start())
            calls = _tagged_calls(text, start, tools) if preamble_allows(text[:start]) else None
    except RecursionError:
        return None
    return (start, calls) if calls else None


BLANK_LINES = re.compile(r"(?:[ \t]*\n)*")
# What call_prospect() says of text that begins where a call may begin.
NO_OPENER = "no opener"    # no marker (or JSON, at the reply's start) begins there
MAYBE = "maybe"            # undecided: hold it
CALL = "call"              # names an offered tool: hold it to the end, where it is parsed whole
NOT_A_CALL = "not a call"  # an opener that cannot become a call, nor can anything after it
PROSPECT_HEAD = 512        # beyond this many characters an undecided opener is held to the end


def _quoted(text, position):
    """The string starting at a quote at position: (its text so far or None if it holds an
    escape, whether it closed, index past it); None when no quote starts there."""
    if position >= len(text) or text[position] not in "\"'":
        return None
    close = text.find(text[position], position + 1)
    value = text[position + 1:close if close >= 0 else len(text)]
    return (None if "\\" in value else value), close >= 0, close + 1


def _name_prospect(name, complete, tools):
    stripped = name.strip()
    if complete or name != name.rstrip():
        return CALL if stripped in tools else NOT_A_CALL
    return MAYBE if any(tool.startswith(stripped) for tool in tools) else NOT_A_CALL


def _json_prospect(text, tools):
    """A JSON (or Python-literal) call so far: decided by its first key and, for "name", "type"
    and "id", by what follows; other call keys first mean holding to the end."""
    position = _skip_space(text, 1) if text.startswith("[") else 0
    if position == len(text):
        return MAYBE
    if text[position] != "{":
        return NOT_A_CALL
    position = _skip_space(text, position + 1)
    if position == len(text):
        return MAYBE
    quoted = _quoted(text, position)
    if quoted is None:
        return NOT_A_CALL
    key, closed, position = quoted
    if key is None:
        return CALL
    if not closed:
        return MAYBE if any(first.startswith(key) for first in FIRST_KEYS) else NOT_A_CALL
    if key not in FIRST_KEYS:
        return NOT_A_CALL
    if key not in ("name", "type", "id", "tool_calls", "function"):
        return CALL
    position = _skip_space(text, position)
    if position < len(text) and text[position] != ":":
        return NOT_A_CALL
    position = _skip_space(text, position + 1)
    if position >= len(text):
        return MAYBE
    if key in ("tool_calls", "function"):  # the calls, or the call, inside
        return _json_prospect(text[position:], tools) if text[position] in ("[{" if key == "tool_calls" else "{") \
            else NOT_A_CALL
    quoted = _quoted(text, position)
    if quoted is None:
        return CALL if key == "id" else NOT_A_CALL
    value, closed, position = quoted
    if value is None:
        return CALL
    if key == "name":
        return _name_prospect(value, closed, tools)
    if key == "type":
        if not closed:
            return MAYBE if "function".startswith(value) else NOT_A_CALL
        return CALL if value == "function" else NOT_A_CALL
    # "id" first, as in an invented chat completion: the key after it tells
    position = _skip_space(text, position) if closed else len(text)
    if position == len(text):
        return MAYBE
    if text[position] != ",":
        return NOT_A_CALL
    position = _skip_space(text, position + 1)
    quoted = _quoted(text, position)
    if quoted is None:
        return MAYBE if position == len(text) else NOT_A_CALL
    second, closed, _ = quoted
    if second is None:
        return CALL
    if not closed:
        return MAYBE if any(key.startswith(second) for key in CALL_KEYS | NESTED_CALL_KEYS) else NOT_A_CALL
    return CALL if second in CALL_KEYS | NESTED_CALL_KEYS else NOT_A_CALL


def _literal_prospect(text, literal, then):
    """Text that must go on with literal, then be judged by then(rest)."""
    if len(text) < len(literal):
        return MAYBE if literal.startswith(text) else NOT_A_CALL
    return then(text[len(literal):]) if text.startswith(literal) else NOT_A_CALL


def _tagged_prospect(opener, rest, tools):
    """The text after an opener so far."""
    stripped = rest.lstrip()
    if not stripped:
        return MAYBE
    if opener == "<function=":
        name, bracket, _ = rest.partition(">")
        return _name_prospect(name, bool(bracket), tools)
    if opener == "<|tool_call>":
        return _literal_prospect(rest, "call:", lambda after: _name_prospect(
            after.partition("{")[0], "{" in after, tools))
    if opener == "<function_calls>":
        return _literal_prospect(stripped, '<invoke name="', lambda after: _name_prospect(
            after.partition('"')[0], '"' in after, tools))
    if stripped[0] in "[{":
        return _json_prospect(stripped, tools)
    if opener == "<tool_call>":
        return _literal_prospect(stripped, "<function=", lambda after: _tagged_prospect("<function=", after, tools))
    if opener == "[TOOL_CALLS]":
        name = re.match(r"[\w.-]*", stripped).group()
        return _name_prospect(name, len(name) < len(stripped), tools)
    return NOT_A_CALL


def call_prospect(text, tools, untagged):
    """Whether text that begins at the start of a line can still become tool calls, from its head
    alone so the cost per streamed token stays small. untagged: this is the reply's start, where
    JSON and fences count too."""
    head = text[:PROSPECT_HEAD]
    head = head.lstrip() if untagged else head.lstrip(" \t")
    if not head:  # a long run of whitespace is held to the end too, not re-read for each token
        return MAYBE if len(text) < PROSPECT_HEAD else CALL
    openers = TAGGED_OPENERS + UNTAGGED_OPENERS if untagged else TAGGED_OPENERS
    if any(opener.startswith(head) and opener != head for opener in TAGGED_OPENERS):
        return MAYBE  # "[" may still become [TOOL_CALLS]
    opener = next((opener for opener in openers if head.startswith(opener)), None)
    if opener is None:
        return MAYBE if any(opener.startswith(head) for opener in openers) else NO_OPENER
    if opener == "```":
        language = re.match(r"[A-Za-z]*", head[3:]).group()
        rest = head[3 + len(language):]
        if not rest:
            verdict = MAYBE if "json".startswith(language) else NOT_A_CALL
        elif language not in ("", "json"):
            verdict = NOT_A_CALL
        else:
            rest = rest.lstrip()
            verdict = _json_prospect(rest, tools) if rest else MAYBE
    elif opener in "{[":
        verdict = _json_prospect(head, tools)
    else:
        verdict = _tagged_prospect(opener, head[len(opener):], tools)
    return CALL if verdict is MAYBE and len(text) >= PROSPECT_HEAD else verdict


class TextCallGate:
    """How much of a streaming reply's text may leave now: text is held from where a tool call
    written as text may begin, for as long as it can still become one. One per reply; it sees the
    text StreamTranslator holds (pending) and is told what leaves."""

    def __init__(self, tools):
        self.tools = tools
        self.open = True         # a call written as text may still come
        self.settled = False     # pending[offset:] names an offered tool: held to the end
        self.offset = 0
        self.line_start = True   # pending begins at the start of a line
        # The text let through so far while open, in pieces (joined once, at the end), and what the
        # decisions read of it, kept as it grows, so that no token costs a pass over all of it: the
        # preamble stripped (while at most PREAMBLE_LIMIT long; past that the gate closes) and the
        # whitespace after it (no more than makes it too long, once text follows).
        self.preamble_parts = []
        self.preamble_core = ""
        self.preamble_trailing = ""

    def close(self):
        self.open = self.settled = False
        self.preamble_parts, self.preamble_core, self.preamble_trailing = [], "", ""

    def hold_from(self, pending):
        """Where in pending the text to hold back begins (len(pending): nothing to hold)."""
        if self.settled:
            return self.offset
        position = 0 if self.line_start else pending.find("\n") + 1 or None
        while self.open and position is not None:
            before = self._stripped_with(pending[:position])
            untagged = before == ""
            if not untagged:  # after text, no call begins on a blank line (it adds nothing to before)
                position = BLANK_LINES.match(pending, position).end()
            verdict = call_prospect(pending[position:], self.tools, untagged)
            if verdict is not NO_OPENER:
                if verdict is NOT_A_CALL or not (untagged or before is not None and preamble_allows(before)):
                    self.close()  # the first place a call could begin holds none: none follows
                    break
                self.settled, self.offset = verdict is CALL, position
                return position
            position = pending.find("\n", position) + 1 or None
        return len(pending)

    def _stripped_with(self, head):
        """(The preamble + head).strip(), or None when that is longer than PREAMBLE_LIMIT."""
        body = head.strip()
        if not body:
            return self.preamble_core
        gap = self.preamble_trailing + head[:len(head) - len(head.lstrip())] if self.preamble_core else ""
        if len(self.preamble_core) + len(gap) + len(body) > PREAMBLE_LIMIT:
            return None
        return self.preamble_core + gap + body

    def let_through(self, text):
        """text, from the start of pending, left as text."""
        self.offset -= len(text)
        if not text or not self.open:
            return
        self.line_start = text.endswith("\n")
        self.preamble_parts.append(text)
        stripped = self._stripped_with(text)
        if stripped is None:
            self.close()
        elif text.strip():
            self.preamble_core, self.preamble_trailing = stripped, text[len(text.rstrip()):]
        elif self.preamble_core:
            self.preamble_trailing = (self.preamble_trailing + text)[:PREAMBLE_LIMIT + 1]

    def calls(self, pending):
        """At the reply's end: (the held text before the calls, the calls), or None."""
        if not self.open:
            return None
        preamble = "".join(self.preamble_parts)
        found = find_text_tool_calls(preamble + pending, self.tools)
        if not found or found[0] < len(preamble):
            return None
        return pending[:found[0] - len(preamble)], found[1]


###############################################################################
# Translation: Ollama's stream -> Anthropic events
###############################################################################

class StopSequenceMatcher:
    """Finds the first stop sequence to complete in streamed text, in one pass (Aho-Corasick).

    Each character costs one or two dict lookups however many sequences there are, and the state
    carries across pieces, so a sequence split over tokens is found without searching again.
    `held` is how many of the last characters may still begin a sequence: text the gate keeps."""

    def __init__(self, stops):
        self.next = [{}]  # per node: character -> node
        self.fail = [0]   # per node: the node of the longest proper suffix that is also a prefix
        self.depth = [0]
        self.output = [None]  # per node: a stop sequence ending here
        for stop in stops:
            node = 0
            for char in stop:
                child = self.next[node].get(char)
                if child is None:
                    child = len(self.next)
                    self.next.append({})
                    self.fail.append(0)
                    self.depth.append(self.depth[node] + 1)
                    self.output.append(None)
                    self.next[node][char] = child
                node = child
            self.output[node] = self.output[node] or stop
        queue = collections.deque(self.next[0].values())
        while queue:
            node = queue.popleft()
            for char, child in self.next[node].items():
                fallback = self.fail[node]
                while fallback and char not in self.next[fallback]:
                    fallback = self.fail[fallback]
                self.fail[child] = self.next[fallback].get(char, 0)
                self.output[child] = self.output[child] or self.output[self.fail[child]]
                queue.append(child)
        self.state = 0

    @property
    def held(self):
        return self.depth[self.state]

    def reset(self):
        self.state = 0

    def scan(self, text):
        """(end, stop): the first stop sequence completed in text and the index just after it; or None."""
        node, nexts, fail, output = self.state, self.next, self.fail, self.output
        for index, char in enumerate(text):
            while node and char not in nexts[node]:
                node = fail[node]
            node = nexts[node].get(char, 0)
            if output[node] is not None:
                self.state = 0
                return index + 1, output[node]
        self.state = node
        return None


class ForcedToolCall:
    """The reply to a request that forces tool use: Ollama's output is held to one JSON object
    {"name", "arguments"} (forced_tool_format). It is collected rather than streamed as text and
    becomes one tool_use block when the reply ends, if the arguments fit the named tool's schema
    (where Ollama does not enforce `format`, nothing else holds them to it)."""

    def __init__(self, tools):
        self.tools = tools  # {name: input_schema}
        self.parts = []

    def take(self, text):
        self.parts.append(text)

    @property
    def text(self):
        return "".join(self.parts)

    def call(self):
        """(name, arguments); None when the output is no such object (cut short by max_tokens)."""
        try:
            value = decode_strict_json(self.text)
        except (ValueError, RecursionError):
            return None
        if not isinstance(value, dict) or set(value) != {"name", "arguments"} or value["name"] not in self.tools:
            return None
        name, arguments = value["name"], value["arguments"]
        if not isinstance(arguments, dict):
            return None
        violation = schema_violation(arguments, self.tools[name])
        if violation:
            log.info("a forced call to %s left as text: %s", name, violation)
            return None
        return name, arguments


class StreamTranslator:
    """Ollama /api/chat stream chunks -> Anthropic SSE events, and the complete message alongside.

    One instance per response. feed() takes one parsed NDJSON object and returns the events to
    send; `message` is the finished Anthropic message once `done` is true. translate() takes a
    batch of objects; a reply nobody streams goes through it without an events list, so both
    shapes always agree.

    Text passes a gate: it is held back while it may still be the start of a stop sequence
    (which the proxy enforces, so it can report which one matched) or, when tools were offered,
    a tool call the model wrote as text. Everything else leaves the moment it arrives.

    Thinking is shown (show_thinking), dropped, or hidden: with hidden_thinking "omitted" a thinking
    block opens at once and ends with a signature_delta that seals its text (thinking_seal); with
    "redacted" one redacted_thinking block, its data the seal, leaves when the thinking ends.
    """

    def __init__(self, model, input_tokens, *, stop_sequences=(), tool_names=(), show_thinking=False,
                 recover_tool_calls=True, forced=False, hidden_thinking=None, thinking_seal=None):
        self.model = model
        self.message_id = new_id("msg_")
        self.input_tokens = input_tokens
        self.stop_sequences = [s for s in stop_sequences if s]
        self.stop_matcher = StopSequenceMatcher(self.stop_sequences) if self.stop_sequences else None
        self.tools = offered_tools(tool_names)  # names, or {name: input_schema} to type XML parameters
        self.tool_names = frozenset(self.tools)
        self.forced_call = ForcedToolCall(self.tools) if forced and self.tools else None
        self.dropped_calls = []  # structured calls to tools the client did not offer
        self.show_thinking = show_thinking
        self.hidden_thinking = hidden_thinking if thinking_seal is not None and not show_thinking else None
        self.thinking_seal = thinking_seal
        self.call_gate = TextCallGate(self.tools) if recover_tool_calls and self.tools else None
        # [kind, parts] for text and thinking, [kind, block] for tool_use; hidden thinking
        # ([kind, parts, seal]) is "omitted_thinking" or "redacted_thinking", sealed as it closes.
        self.blocks = []
        self.open_kind = None
        self.open_parts = None  # the text parts of the open block
        self.had_tool = False
        self.calls_from_text = 0  # tool calls recovered from text, for /metrics
        self.pending = ""  # text not yet emitted
        self.held_to_end = None  # pieces of a call written as text, held whole to the end of the reply
        self.gated = bool(self.stop_sequences) or self.call_gate is not None
        self.stop_reason = None
        self.stop_sequence = None
        self.output_tokens = 0
        self.chunks = 0
        self.done = False
        self.upstream_done = False

    def start(self):
        message = message_object(self.message_id, self.model, [], None, None, self.input_tokens, 0)
        return [("message_start", {"type": "message_start", "message": message})]

    # -- blocks ---------------------------------------------------------------
    def close_block(self, events):
        if self.open_kind is None:
            return
        index = len(self.blocks) - 1
        if self.open_kind in ("omitted_thinking", "redacted_thinking"):
            sealed = self.thinking_seal.seal("".join(self.open_parts))
            self.blocks[-1].append(sealed)
            if self.open_kind == "omitted_thinking":
                events.append(("content_block_delta", {"type": "content_block_delta", "index": index,
                                                       "delta": {"type": "signature_delta", "signature": sealed}}))
            else:
                events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                                       "content_block": {"type": "redacted_thinking",
                                                                         "data": sealed}}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        self.open_kind = None

    def _hidden_thinking(self, text, events):
        """Thinking the client may not read: kept whole, to be sealed when its block closes."""
        kind = self.hidden_thinking + "_thinking"
        if self.open_kind != kind:
            self.close_block(events)
            self.blocks.append([kind, []])
            if kind == "omitted_thinking":
                events.append(("content_block_start", {"type": "content_block_start", "index": len(self.blocks) - 1,
                                                       "content_block": {"type": "thinking", "thinking": "",
                                                                         "signature": ""}}))
            self.open_kind = kind
            self.open_parts = self.blocks[-1][1]
        self.open_parts.append(text)

    def _delta(self, kind, text, events):
        if self.open_kind != kind:
            self.close_block(events)
            self.blocks.append([kind, []])
            opening = {"type": "text", "text": ""} if kind == "text" else \
                {"type": "thinking", "thinking": "", "signature": ""}
            events.append(("content_block_start", {"type": "content_block_start", "index": len(self.blocks) - 1,
                                                   "content_block": opening}))
            self.open_kind = kind
            self.open_parts = self.blocks[-1][1]
        self.open_parts.append(text)
        events.append(("content_block_delta", {
            "type": "content_block_delta", "index": len(self.blocks) - 1,
            "delta": {"type": "text_delta", "text": text} if kind == "text" else
                     {"type": "thinking_delta", "thinking": text}}))

    def _tool_use(self, name, arguments, events):
        self.close_block(events)
        block = {"type": "tool_use", "id": new_id("toolu_"), "name": name, "input": arguments}
        self.blocks.append(["tool_use", block])
        index = len(self.blocks) - 1
        events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                               "content_block": dict(block, input={})}))
        events.append(("content_block_delta", {"type": "content_block_delta", "index": index,
                                               "delta": {"type": "input_json_delta",
                                                         "partial_json": json.dumps(arguments)}}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        self.had_tool = True

    # -- the text gate ----------------------------------------------------------
    def _text(self, piece, events):
        if not self.gated:
            self._delta("text", piece, events)
            return
        if self.held_to_end is not None:
            # A list, not pending += piece: a long held call would be copied whole for each token.
            self.held_to_end.append(piece)
            found = self.stop_matcher.scan(piece) if self.stop_matcher else None
            if found:
                self.pending, self.held_to_end = "".join(self.held_to_end), None
                self._cut_at_stop_sequence(piece, found)
            return
        if self.stop_matcher and not self.pending:
            self.stop_matcher.reset()  # whatever began a stop sequence has been emitted
        self.pending += piece
        if self.stop_matcher:
            found = self.stop_matcher.scan(piece)
            if found:
                self._cut_at_stop_sequence(piece, found)
                return
        keep = min(self.stop_matcher.held, len(self.pending)) if self.stop_matcher else 0
        gate = self.call_gate
        if gate is not None:
            keep = max(keep, len(self.pending) - gate.hold_from(self.pending))
            if keep == len(self.pending):
                if gate.settled:
                    self.held_to_end, self.pending = [self.pending], ""
                return
            gate.let_through(self.pending[:len(self.pending) - keep])
        self._emit_text(self.pending[:len(self.pending) - keep], events)
        self.pending = self.pending[len(self.pending) - keep:]
        if gate is not None and not gate.open and not self.pending:
            self.call_gate, self.gated = None, bool(self.stop_sequences)  # no call can come: stream freely

    def _cut_at_stop_sequence(self, piece, found):
        """pending ends with piece, in which a stop sequence ends at found[0]: the reply ends before it."""
        end, self.stop_sequence = found
        self.pending = self.pending[:len(self.pending) - len(piece) + end - len(self.stop_sequence)]
        self.stop_reason = "stop_sequence"

    def _emit_text(self, text, events):
        if text:
            self._delta("text", text, events)

    def _flush(self, events, *, before_tool=False, cut_short=False):
        """Release held text: the reply ended (maybe cut short), or a structured tool call came after it."""
        text = self.pending if self.held_to_end is None else self.pending + "".join(self.held_to_end)
        self.pending, self.held_to_end = "", None
        # A reply cut short inside its last call is text: it is not parsed at all.
        complete = not cut_short or text.rstrip().endswith(CLOSED_CALL_ENDINGS)
        found = self.call_gate.calls(text) if self.call_gate is not None and not before_tool and complete else None
        if found:
            prefix, calls = found
            self._emit_text(prefix if prefix.strip() else "", events)
            for call in calls:
                self._tool_use(call["name"], call["input"], events)
            self.calls_from_text += len(calls)
            text = ""
        if self.call_gate is not None:
            self.call_gate.close()  # a reply's calls come once, written as text or structured
        if before_tool and not text.strip():
            return
        self._emit_text(text, events)

    # -- input --------------------------------------------------------------------
    def feed(self, chunk):
        """One Ollama NDJSON object -> events. Raises ProxyError for an error chunk."""
        events = []
        self.translate((chunk,), events)
        return events

    def translate(self, chunks, events=None):
        """feed() for each of the chunks until the reply is done, its events appended to events
        (a reply nobody streams passes None: the same message, without events). True once done."""
        index, count = 0, len(chunks)
        while index < count:
            index = self._text_run(chunks, index, events)
            if index < count:
                self._feed_one(chunks[index], [] if events is None else events)
                index += 1
                if self.done:
                    break
        return self.done

    def _feed_one(self, chunk, events):
        if "error" in chunk:
            raise upstream_stream_error(chunk["error"])
        self.chunks += 1
        message = chunk.get("message") or {}
        thinking = message.get("thinking")
        if thinking and self.stop_reason is None:
            if self.show_thinking:
                self._delta("thinking", thinking, events)
            elif self.hidden_thinking:
                self._hidden_thinking(thinking, events)
        content = message.get("content")
        if content and self.stop_reason is None:
            if self.forced_call is not None:
                self.forced_call.take(content)
            else:
                self._text(content, events)
        for call in message.get("tool_calls") or ():
            if self.stop_reason is not None:
                break
            function = call.get("function") or {}
            if not self._offered(function):
                continue
            self._flush(events, before_tool=True)
            self._tool_use(str(function.get("name", "")), tool_arguments(function.get("arguments")), events)
        if chunk.get("done"):
            self.upstream_done = True  # Ollama finished; a stop sequence leaves it generating
        if chunk.get("done") or self.stop_reason == "stop_sequence":
            self._finish(chunk, events)

    def _text_run(self, chunks, index, events):
        """Take the chunks from index on that are each one more piece of text for the open text
        block with nothing to hold back, as most of a reply is, in a few checks each; where the
        run ends. events, unless None, gets their deltas."""
        if self.open_kind != "text" or self.gated or self.stop_reason is not None or self.forced_call is not None:
            return index
        parts, block, start = self.open_parts, len(self.blocks) - 1, index
        while index < len(chunks):
            chunk = chunks[index]
            message = chunk.get("message")
            if (message.__class__ is not dict or len(message) != 2 or "role" not in message or chunk.get("done")
                    or "error" in chunk):
                break
            content = message.get("content")
            if not content or content.__class__ is not str:
                break
            parts.append(content)
            if events is not None:
                events.append(("content_block_delta", {"type": "content_block_delta", "index": block,
                                                       "delta": {"type": "text_delta", "text": content}}))
            index += 1
        self.chunks += index - start
        return index

    def _offered(self, function):
        """Whether a structured call names a tool the client offered. A call to any other tool (or
        under tool_choice none) is dropped, not returned as text: the client could not run it, and
        written into the conversation it would teach the model to call it again."""
        if function.get("name") in self.tool_names:
            return True
        self.dropped_calls.append(str(function.get("name", "")))
        return False

    def _finish_forced_call(self, events):
        call = self.forced_call.call()
        if call is not None:
            self._tool_use(call[0], call[1], events)
        else:
            self._emit_text(self.forced_call.text, events)

    def _finish(self, chunk, events):
        if self.forced_call is not None and not self.had_tool:
            self._finish_forced_call(events)
        self._flush(events, cut_short=self.stop_reason == "stop_sequence" or chunk.get("done_reason") == "length")
        self.close_block(events)
        if self.had_tool:
            self.stop_reason, self.stop_sequence = "tool_use", None
        elif self.stop_reason is None:
            self.stop_reason = STOP_REASONS.get(chunk.get("done_reason"), "end_turn")
        self.input_tokens = chunk.get("prompt_eval_count") or self.input_tokens
        self.output_tokens = chunk.get("eval_count") or self.chunks
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": self.stop_reason,
                                                   "stop_sequence": self.stop_sequence},
                                         "usage": {"input_tokens": self.input_tokens,
                                                   "output_tokens": self.output_tokens}}))
        events.append(("message_stop", {"type": "message_stop"}))
        self.done = True

    def error_events(self, error):
        """Close what is open and report the failure: the end of a stream that cannot finish."""
        events = []
        self.close_block(events)
        events.append(("error", {"type": "error", "error": {"type": error.error_type, "message": error.message}}))
        return events

    @property
    def message(self):
        content = []
        for kind, payload, *sealed in self.blocks:
            if kind == "text":
                content.append({"type": "text", "text": "".join(payload)})
            elif kind == "thinking":
                content.append({"type": "thinking", "thinking": "".join(payload), "signature": ""})
            elif kind == "omitted_thinking":
                content.append({"type": "thinking", "thinking": "", "signature": sealed[0]})
            elif kind == "redacted_thinking":
                content.append({"type": "redacted_thinking", "data": sealed[0]})
            else:
                content.append(payload)
        return message_object(self.message_id, self.model, content, self.stop_reason, self.stop_sequence,
                              self.input_tokens, self.output_tokens)


# Ollama's tool arguments may nest no deeper than this: the same arguments come back to us as a
# tool_use input in the next request, five levels down (body, messages, a message, its content,
# the block), where MAX_JSON_DEPTH (128) must still let them through.
MAX_UPSTREAM_NESTING = 120


def tool_arguments(arguments):
    """Ollama's arguments as the JSON object Anthropic's input must be."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return {"arguments": arguments}
        except RecursionError:
            raise upstream_nested_too_deeply() from None
    if arguments is None:
        return {}
    if nesting_exceeds(arguments, MAX_UPSTREAM_NESTING):
        raise upstream_nested_too_deeply()
    return arguments if isinstance(arguments, dict) else {"value": arguments}


def nesting_exceeds(value, limit):
    """True if lists and objects in decoded JSON nest deeper than limit; walked level by level
    without recursion (exact types: json makes no subclasses, and type() is the faster test)."""
    level = [value] if type(value) is dict or type(value) is list else []
    for _ in range(limit):
        level = [child for parent in level for child in (parent.values() if type(parent) is dict else parent)
                 if type(child) is dict or type(child) is list]
        if not level:
            return False
    return True


def upstream_nested_too_deeply():
    """Ollama's reply, not the client's request, is too deep: a broken upstream answer."""
    return ProxyError(502, f"Ollama sent a reply nested deeper than {MAX_UPSTREAM_NESTING} levels", "api_error")


def prompt_too_long(tokens, maximum, detail=""):
    """Anthropic's wording, which Claude Code parses to decide how much to compact."""
    return invalid(f"prompt is too long: {tokens} tokens > {maximum} maximum{detail}")


def upstream_stream_error(text):
    text = str(text)
    if "busy" in text or "maximum pending" in text:
        return ProxyError(529, f"Ollama is busy: {text}", retry_after=5)
    return ProxyError(502, f"Ollama reported an error mid-reply: {text}", "api_error")


def upstream_status_error(status, text, url, estimated_tokens, num_ctx):
    """An Ollama error response before any answer -> the Anthropic error (PROTOCOL C.6).
    (A 404 is a missing model; the handler answers that with the list of installed ones.)"""
    if status == 400:
        if "context length" in text:
            # Our estimate was under Ollama's count; say at least one token too many.
            return prompt_too_long(max(estimated_tokens, num_ctx + 1), num_ctx, f" (Ollama: {text})")
        return invalid(f"Ollama rejected the request: {text}")
    if status == 403:
        return ProxyError(403, f"Ollama refused the request: {text}", "permission_error")
    if status == 429:
        return ProxyError(429, f"Ollama rate limit: {text}", "rate_limit_error", retry_after=5)
    if status == 503:
        return ProxyError(529, f"Ollama is busy: {text}", "overloaded_error", retry_after=5)
    if status >= 500:
        return ProxyError(500, f"Ollama answered HTTP {status}: {text}", "api_error")
    # A redirect or any other status Ollama never answers /api/chat with: a broken upstream.
    return ProxyError(502, f"Ollama answered HTTP {status}: {text}", "api_error")


###############################################################################
# Upstream client: Ollama over HTTP/1.1
###############################################################################

HEX_DIGITS = re.compile(rb"[0-9A-Fa-f]{1,16}")
DECIMAL_DIGITS = re.compile(r"[0-9]{1,18}")
# A bound on one NDJSON line (and on a whole reply that is not a stream): past it Ollama's answer
# is broken, and buffering on would only cost memory.
MAX_UPSTREAM_LINE_BYTES = 16 << 20


def send_nonblocking(sock, data, timeout):
    """sock.sendall() for a socket that stays non-blocking: one send() when the socket takes it all,
    as it does a request of usual size, and a poll() only when it is full. Under load every system
    call hands the interpreter lock to another thread; a socket timeout would add a poll() before
    each send and two switches of blocking mode around it."""
    view = memoryview(data)
    deadline = None
    while view:
        try:
            view = view[sock.send(view):]
            continue
        except (BlockingIOError, ssl.SSLWantWriteError):
            wanted = select.POLLOUT
        except ssl.SSLWantReadError:  # TLS must read (a renegotiation, a key update) before it can write
            wanted = select.POLLIN
        now = time.monotonic()
        deadline = deadline or now + timeout
        if now >= deadline:
            raise socket.timeout(f"the send did not finish within {timeout:g} s")
        ready = select.poll()
        ready.register(sock, wanted)
        ready.poll((deadline - now) * 1000)


class UpstreamResponse:
    """Ollama's answer to one request, parsed as its bytes arrive: the status line, the headers and
    the body's framing (chunked, Content-Length or to the close), with no I/O of its own (as
    http.client keeps HTTPResponse apart from HTTPConnection). UpstreamExchange feeds it.

    The body is split into lines as it arrives, each byte looked at once: complete lines wait in
    `_lines` for pop_lines(), the unterminated rest in `_tail`. A malformed answer raises the 502
    of broken(), after which `unusable` says the connection is out of step for good."""

    def __init__(self, url):
        self.url = url  # the host's URL, for error messages
        self.status = None
        self.headers = {}
        self.finished = False  # the body is complete
        self.delivered = False  # pop_lines() has given out a line: the answer can no longer move
        self.unusable = False  # bytes came that no framing accounts for
        self._raw = b""  # received, not yet parsed
        self._lines = []
        self._tail = bytearray()
        self._framing = None
        self._left = 0  # bytes of the current chunk's data (or of a Content-Length body) to come
        self._need_crlf = False
        self._in_trailer = False
        self._other_chunks = False  # a chunk not one whole line came: no more fast path

    def started(self):
        """Whether any byte of the answer has arrived."""
        return self.status is not None or bool(self._raw)

    def ended_cleanly(self):
        """The whole answer and nothing after it, on a connection that may carry another request."""
        return (self.finished and not self.unusable and self._framing != "close" and not self._lines
                and not self._tail and self.headers.get("connection", "").lower() != "close")

    def feed(self, data):
        self._raw = self._raw + data if self._raw else data
        self._parse()

    def at_eof(self):
        """The connection was closed: the end of a body read to the close, or a broken answer."""
        self.unusable = True
        if self.status is None:
            raise self.broken("closed the connection without answering", "closed")
        if self._framing == "close":
            self._end_of_body()
        elif not self.finished:
            raise self.broken("closed the connection mid-reply", "closed")

    def _parse(self):
        if self.status is None and not self._parse_head():
            return
        if self._framing == "chunked":
            self._parse_chunks()
        elif self._framing == "length":
            raw = self._raw
            take = min(self._left, len(raw))
            self._take(raw[:take] if take < len(raw) else raw)
            self._left -= take
            self._raw = raw[take:]
            if not self._left:
                self._end_of_body()
        else:
            self._take(self._raw)
            self._raw = b""
        if self.finished and self._raw:
            self.unusable = True  # bytes after a complete answer: the connection is out of step
            self._raw = b""

    def _parse_head(self):
        end = self._raw.find(b"\r\n\r\n")
        if end < 0:
            if len(self._raw) > 65536:
                raise self.broken("sent an oversized header")
            return False
        head = self._raw[:end].decode("latin-1").split("\r\n")
        self._raw = self._raw[end + 4:]
        parts = head[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise self.broken(f"sent no HTTP response: {head[0][:80]!r}")
        for line in head[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.status = int(parts[1])
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self._framing = "chunked"
        elif "content-length" in self.headers:
            length = self.headers["content-length"]
            if not DECIMAL_DIGITS.fullmatch(length):
                raise self.broken(f"sent an unusable Content-Length: {length[:40]!r}")
            self._framing = "length"
            self._left = int(length)
            if not self._left:
                self._end_of_body()
        else:
            self._framing = "close"
        return True

    def _parse_chunks(self):
        """Take every complete chunk in the buffer; a chunk that arrived whole (the usual case) is
        checked and taken in one step, and nothing is looked at twice."""
        raw, pos, size = self._raw, 0, len(self._raw)
        try:
            while not self.finished:
                if self._in_trailer:  # after the last chunk: optional trailer lines, then an empty one
                    end = raw.find(b"\r\n", pos)
                    if end < 0:
                        if size - pos > 4096:
                            raise self.broken("sent a malformed chunked body")
                        return
                    if end == pos:
                        self._end_of_body()
                    pos = end + 2
                    continue
                if self._left:  # the rest of a chunk that arrived in parts
                    take = min(self._left, size - pos)
                    self._take(raw[pos:pos + take])
                    pos += take
                    self._left -= take
                    if self._left:
                        return
                    self._need_crlf = True
                if self._need_crlf:
                    if size - pos < 2:
                        return
                    if raw[pos:pos + 2] != b"\r\n":
                        raise self.broken("sent a chunk without the CRLF after its data")
                    pos += 2
                    self._need_crlf = False
                if not self._tail and not self._other_chunks:
                    pos = self._whole_line_chunks(raw, pos, size)
                end = raw.find(b"\r\n", pos)
                if end < 0:
                    if size - pos > 4096:
                        raise self.broken("sent a malformed chunked body")
                    return
                field = raw[pos:end]
                # int(x, 16) alone would take "-1", "+5", "0x5", "5_0" and spaces: a chunk size is hex digits.
                if field.isalnum() and field[1:2] not in (b"x", b"X") and len(field) <= 16:
                    try:
                        length = int(field, 16)
                    except ValueError:
                        raise self.broken("sent a malformed chunked body") from None
                else:  # chunk extensions: rare, and checked the slow way
                    field = field.split(b";")[0].strip()
                    if not HEX_DIGITS.fullmatch(field):
                        raise self.broken("sent a malformed chunked body")
                    length = int(field, 16)
                pos = end + 2
                if not length:
                    self._in_trailer = True
                    continue
                after = pos + length
                if after + 2 > size:
                    self._left = length
                    continue
                if raw[after:after + 2] != b"\r\n":
                    raise self.broken("sent a chunk without the CRLF after its data")
                self._take(raw[pos:after])
                pos = after + 2
        finally:
            self._raw = raw[pos:] if pos < size else b""

    def _whole_line_chunks(self, raw, pos, size):
        """Take the chunks from pos on that are whole and hold one whole non-blank line each, as
        Ollama sends them, straight into the lines; where the first other one starts. One split
        at C speed finds every chunk's size line and data, which then only need checking. After
        the first chunk of another shape the answer is parsed the careful way only: a split per
        chunk would make a broken answer of many small chunks cost quadratic time."""
        parts = raw[pos:].split(b"\r\n")
        lines = self._lines
        last = len(parts) - 2  # a chunk needs its size line, its data and the CRLF after both
        index = 0
        while index < last:
            field = parts[index]
            data = parts[index + 1]
            if not field.isalnum() or field[1:2] in (b"x", b"X") or len(field) > 16:
                break
            try:
                length = int(field, 16)
            except ValueError:
                break
            # The data must be exactly the declared bytes (a CRLF inside it would have split it),
            # a line of its own: not blank at its start, one LF, at its end.
            if not length or length != len(data) or data[0] <= 32 or data.find(b"\n") != length - 1:
                break
            lines.append(data[:-1])
            pos += len(field) + length + 4
            index += 2
        if index < last:
            self._other_chunks = True
        return pos

    def _take(self, data):
        """Body bytes: complete non-blank lines to `_lines`, the rest to `_tail`."""
        if b"\n" in data:
            parts = data.split(b"\n")
            self._tail += parts[0]
            parts[0] = bytes(self._tail)
            self._tail = bytearray(parts.pop())
            self._lines.extend([line for line in parts if line.strip()])
        else:
            self._tail += data
        if len(self._tail) > MAX_UPSTREAM_LINE_BYTES:
            raise self.broken(f"sent a line longer than {MAX_UPSTREAM_LINE_BYTES >> 20} MiB")

    def _end_of_body(self):
        self.finished = True
        if self._tail.strip():
            self._lines.append(bytes(self._tail))
        self._tail = bytearray()

    def broken(self, what, failure="other"):
        """The error for an answer that breaks HTTP: a 502, and a connection never used again."""
        self.unusable = True
        return ProxyError(502, f"Ollama at {self.url} {what}", upstream_failure=failure)

    def has_lines(self):
        return bool(self._lines)

    def pop_lines(self):
        """The non-empty complete lines of the body so far, and the unterminated rest once the
        body is complete."""
        lines, self._lines = self._lines, []
        if lines:
            self.delivered = True
        return lines


class UpstreamExchange:
    """One HTTP/1.1 request to Ollama on one connection, its answer read incrementally into an
    UpstreamResponse.

    Reads go through the raw socket, so the caller can wait with poll() on Ollama and on its own
    client at once, send pings between reads and apply one deadline before the first token and
    another between tokens; a socket timeout here never poisons the connection. status, headers,
    finished, has_lines() and pop_lines() are the response's."""

    def __init__(self, sock, url, client=None, request=b"", reused=False):
        self.sock = sock  # non-blocking: one poll object waits for the whole answer
        self.url = url
        self.client = client  # the OllamaClient that keeps the connection afterwards, if any
        self.request_bytes = request  # sent once more if a kept connection turns out closed
        self.reused = reused
        self.fd = sock.fileno()
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self.response = UpstreamResponse(url)

    @property
    def status(self):
        return self.response.status

    @property
    def headers(self):
        return self.response.headers

    @property
    def finished(self):
        return self.response.finished

    @property
    def delivered(self):
        return self.response.delivered

    def has_lines(self):
        return self.response.has_lines()

    def pop_lines(self):
        return self.response.pop_lines()

    def keep_or_close(self, wait=0.05):
        """The answer's last line was read: keep the connection for the next request once the body
        has ended cleanly (its closing chunk trails the last line by a moment), else close it.
        Bytes that come after a complete answer are found by the pool's check before reuse."""
        deadline = time.monotonic() + wait
        upstream_only = None  # the exchange's poller may still watch the client
        response = self.response
        try:
            while not response.finished and response.status == 200:
                if not self.receive():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    if upstream_only is None:
                        upstream_only = select.poll()
                        upstream_only.register(self.sock, select.POLLIN)
                    upstream_only.poll(remaining * 1000)
        except ProxyError:
            response.unusable = True
        if self.client is not None and response.ended_cleanly():
            self.client.keep(self.sock)
        else:
            self.close()

    def _resend_on_fresh_connection(self):
        """A kept connection that Ollama closed before answering anything: send once more on a new one."""
        if not self.reused or self.response.started():
            return False
        self.reused = False
        # Connect first: if the host is gone, the exchange stays as it was, for a failover to take over.
        self._switch_to(self.client.send_on_new_connection(self.request_bytes))
        return True

    def _switch_to(self, sock):
        self.poller.unregister(self.fd)
        self.close()
        self.sock, self.fd = sock, sock.fileno()
        self.poller.register(sock, select.POLLIN)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def take_over(self, other):
        """Go on with another host's exchange of the same request: failover before any line of the
        answer was given out. Whatever the failed host had begun to answer is forgotten; the poller
        stays, with what else it watches (the client)."""
        self._switch_to(other.sock)
        self.url, self.client = other.url, other.client
        self.request_bytes, self.reused, self.response = other.request_bytes, other.reused, other.response

    def tls_pending(self):
        """Decrypted bytes that poll() cannot see, because they left the socket already."""
        return isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0

    def receive(self):
        """Take what has arrived, without waiting; False if nothing had."""
        try:
            data = self.sock.recv(262144)
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        except OSError as exc:
            if self._resend_on_fresh_connection():
                return True
            self.response.unusable = True
            raise ProxyError(502, f"the connection to Ollama at {self.url} broke: {exc}") from exc
        if not data and self._resend_on_fresh_connection():
            return True
        if not data:
            self.response.at_eof()
        else:
            self.response.feed(data)
        return True

    def read_body(self, timeout):
        """The whole body of a short answer (JSON, not a stream); its lines joined by newlines."""
        deadline = time.monotonic() + timeout
        lines, size = [], 0
        while self.status is None or not self.finished:
            if self.receive():
                for line in self.pop_lines():
                    lines.append(line)
                    size += len(line)
                if size > MAX_UPSTREAM_LINE_BYTES:
                    raise self.response.broken(f"sent an answer longer than {MAX_UPSTREAM_LINE_BYTES >> 20} MiB")
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProxyError(504, f"Ollama at {self.url} did not answer within {timeout:g} s")
            self.poller.poll(remaining * 1000)
        return b"\n".join(lines + self.pop_lines())


def decode_ndjson(lines, url):
    """NDJSON lines -> (objects, None), in one decoder call for all the lines that arrived
    together; or (the objects before a bad line, the ProxyError naming it)."""
    try:
        chunks = _decode_json("[" + b",".join(lines).decode() + "]")
        if len(chunks) == len(lines):
            for chunk in chunks:
                if chunk.__class__ is not dict:
                    break
            else:
                return chunks, None
    except (ValueError, RecursionError):
        pass
    chunks = []
    for line in lines:
        try:
            chunk = _decode_json(line.decode())
        except ValueError:
            return chunks, ProxyError(502, f"Ollama at {url} sent a line that is not JSON: {line[:80]!r}")
        except RecursionError:
            return chunks, ProxyError(502, f"Ollama at {url} sent a line nested too deeply: {line[:80]!r}")
        if not isinstance(chunk, dict):
            return chunks, ProxyError(502, f"Ollama at {url} sent an unexpected line: {line[:80]!r}")
        chunks.append(chunk)
    return chunks, None


class OllamaClient:
    """One Ollama host: opens requests to it, remembers each model's capabilities there, and
    carries what the upstream pool routes by (up or down, generations in flight, models)."""

    MAX_IDLE_CONNECTIONS = 32

    def __init__(self, config, address):
        self.config = config
        self.address = address  # an OllamaAddress
        self.url = address.url
        self._host_header = self.url.split("://", 1)[1].encode()
        self._capabilities = {}
        self.up = True  # until a request or a check fails
        self.in_flight = 0  # generations; changed under the pool's lock
        self.last_error = None
        self.models = None  # names from the last /api/tags; None: not asked yet
        self.errors = collections.Counter()  # failures by kind, for /metrics
        self._lock = threading.Lock()
        self._idle = []  # kept-alive connections, most recently used last
        self._tls = ssl.create_default_context() if address.scheme == "https" else None

    def close(self):
        """Close the kept connections (on shutdown)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def keep(self, sock):
        with self._lock:
            if len(self._idle) < self.MAX_IDLE_CONNECTIONS:
                self._idle.append(sock)
                return
        sock.close()

    def _idle_connection(self):
        """A kept-alive connection Ollama has not closed, or None."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                sock = self._idle.pop()
            idle = select.poll()
            idle.register(sock, select.POLLIN)
            if not idle.poll(0):  # readable when idle: Ollama closed it, or sent bytes after an answer
                return sock
            sock.close()

    def open(self, method, path, payload=None):
        """Send one request, on a kept-alive connection when there is one; the caller reads the
        answer from the returned exchange."""
        body = b"" if payload is None else json_bytes(payload)
        head = (method.encode() + b" " + path.encode() + b" HTTP/1.1\r\nHost: " + self._host_header +
                b"\r\nUser-Agent: simple_api_proxy/" + __version__.encode() +
                b"\r\nAccept: application/x-ndjson, application/json\r\n")
        if payload is not None:
            head += b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
        return self.send_request(head + b"\r\n" + body)

    def resend(self, request):
        """A request built for another host, sent here (failover before any answer)."""
        request_line, _, rest = request.partition(b"\r\n")
        _host_line, _, rest = rest.partition(b"\r\n")
        return self.send_request(request_line + b"\r\nHost: " + self._host_header + b"\r\n" + rest)

    def send_request(self, request):
        sock = self._idle_connection()
        if sock is not None:
            try:
                send_nonblocking(sock, request, self.config.ollama_timeout)
                return UpstreamExchange(sock, self.url, self, request, reused=True)
            except OSError:
                sock.close()
        return UpstreamExchange(self.send_on_new_connection(request), self.url, self, request)

    def send_on_new_connection(self, request):
        """A new connection to the host with the request sent on it."""
        sock = self._connect()
        try:
            send_nonblocking(sock, request, self.config.ollama_timeout)
        except OSError as exc:
            sock.close()
            raise ProxyError(502, f"sending the request to Ollama at {self.url} failed: {exc}") from exc
        return sock

    def _connect(self):
        address = self.address
        try:
            sock = socket.create_connection((address.hostname, address.port), timeout=self.config.ollama_timeout)
        except socket.timeout as exc:
            raise ProxyError(504, f"connecting to Ollama at {self.url} timed out after "
                                  f"{self.config.ollama_timeout:g} s; check OLLAMA_HOST and that "
                                  "`ollama serve` is running") from exc
        except OSError as exc:
            raise ProxyError(502, f"cannot reach Ollama at {self.url} ({exc.strerror or exc}); "
                                  "check that `ollama serve` is running and OLLAMA_HOST points at it") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls:
                sock = self._tls.wrap_socket(sock, server_hostname=address.hostname)
            sock.setblocking(False)  # for as long as the connection lives, reused or not
        except OSError as exc:
            sock.close()
            raise ProxyError(502, f"TLS to Ollama at {self.url} failed: {exc}") from exc
        return sock

    def get_json(self, path, payload=None, timeout=None):
        """A short request answered with JSON: returns (status, parsed body or None)."""
        exchange = self.open("POST" if payload is not None else "GET", path, payload)
        try:
            body = exchange.read_body(timeout or self.config.ollama_timeout)
        except BaseException:
            exchange.close()
            raise
        exchange.keep_or_close()
        try:
            return exchange.status, json.loads(body)
        except ValueError:
            return exchange.status, None

    def installed_models(self):
        status, body = self.get_json("/api/tags")
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("models"), list):
            raise ProxyError(502, f"Ollama at {self.url} answered /api/tags with HTTP {status}")
        return [m for m in body["models"] if isinstance(m, dict) and isinstance(m.get("name"), str)]

    def capabilities(self, model):
        """The model's capabilities from /api/show, remembered; raises 404 for a model Ollama lacks."""
        with self._lock:
            known = self._capabilities.get(model)
        if known is not None:
            return known
        status, body = self.get_json("/api/show", {"model": model})
        if status == 404:
            raise self.missing_model(model)
        if status != 200 or not isinstance(body, dict):
            return frozenset()  # unknown this time: assume nothing and ask again next time
        capabilities = frozenset(c for c in body.get("capabilities") or () if isinstance(c, str))
        with self._lock:
            self._capabilities[model] = capabilities
        return capabilities

    def has_installed(self, model):
        """Whether the model was in the last list of models or answered /api/show (never asks)."""
        with self._lock:
            if model in self._capabilities:
                return True
        models = self.models
        return models is not None and any(same_model(model, name) for name in models)

    def missing_model(self, model):
        try:
            names = sorted(m["name"] for m in self.installed_models())
        except ProxyError:
            names = []
        installed = ", ".join(names) if names else "none"
        return ProxyError(404, f"model {model!r} is not installed in Ollama at {self.url}; installed: "
                               f"{installed}. Run `ollama pull {model}` or set OLLAMA_MODEL / MODEL_MAP.",
                          "not_found_error", retry=False)


###############################################################################
# Upstream pool: several Ollama hosts
###############################################################################

def every_host_failed(failures):
    """The error when no host could answer: the one host's own, or each host's reason in one."""
    last = failures[-1]
    if len(failures) == 1:
        return last
    return ProxyError(last.status, f"none of the {len(failures)} Ollama hosts could answer: "
                                   + "; ".join(error.message for error in failures),
                      last.error_type, retry=last.retry, retry_after=last.retry_after)


def failure_kind(error):
    """A short name for why a host failed, for the log and /metrics."""
    cause = error.__cause__
    if isinstance(cause, ConnectionRefusedError):
        return "refused"
    if isinstance(cause, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    if error.status == 504 or isinstance(cause, socket.timeout):
        return "timeout"
    return error.upstream_failure or "other"


class UpstreamPool:
    """The Ollama hosts of OLLAMA_HOST, and which one serves each generation.

    A generation goes to a host that is up and has its model, the least busy one (ties rotate),
    except that a conversation stays on the host that served its previous turn while that host is
    not busier than the others: Ollama's prompt cache lives on one host, and moving a long
    conversation means reading its whole prompt again. A host that fails before answering is
    marked down and the request moves on; a check every RECHECK_SECONDS brings it back (and loads
    the model on it again)."""

    RECHECK_SECONDS = 3.0
    AFFINITY_ENTRIES = 4096

    def __init__(self, config):
        self.config = config
        self.hosts = [OllamaClient(config, address) for address in config.ollama_addresses]
        self.single = len(self.hosts) == 1
        self._lock = threading.Lock()
        self._turn = 0  # rotates ties between equally busy hosts
        self._affinity = collections.OrderedDict()  # conversation key -> the host of its last turn
        self._lists_refreshed = 0.0
        self.warmup = Warmup(config)
        self.stopped = threading.Event()

    def start(self):
        """Begin the checks and the warm-up, once the proxy has its port."""
        for host in self.hosts:
            threading.Thread(target=self._watch, args=(host,), name=f"upstream-watch {host.url}",
                             daemon=True).start()

    def close(self):
        """Stop the checks and close the kept connections (on shutdown)."""
        self.stopped.set()
        for host in self.hosts:
            host.close()

    # -- host state ----------------------------------------------------------------
    def _watch(self, host):
        # A single host without warm-up needs no list of models: it answers 404 itself.
        if not (self.single and self.config.ollama_warmup == "off") and self.check(host):
            self.warmup.run(host, self.stopped)
        while not self.stopped.wait(self.RECHECK_SECONDS):
            if not host.up and self.check(host):
                log.info("upstream: Ollama at %s is back", host.url)
                self.warmup.run(host, self.stopped)

    def check(self, host):
        """Ask the host for its models; True if it answered (and is now up)."""
        try:
            host.models = [m["name"] for m in host.installed_models()]
        except ProxyError as error:
            self.mark_down(host, error)
            return False
        with self._lock:
            host.up = True
        return True

    def mark_down(self, host, error):
        kind = failure_kind(error)
        with self._lock:
            was_up, host.up = host.up, False
            host.last_error = error.message
            host.errors[kind] += 1
        if was_up:
            log.warning("upstream: Ollama at %s is down (%s: %s); checking again every %g s", host.url, kind,
                        error.message, self.RECHECK_SECONDS)

    def has_model(self, host, model):
        return host.models is None or any(same_model(model, name) for name in host.models)

    def installed(self, model):
        """Whether a host is known to have the model: it listed it, or described it (never asks)."""
        return any(host.has_installed(model) for host in self.hosts)

    # -- routing ---------------------------------------------------------------------
    def route(self, model, payload):
        """The hosts that may serve this model, for one generation (a 404 if none has it)."""
        if self.single:
            return UpstreamRoute(self, model, self.hosts, None)
        hosts = [host for host in self.hosts if self.has_model(host, model)]
        if not hosts and self._refresh_lists():
            hosts = [host for host in self.hosts if self.has_model(host, model)]
        if not hosts:
            raise self.missing_model(model)
        return UpstreamRoute(self, model, hosts, conversation_key(payload))

    def _refresh_lists(self):
        """Ask every host for its models again, at most once per RECHECK_SECONDS: a model pulled
        since the last look should not be a 404."""
        with self._lock:
            if time.monotonic() - self._lists_refreshed < self.RECHECK_SECONDS:
                return False
            self._lists_refreshed = time.monotonic()
        for host in self.hosts:
            if host.up:  # a host that is down is checked (and warmed up when back) by its watch
                self.check(host)
        return True

    def reserve(self, route):
        """Pick the next host for the route and count the generation on it, atomically, so that
        requests arriving together spread."""
        with self._lock:
            left = [host for host in route.hosts if host not in route.tried]
            if not left:
                return None
            candidates = [host for host in left if host.up] or left
            least = min(host.in_flight for host in candidates)
            chosen = self._affinity.get(route.conversation) if route.conversation else None
            if chosen not in candidates or chosen.in_flight > least:
                idle = [host for host in candidates if host.in_flight == least]
                chosen = idle[self._turn % len(idle)]
                self._turn += 1
            chosen.in_flight += 1
            route.tried.append(chosen)
        return chosen

    def release(self, host):
        with self._lock:
            host.in_flight -= 1

    def remember(self, route, host):
        if route.conversation is None:
            return
        with self._lock:
            self._affinity[route.conversation] = host
            self._affinity.move_to_end(route.conversation)
            if len(self._affinity) > self.AFFINITY_ENTRIES:
                self._affinity.popitem(last=False)

    # -- what clients see ------------------------------------------------------------
    def capabilities(self, model):
        """The model's capabilities, from the first host that has it and answers."""
        if self.single:
            return self.hosts[0].capabilities(model)
        failures = []
        hosts = [host for host in self.hosts if self.has_model(host, model)]
        for host in sorted(hosts, key=lambda host: not host.up):
            try:
                return host.capabilities(model)
            except ProxyError as error:
                if error.status != 404:
                    self.mark_down(host, error)
                    failures.append(error)
        if not failures:
            raise self.missing_model(model)
        raise every_host_failed(failures)

    def installed_models(self):
        """The union of the hosts' models, in host order; an error only if no host answers. Hosts
        marked down are left to their watch, unless all are: a hung one would hold every listing."""
        if self.single:
            return self.hosts[0].installed_models()
        models, seen, failures = [], set(), []
        hosts = [host for host in self.hosts if host.up] or self.hosts
        for host in hosts:
            try:
                listed = host.installed_models()
            except ProxyError as error:
                failures.append(error)
                continue
            for model in listed:
                if model["name"] not in seen:
                    seen.add(model["name"])
                    models.append(model)
        if len(failures) == len(hosts):
            raise every_host_failed(failures)
        return models

    def health(self, timeout):
        """Each host as /health shows it. Several hosts are asked in parallel, so that one slow
        host does not hold up the answer."""
        if self.single:
            return [self._probe(self.hosts[0], timeout)]
        reports = [{"url": host.url, "reachable": False, "error": "no answer in time"} for host in self.hosts]

        def probe(index, host):
            reports[index] = self._probe(host, timeout)

        threads = [threading.Thread(target=probe, args=(index, host), daemon=True)
                   for index, host in enumerate(self.hosts)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 3 * timeout + 1
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return reports

    def _probe(self, host, timeout):
        default = self.config.ollama_model
        report = {"url": host.url}
        began = time.monotonic()
        try:
            status, body = host.get_json("/api/version", timeout=timeout)
            report["latency_ms"] = round((time.monotonic() - began) * 1000, 1)
            report["reachable"] = status == 200
            report["version"] = body.get("version") if isinstance(body, dict) else None
            host.models = [m["name"] for m in host.installed_models()]
            report["models"] = host.models
            report["default_model_installed"] = any(same_model(default, name) for name in host.models)
            report["loaded"] = self._loaded(host, timeout)
            if report["loaded"] is not None:
                report["default_model_loaded"] = any(same_model(default, m["name"]) for m in report["loaded"])
        except ProxyError as error:
            report["reachable"] = False
            report["error"] = error.message
            self.mark_down(host, error)
        report.update(up=host.up, in_flight=host.in_flight, last_error=host.last_error)
        return report

    @staticmethod
    def _loaded(host, timeout):
        """The models Ollama has in memory (/api/ps), with the context each was loaded with."""
        status, body = host.get_json("/api/ps", timeout=timeout)
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("models"), list):
            return None
        return [{"name": m["name"], "context_length": m.get("context_length"), "expires_at": m.get("expires_at"),
                 "size_vram": m.get("size_vram")}
                for m in body["models"] if isinstance(m, dict) and isinstance(m.get("name"), str)]

    def missing_model(self, model):
        """The 404 for a model no host has, listing what each host has installed."""
        if self.single:
            return self.hosts[0].missing_model(model)
        listings = []
        for host in self.hosts:
            try:
                names = sorted(m["name"] for m in host.installed_models())
                listings.append(f"{host.url}: {', '.join(names) or 'none'}")
            except ProxyError:
                listings.append(f"{host.url}: unreachable")
        return ProxyError(404, f"model {model!r} is not installed on any Ollama host; installed: "
                               f"{'; '.join(listings)}. Run `ollama pull {model}` on a host or set "
                               "OLLAMA_MODEL / MODEL_MAP.", "not_found_error", retry=False)


class UpstreamRoute:
    """One generation's way through the pool: the host serving it, and the ones it may move to
    while Ollama has not answered."""

    def __init__(self, pool, model, hosts, conversation):
        self.pool = pool
        self.model = model  # Ollama's name for it
        self.hosts = hosts
        self.conversation = conversation
        self.tried = []
        self.host = None  # the host counting this generation as in flight
        self.failures = []  # why each host tried could not take the request

    def open(self, path, payload):
        """Send the request to the best host, moving on from hosts that cannot be reached."""
        return self._send(lambda host: host.open("POST", path, payload))

    def fail_over(self, exchange, error):
        """After `error` and before any line of the answer was given out: send the request to the
        next host and go on there. False when it cannot be moved (the error stands);
        every_host_failed() when no host is left to move to."""
        if error.status != 502 or exchange.delivered or self.host is None:
            return False
        failed, self.host = self.host, None
        self.pool.release(failed)
        self._host_failed(failed, error)
        moved = self._send(lambda host: host.resend(exchange.request_bytes))
        exchange.take_over(moved)
        log.info("upstream: moved a request from Ollama at %s to %s", failed.url, self.host.url)
        return True

    def _send(self, send):
        """send(host) on the next host until one takes the request; that host's exchange. Every host
        reserved is released on every path but the one that returns."""
        while True:
            host = self.pool.reserve(self)
            if host is None:
                raise every_host_failed(self.failures)
            try:
                exchange = send(host)
            except ProxyError as error:
                self.pool.release(host)
                self._host_failed(host, error)
                continue
            except BaseException:  # not the host's fault: give its place back and let the error stand
                self.pool.release(host)
                raise
            self.host = host
            self.pool.remember(self, host)
            return exchange

    def _host_failed(self, host, error):
        self.pool.mark_down(host, error)
        self.failures.append(error)

    def finish(self):
        if self.host is not None:
            self.pool.release(self.host)
            self.host = None


class Warmup:
    """Loads models on a host in the background, with the num_ctx and keep_alive real requests
    carry, so that the first request does not wait for the load. Never delays start-up."""

    def __init__(self, config):
        self.config = config
        self.models = []
        if config.ollama_warmup != "off":
            self.models.append(config.ollama_model)
        if config.ollama_warmup == "all":
            self.models += [m for m in config.model_map.values() if m not in self.models]

    def run(self, host, stopped):
        for model in self.models:
            if stopped.is_set():
                return
            if host.models is not None and not any(same_model(model, name) for name in host.models):
                log.warning("warm-up: %s is not installed in Ollama at %s", model, host.url)
                continue
            began = time.monotonic()
            try:
                status, body = host.get_json("/api/chat", load_request(model, self.config),
                                             timeout=self.config.ollama_first_token_timeout)
            except ProxyError as error:
                log.warning("warm-up: loading %s in Ollama at %s failed: %s", model, host.url, error.message)
                continue
            if status == 200:
                log.info("warm-up: %s loaded in Ollama at %s in %.1f s", model, host.url,
                         time.monotonic() - began)
            else:
                log.warning("warm-up: Ollama at %s answered HTTP %s loading %s: %s", host.url,
                            status, model, (body or {}).get("error") if isinstance(body, dict) else body)


###############################################################################
# Generation: one request's conversation with Ollama
###############################################################################

class Generation:
    """One request's generation, from the request sent to Ollama to the last event translated.

    - open() sends the request to a host of its UpstreamRoute (which picks the host and moves on
      from hosts that fail);
    - collect() reads a reply nobody streams, stream() writes one to the client as it comes; both
      read Ollama's answer through batches(), under the first-token and between-token deadlines,
      waiting in wait(), and move the request to another host while no line of the answer has
      been given out;
    - over() gives the host's count and the generation's slot back, as soon as the answer is
      complete; close() then keeps Ollama's connection after a complete answer, or closes it,
      which also stops a generation still running.

    The client is reached only through `client`, which the HTTP handler gives: begin_stream(
    cache_state), write_events(events), end_stream(events), `committed` (the 200 and the stream's
    head are on their way), and `connection`, its socket, watched while Ollama works so that a
    client who leaves stops the generation (ClientGone)."""

    FAIL_FAST_SECONDS = 1.0  # how long a stream waits for Ollama's status before committing to 200
    # Lines that arrived together leave together: the events of the first LINES_PER_WRITE lines at
    # once, so the first text need not wait for the last, then of twice as many lines each write up
    # to MAX_LINES_PER_WRITE, as each send() costs a system call and a hand-off of the interpreter
    # lock. A text line makes one event.
    LINES_PER_WRITE = 16
    MAX_LINES_PER_WRITE = 256

    def __init__(self, config, route, translator, client, *, request_id, input_estimate, stop_fd, on_over):
        self.config = config
        self.route = route
        self.translator = translator
        self.client = client
        self.request_id = request_id  # for the log
        self.input_estimate = input_estimate  # tokens, for a context-length refusal from Ollama
        self.stop_fd = stop_fd  # readable once the proxy's shutdown grace is over
        self.on_over = on_over  # gives the generation's slot back
        self.exchange = None
        self.first_token_at = None  # when Ollama's first output arrived
        self.error = None  # what ended a committed stream early
        self._next_ping = 0.0
        self._over = False

    def open(self, path, payload):
        self.exchange = self.route.open(path, payload)

    def over(self):
        """Give the slot and the host's count back, once: as soon as Ollama's answer is complete,
        before its last bytes leave, so that a client's next request never finds them still taken."""
        if self._over:
            return
        self._over = True
        self.route.finish()
        self.on_over()

    def close(self):
        """Keep Ollama's connection after a complete answer; else close it, which also stops a
        generation still running."""
        self.over()
        exchange = self.exchange
        if exchange is None:
            return
        if not self.translator.upstream_done:
            exchange.close()
            return
        try:
            exchange.keep_or_close()
        except BaseException:
            exchange.close()
            raise

    # -- reading Ollama's answer -----------------------------------------------------
    def wait(self, deadline, what, until=None):
        """Wait for Ollama until the deadline (or `until`), watching whether our client went away,
        and keeping a committed stream alive with pings."""
        exchange = self.exchange
        if exchange.tls_pending():
            exchange.receive()
            return
        now = time.monotonic()
        if now >= deadline:
            raise ProxyError(504, what, "timeout_error")
        step = min(deadline - now, 1.0)
        if until is not None:
            step = max(0.0, min(step, until - now))
        committed = self.client.committed
        if committed:
            step = max(0.0, min(step, self._next_ping - now))
        for fd, event in exchange.poller.poll(step * 1000):
            if fd == exchange.fd:
                exchange.receive()
            elif fd == self.stop_fd:
                raise ProxyError(529, "the proxy is shutting down", "overloaded_error")
            else:
                self._check_client(exchange.poller, event)
        if committed and time.monotonic() >= self._next_ping:
            self.client.write_events([("ping", {"type": "ping"})])
            self._next_ping = time.monotonic() + self.config.ping_interval

    def _check_client(self, poller, event):
        if event & CLIENT_GONE_EVENTS:
            raise ClientGone()
        # Without POLLRDHUP only a read can tell a close from early bytes of the next request.
        connection = self.client.connection
        try:
            peeked = connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise ClientGone() from exc
        if not peeked:
            raise ClientGone()
        poller.unregister(connection)  # the client sent its next request early: reads cannot tell

    def batches(self, commit=None):
        """Ollama's NDJSON objects as they arrive, a list of those that came together at a time,
        under the first-token and between-token deadlines.

        `commit`, for streams, is called once: when Ollama's answer starts, or when it has not
        started within FAIL_FAST_SECONDS (from then on pings keep the client waiting)."""
        config, exchange = self.config, self.exchange
        # Watch our client too: if it leaves, Ollama's request is closed, which stops the generation.
        exchange.poller.register(self.client.connection, CLIENT_WATCH_EVENTS)
        exchange.poller.register(self.stop_fd, select.POLLIN)
        deadline = time.monotonic() + config.ollama_first_token_timeout
        commit_at = time.monotonic() + self.FAIL_FAST_SECONDS if commit else None
        first_wait = (f"Ollama sent nothing for {config.ollama_first_token_timeout:g} s "
                      "(OLLAMA_FIRST_TOKEN_TIMEOUT): the model may still be loading or the prompt is very long")
        # Until a line of the answer is given out, a host that fails costs the client nothing: the
        # request moves to the next host (a stream's message_start says nothing a move changes).
        while exchange.status in (None, 200) and not (exchange.has_lines() or exchange.finished):
            if commit_at is not None and (exchange.status == 200 or time.monotonic() >= commit_at):
                commit()
                commit_at = None
            try:
                self.wait(deadline, first_wait, until=commit_at)
            except ProxyError as error:
                if not self.route.fail_over(exchange, error):
                    raise
        if exchange.status != 200:
            raise self._failure()
        if commit_at is not None:
            commit(now=not exchange.has_lines())
        silence = first_wait
        while True:
            lines = exchange.pop_lines()
            if not lines:
                if exchange.finished:
                    raise ProxyError(502, f"Ollama at {exchange.url} ended the reply before it was done")
                self.wait(deadline, silence)
                continue
            # The first line of a stream goes on alone, so that the first text need not wait for
            # the lines that came with it to be decoded.
            parts = (lines[:1], lines[1:]) if commit and self.first_token_at is None and len(lines) > 1 else (lines,)
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            deadline = time.monotonic() + config.ollama_timeout
            silence = f"Ollama went silent for {config.ollama_timeout:g} s mid-reply (OLLAMA_TIMEOUT)"
            for part in parts:
                batch, error = decode_ndjson(part, exchange.url)
                yield batch
                if error:
                    raise error

    def _failure(self):
        """The ProxyError for an Ollama answer with an error status."""
        exchange = self.exchange
        deadline = time.monotonic() + self.config.ollama_timeout
        while not exchange.finished:
            self.wait(deadline, "Ollama did not finish its error response")
        raw = b"\n".join(exchange.pop_lines())
        try:
            text = json.loads(raw)["error"]
        except (ValueError, KeyError, TypeError):
            text = raw.decode("utf-8", "replace")
        if exchange.status == 404:
            return self.route.pool.missing_model(self.route.model)
        return upstream_status_error(exchange.status, str(text)[:500], exchange.url,
                                     self.input_estimate, self.config.ollama_num_ctx)

    # -- the two ways to answer ------------------------------------------------------------
    def collect(self):
        """The whole message of a reply nobody streams."""
        translator = self.translator
        try:
            for batch in self.batches():
                if translator.translate(batch):
                    return translator.message
        except RecursionError:
            raise upstream_nested_too_deeply() from None
        raise ProxyError(502, f"Ollama at {self.exchange.url} ended the reply before it was done")

    def stream(self, cache_state):
        """Stream Ollama's answer as SSE; the message, or None if the stream had to end with an error.

        Failures before the commit keep their HTTP status; after it they end the stream with an
        error event, which is all a client can still be told."""
        client, translator = self.client, self.translator
        events = []

        def commit(now=True):
            """Begin the stream. Unless now, its opening events wait to leave with the first text,
            already there: one write less before it."""
            client.begin_stream(cache_state)
            opening = translator.start() + [("ping", {"type": "ping"})]
            if now:
                client.write_events(opening)
            else:
                events.extend(opening)
            self._next_ping = time.monotonic() + self.config.ping_interval

        try:
            for batch in self.batches(commit):
                start, write_at = 0, self.LINES_PER_WRITE
                while start < len(batch):
                    end = start + write_at
                    if translator.translate(batch[start:end], events):
                        break
                    start = end
                    if start < len(batch):  # more of this burst to come
                        client.write_events(events)
                        events = []
                        write_at = min(2 * write_at, self.MAX_LINES_PER_WRITE)
                if translator.done:
                    break
                client.write_events(events)
                events = []
            else:
                raise ProxyError(502, f"Ollama at {self.exchange.url} ended the reply before it was done")
        except (ProxyError, RecursionError) as failure:
            error = failure if isinstance(failure, ProxyError) else upstream_nested_too_deeply()
            if not client.committed:
                raise error from None
            self.error = error
            log.warning("%s stream ended by %s: %s", self.request_id, error.error_type, error.message)
            # The error event and the closing chunk end the response cleanly: the connection,
            # announced as kept alive, stays usable.
            client.end_stream(events + translator.error_events(error))
            return None
        self.over()
        client.end_stream(events)
        return translator.message


###############################################################################
# Cache
###############################################################################

CACHE_KEY_PREFIX = "simple_api_proxy:v2:"
# Entries are {"v": CACHE_ENTRY_VERSION, "message": ...}; anything else found under a key is a miss.
CACHE_ENTRY_VERSION = 2
CACHED_STOP_REASONS = frozenset(("end_turn", "max_tokens", "stop_sequence", "tool_use"))
CACHE_KEY_PAYLOAD_FIELDS = ("model", "messages", "tools", "options", "format")


def cache_key(ollama_payload, request, recover_tool_calls, redacted_thinking=False):
    """SHA-256 of the request as Ollama will see it, plus the fields the proxy acts on itself.

    The Ollama payload is already the normal form: the resolved model, the system prompt without
    Claude Code's per-request billing line, merged turns, no cache_control or metadata; it holds
    the messages, tools (after tool_choice), max_tokens and the sampling options. Stop sequences,
    thinking and effort are enforced here rather than upstream, so they join the key separately,
    as does the redact-thinking beta (a header), which changes the shape of thinking blocks."""
    material = [{field: ollama_payload[field] for field in CACHE_KEY_PAYLOAD_FIELDS if field in ollama_payload},
                request.get("stop_sequences") or None, request.get("thinking"),
                (request.get("output_config") or {}).get("effort"), recover_tool_calls]
    if redacted_thinking:
        material.append("redacted_thinking")
    canonical = _compact_json(material)
    return CACHE_KEY_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()


def encode_cache_entry(message_json):
    """The stored form of a message, from the JSON the client gets: {"v": ..., "message": ...}."""
    return b'{"v":%d,"message":%s}' % (CACHE_ENTRY_VERSION, message_json)


def decode_cache_entry(value):
    """A stored entry -> the message to replay, or None when it is not an answer this proxy version
    stored: Redis is shared, outlives proxy versions and can be written by anyone, so what comes
    back is checked as fully as a request is before it is replayed."""
    try:
        entry = decode_strict_json(str(value, "utf-8") if isinstance(value, bytes) else value)
    except (ValueError, TypeError, RecursionError):
        return None
    if not isinstance(entry, dict) or entry.get("v") != CACHE_ENTRY_VERSION:
        return None
    message = entry.get("message")
    return message if is_replayable_message(message) else None


def _is_count(value):
    return type(value) is int and value >= 0


# The keys of what this proxy stores, exactly: an entry with any other key (of whatever type) was
# not written by it, and a client would be handed fields it cannot parse.
STORED_MESSAGE_KEYS = frozenset(("id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"))
STORED_USAGE_KEYS = frozenset(("input_tokens", "output_tokens", "cache_creation_input_tokens",
                               "cache_read_input_tokens"))
STORED_BLOCK_KEYS = {"text": frozenset(("type", "text")), "thinking": frozenset(("type", "thinking", "signature")),
                     "redacted_thinking": frozenset(("type", "data")),
                     "tool_use": frozenset(("type", "id", "name", "input"))}


def _is_replayable_block(block):
    keys = STORED_BLOCK_KEYS.get(block.get("type")) if isinstance(block, dict) else None
    if keys is None or block.keys() != keys:
        return False
    kind = block.get("type")
    if kind == "text":
        return isinstance(block.get("text"), str)
    if kind == "thinking":
        return isinstance(block.get("thinking"), str) and isinstance(block.get("signature"), str)
    if kind == "redacted_thinking":
        return isinstance(block.get("data"), str)
    if kind == "tool_use":
        return (isinstance(block.get("id"), str) and isinstance(block.get("name"), str)
                and isinstance(block.get("input"), dict))
    return False


def is_replayable_message(message):
    """Everything replay() and message_to_events() rely on, with the types the client expects."""
    if not isinstance(message, dict) or message.keys() != STORED_MESSAGE_KEYS:
        return False
    if message["type"] != "message" or message["role"] != "assistant":
        return False
    if not isinstance(message["id"], str) or not isinstance(message["model"], str):
        return False
    if message.get("stop_reason") not in CACHED_STOP_REASONS:
        return False
    if not (message.get("stop_sequence") is None or isinstance(message.get("stop_sequence"), str)):
        return False
    usage = message["usage"]
    if not isinstance(usage, dict) or usage.keys() != STORED_USAGE_KEYS or not all(map(_is_count, usage.values())):
        return False
    content = message.get("content")
    return isinstance(content, list) and all(_is_replayable_block(block) for block in content)


# Where replays of one answer differ (the message id, the model, each tool_use id): strings no real
# id or model name is, encoded into the answer's JSON once and found again as json writes them.
_REPLAY_SLOT = re.compile(rb'"\\u0000([imt])\\u0000"')


def cache_policy(cache, cache_control, request, payload, recover_tool_calls, redacted_thinking=False):
    """(key, look it up?, store the answer?) from CACHE and the client's Cache-Control header."""
    if not cache.enabled:
        return None, False, False
    directives = cache_control.lower()
    no_store = "no-store" in directives
    key = cache_key(payload, request, recover_tool_calls, redacted_thinking)
    return key, not no_store and "no-cache" not in directives, not no_store


class ReplayableAnswer:
    """A checked answer in the cache, held as its JSON; at its first replay that JSON is split
    where replays differ, and each replay joins the pieces around fresh ids and the client's model
    name, where decoding, checking and encoding the whole message each time would cost several
    times more. Either form is about the size of the stored entry, which is what the memory
    tier's bound counts; a miss that is never replayed pays for no split."""

    __slots__ = ("input_tokens", "output_tokens", "_json", "_pieces")

    def __init__(self, message, message_json):
        self.input_tokens = message["usage"]["input_tokens"]
        self.output_tokens = message["usage"]["output_tokens"]
        self._json = message_json  # json_bytes(message), until the split replaces it
        self._pieces = None

    def body(self, model):
        """The JSON body of a replay: the stored message with fresh ids and this model."""
        pieces = self._pieces
        if pieces is None:
            stored = self._json
            if stored is None:  # another thread split it a moment ago
                pieces = self._pieces
            else:
                pieces = self._pieces = self._split(_decode_json(stored.decode()))
                self._json = None
        out = [pieces[0]]
        for index in range(1, len(pieces), 2):
            slot = pieces[index]
            out.append(_json_string(model).encode() if slot == b"m" else
                       b'"%s"' % (new_id("msg_") if slot == b"i" else new_id("toolu_")).encode())
            out.append(pieces[index + 1])
        return b"".join(out)

    def fresh_message(self, model):
        """The message of a streamed replay, its own copy."""
        return _decode_json(self.body(model).decode())

    @staticmethod
    def _split(message):
        """[bytes, slot, bytes, slot, ..., bytes]: the message's JSON cut at its slots."""
        pattern, tag = _REPLAY_SLOT, ""
        tools = sum(block["type"] == "tool_use" for block in message["content"])
        while True:
            content = [dict(block, id=f"\0t{tag}\0") if block["type"] == "tool_use" else block
                       for block in message["content"]]
            pieces = pattern.split(json_bytes(dict(message, id=f"\0i{tag}\0", model=f"\0m{tag}\0", content=content)))
            slots = pieces[1::2]
            if slots.count(b"i") == 1 and slots.count(b"m") == 1 and len(slots) == 2 + tools:
                return pieces
            # The text holds a slot's bytes: slots with a random tag in them, which no text can guess.
            tag = new_id("")
            pattern = re.compile(rb'"\\u0000([imt])' + tag.encode() + rb'\\u0000"')


class TierStats:
    def __init__(self):
        self.hits = 0
        self.misses = 0
        self.last_error = None

    def snapshot(self):
        lookups = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses,
                "hit_ratio": round(self.hits / lookups, 4) if lookups else 0.0, "last_error": self.last_error}


class MemoryTier:
    """An LRU of answers, bounded by entries and by the bytes their stored form takes, each with
    an expiry."""

    def __init__(self, max_entries, max_bytes, ttl):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.entries = collections.OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()
        self.stats = TierStats()

    def get(self, key):
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None and entry[2] > time.monotonic():
                self.entries.move_to_end(key)
                self.stats.hits += 1
                return entry[0]
            if entry is not None:
                self._remove(key)
            self.stats.misses += 1
            return None

    def put(self, key, value, size):
        if size > self.max_bytes:
            return
        with self.lock:
            if key in self.entries:
                self._remove(key)
            self.entries[key] = (value, size, time.monotonic() + self.ttl)
            self.bytes += size
            while len(self.entries) > self.max_entries or self.bytes > self.max_bytes:
                self._remove(next(iter(self.entries)))

    def _remove(self, key):
        _, size, _ = self.entries.pop(key)
        self.bytes -= size

    def health(self):
        with self.lock:
            return dict(state="up", entries=len(self.entries), bytes=self.bytes, **self.stats.snapshot())


class RedisTier:
    """A shared Redis cache that is never in the way: short timeouts, marked down at the first failure,
    reconnected by a background check."""

    RECHECK_SECONDS = 3.0

    def __init__(self, url, ttl, timeout):
        self.url = url
        self.ttl = ttl
        self.stats = TierStats()
        self.up = False
        self.reason = None
        self.client = None
        self._lock = threading.Lock()
        self.stopped = threading.Event()
        try:
            import redis
        except ImportError:
            self.reason = "redis-py is not installed (pip install redis)"
            log.warning("cache: Redis configured but %s; using the memory cache only", self.reason)
            return
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                           health_check_interval=0, retry_on_timeout=False)
        self._check()
        threading.Thread(target=self._watch, name="redis-watch", daemon=True).start()

    def _check(self):
        try:
            self.client.ping()
        except Exception as exc:  # redis-py raises many types; any failure means down
            self._mark_down(exc)
            return
        with self._lock:
            was_up, self.up = self.up, True
        if not was_up:
            log.info("cache: Redis at %s is up", mask_url_password(self.url))

    def _watch(self):
        while not self.stopped.wait(self.RECHECK_SECONDS):
            if not self.up:
                self._check()

    def close(self):
        self.stopped.set()
        if self.client is not None:
            self.client.close()

    def _mark_down(self, exc):
        message = f"{type(exc).__name__}: {exc}"
        with self._lock:
            was_up, self.up = self.up, False
            self.stats.last_error = message
        if was_up or self.reason is None:
            log.warning("cache: Redis at %s is down (%s); serving without it and retrying every %g s",
                        mask_url_password(self.url), message, self.RECHECK_SECONDS)
        self.reason = message

    def get(self, key):
        if not self.up:
            return None
        try:
            value = self.client.get(key)
        except Exception as exc:
            self._mark_down(exc)
            return None
        if value is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        return value

    def put(self, key, value):
        if not self.up:
            return
        try:
            self.client.set(key, value, ex=self.ttl)
        except Exception as exc:
            self._mark_down(exc)

    def discard(self, key):
        """Drop an entry that turned out unusable; its lookup counts as a miss."""
        self.stats.hits -= 1
        self.stats.misses += 1
        if not self.up:
            return
        try:
            self.client.delete(key)
        except Exception as exc:
            self._mark_down(exc)

    def health(self):
        if self.client is None:
            return {"state": "disabled", "reason": self.reason}
        info = dict(state="up" if self.up else "down", url=mask_url_password(self.url), **self.stats.snapshot())
        if self.up:
            try:
                info["db_keys"] = self.client.dbsize()
            except Exception as exc:
                self._mark_down(exc)
                info["state"] = "down"
        return info


class ResponseCache:
    """Memory first, then Redis; a Redis hit warms the memory tier."""

    def __init__(self, config):
        self.enabled = config.cache_enabled
        self.memory = MemoryTier(config.cache_max_entries, config.cache_max_bytes, config.cache_ttl) \
            if self.enabled else None
        self.redis = RedisTier(config.redis_url, config.cache_ttl, config.redis_timeout) \
            if self.enabled and config.redis_url else None

    def get(self, key):
        """The ReplayableAnswer for key, or None. The memory tier holds only answers this process
        made or checked; a Redis entry that is not a valid answer is a miss: logged, dropped, and
        replaced when the fresh answer is stored."""
        answer = self.memory.get(key)
        if answer is not None or self.redis is None:
            return answer
        value = self.redis.get(key)
        if value is None:
            return None
        message = decode_cache_entry(value)
        if message is None:
            log.warning("cache: the redis entry %s is not an answer this proxy stored (%d bytes); "
                        "treated as a miss and replaced", key, len(value))
            self.redis.discard(key)
            return None
        answer = ReplayableAnswer(message, json_bytes(message))
        self.memory.put(key, answer, len(value))
        return answer

    def put(self, key, message, message_json=None):
        """Store an answer; message_json, when the caller has it, is json_bytes(message). One that
        would not pass the checks a stored entry gets when read back (Ollama's usage counts not
        counts, say) is not stored at all."""
        if not is_replayable_message(message):
            log.warning("cache: the answer for %s is not stored: it does not have the shape of one that "
                        "can be replayed", key)
            return
        message_json = message_json or json_bytes(message)
        value = encode_cache_entry(message_json)
        self.memory.put(key, ReplayableAnswer(message, message_json), len(value))
        if self.redis is not None:
            self.redis.put(key, value)

    def close(self):
        if self.redis is not None:
            self.redis.close()

    def health(self):
        if not self.enabled:
            return {"enabled": False, "memory": {"state": "disabled"}, "redis": {"state": "disabled"}}
        redis = self.redis.health() if self.redis else {"state": "disabled", "reason": "REDIS_URL/REDIS_HOST not set"}
        return {"enabled": True, "memory": self.memory.health(), "redis": redis}


###############################################################################
# Request reader: request line, headers, body framing and limits
###############################################################################

# http.server's limits, kept: bytes of the request line or of one header line, header lines.
MAX_LINE_BYTES = 65536
MAX_HEADER_LINES = 100
# Chunk extensions carry nothing the proxy uses but are legal: a chunk line may carry a long one,
# and all of a body's extensions together are bounded. So is the number of chunks: each costs ~2 µs
# of CPU whatever its size (a million one-byte chunks took 1.8 s), and clients send a body in one
# chunk or in pieces of kilobytes.
MAX_CHUNK_EXTENSION_BYTES = 16384
MAX_CHUNKS = 1 << 16
# A body nobody wants (a GET that has one, a request refused before its body) is read and dropped
# up to this size so the connection stays usable; a larger one closes the connection instead.
MAX_DISCARDED_BODY = 1 << 20

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# Leniency of RFC 9112 §2.2 kept: a bare LF ends the request line and header lines (not chunk lines).
REQUEST_LINE = re.compile(rb"(%s) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])\r?\n" % _TOKEN)
# No whitespace before the colon (RFC 9112 §5.1), no obs-fold continuation lines, no CTLs but HTAB.
HEADER_LINE = re.compile(rb"(%s):[\t ]*((?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)[\t ]*\r?\n" % _TOKEN)
# chunk-size [ chunk-ext ] CRLF with chunk-size = 1*HEXDIG: no sign, no 0x, no underscores or spaces.
CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]+)((?:[\t ]*;[\t ]*%s(?:[\t ]*=[\t ]*(?:%s|%s))?)*)\r\n"
                        % (_TOKEN, _TOKEN, _QUOTED))
# A whole header section at once, for the common case of a head that arrived in one piece.
HEADER_BLOCK = re.compile(rb"(?:%s:[\t\x20-\x7e\x80-\xff]*\r\n)*" % _TOKEN)
ABSOLUTE_TARGET = re.compile(r"https?://([^/?#]*)([^#]*)", re.IGNORECASE)


# JSON bodies. Parsing multiplies memory by up to ~25 (a 3-byte "[]," becomes a 56-byte list plus
# its 8-byte slot), and 32 MiB of tiny values took 864 MiB and 10 s of CPU. So a body above
# SCANNED_BODY_BYTES has its values counted first, at C speed, as commas and brackets (those inside
# strings too: a bound, not an exact count), and large bodies are parsed one at a time.
# MAX_JSON_VALUES is ~6x what the largest context window holds; MAX_JSON_DEPTH ~6x the nesting of
# real tool schemas, and far from any recursion limit of the encoders and walkers that follow.
MAX_JSON_VALUES = 1_000_000
MAX_JSON_DEPTH = 128
SCANNED_BODY_BYTES = 1 << 20
LARGE_BODY_PARSES = threading.BoundedSemaphore(1)


def large_body_gate(body):
    """What a body's parse must pass: nothing for a small body; for a large one, the bound on its
    values (a 400 over it) and then a turn at the one-at-a-time parse."""
    if len(body) <= SCANNED_BODY_BYTES:
        return contextlib.nullcontext()
    values = body.count(b",") + body.count(b"[") + body.count(b"{") + 1
    if values > MAX_JSON_VALUES:
        raise invalid(f"request body holds more than {MAX_JSON_VALUES} JSON values (counted as commas and "
                      "brackets, also inside strings); the limit bounds the memory one request can take")
    return LARGE_BODY_PARSES


def body_nested_too_deeply():
    return invalid(f"request body is nested too deeply: more than {MAX_JSON_DEPTH} levels of arrays and objects")


def check_nesting(value):
    """A 400 for arrays and objects nested deeper than MAX_JSON_DEPTH."""
    if nesting_exceeds(value, MAX_JSON_DEPTH):
        raise body_nested_too_deeply()


def bad_request(message):
    """A request whose framing cannot be trusted: answered, and the connection closed."""
    return ProxyError(400, message, "invalid_request_error", retry=False)


def body_too_large(limit, size=None):
    what = f"request body of {size} bytes" if size is not None else "request body"
    return ProxyError(413, f"{what} exceeds the {limit}-byte limit (MAX_BODY_BYTES)", "request_too_large",
                      retry=False)


class RequestHeaders:
    """Header fields by lower-case name, as `self.headers` in the handler.

    A repeated field's values are joined with ", " (RFC 9110 §5.3); `repeated` names those fields,
    for the few (Host) that must appear once."""

    __slots__ = ("fields", "repeated")

    def __init__(self, fields=None):
        self.fields = fields if fields is not None else {}
        self.repeated = ()

    def get(self, name, default=None):
        return self.fields.get(name.lower(), default)


class RequestHead:
    """A request line and its headers, with the body framing they announce."""

    __slots__ = ("method", "target", "version", "headers", "authority", "content_length", "chunked",
                 "keep_alive", "expects_continue")

    @property
    def has_body(self):
        return self.chunked or bool(self.content_length)


class ReadDeadlines:
    """Ends connections whose client takes too long to send its request.

    A socket timeout bounds each read, not the whole request: a client trickling one byte at a
    time could otherwise hold a thread for ever."""

    def __init__(self):
        self.lock = threading.Lock()
        self.deadlines = {}
        self.stopped = threading.Event()
        threading.Thread(target=self._watch, name="read-deadlines", daemon=True).start()

    def arm(self, sock, seconds):
        with self.lock:
            self.deadlines[sock] = time.monotonic() + seconds

    def disarm(self, sock):
        with self.lock:
            self.deadlines.pop(sock, None)

    def _watch(self):
        while not self.stopped.wait(0.25):
            now = time.monotonic()
            with self.lock:
                late = [sock for sock, deadline in self.deadlines.items() if deadline < now]
                for sock in late:
                    del self.deadlines[sock]
            for sock in late:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class RequestReader:
    """Reads requests from one client connection: strict framing (RFC 9112 §2-7), bounded everywhere.

    `read_head()` returns the next RequestHead (None once the client has closed), after which the
    caller reads the body with `read_body()` or drops it with `discard_body()`. Anything that makes
    the framing untrustworthy raises a ProxyError; the connection must then be closed, since where
    the next request starts is unknown."""

    def __init__(self, rfile):
        self.rfile = rfile

    def read_head(self):
        """The next request's line and headers; None if the client closed the connection first."""
        buffered = self.rfile.peek(1)
        end = buffered.find(b"\r\n\r\n")
        line_end = buffered.find(b"\n") + 1
        # All of it is here already: one read, one parse. Only when every header line ends in CRLF:
        # a head ended by a bare LF blank line lies before that CRLFCRLF, which may then be the body's.
        if (end > 0 and buffered[0] not in b"\r\n" and line_end <= end + 2
                and self._plain_field_block(buffered[line_end:end + 2])):
            block = self.rfile.read(end + 4)
            line, headers = block[:line_end], self._field_block(block, line_end)
        else:
            line = self._request_line()
            if line is None:
                return None
            headers = self._fields(self.rfile.readline)
        match = REQUEST_LINE.fullmatch(line)
        if match is None:
            raise bad_request(f"malformed request line {line[:100].decode('latin-1')!r}: "
                              "expected METHOD /path HTTP/1.1")
        method, target, major, minor = match.groups()
        if major != b"1":
            raise bad_request(f"HTTP/{major.decode()}.{minor.decode()} is not supported; use HTTP/1.1")
        head = RequestHead()
        head.method = method.decode("ascii")
        head.target = target.decode("ascii")
        head.version = "HTTP/1.0" if minor == b"0" else "HTTP/1.1"
        head.headers = headers
        head.authority = headers.fields.get("host")
        if head.target[0] != "/":
            absolute = ABSOLUTE_TARGET.fullmatch(head.target)
            if absolute:  # absolute-form: its authority replaces Host (RFC 9112 §3.2.2)
                head.authority = absolute.group(1)
                head.target = absolute.group(2) or "/"
                if head.target[0] != "/":
                    head.target = "/" + head.target
            elif not (head.target == "*" and head.method == "OPTIONS"):
                raise bad_request(f"request target {head.target[:100]!r} is not a path")
        if "host" in headers.repeated:
            raise bad_request("more than one Host header")
        # An http URI always has an authority, so an HTTP/1.1 request without one is refused
        # (RFC 9112 §3.2) rather than let through the Host check that has nothing to compare.
        if not head.authority and (head.version == "HTTP/1.1" or head.authority is not None):
            raise bad_request("no Host: an HTTP/1.1 request names its host, e.g. Host: localhost")
        self._framing(head)
        if head.version == "HTTP/1.1":
            head.keep_alive = "close" not in headers.fields.get("connection", "").lower()
            head.expects_continue = headers.fields.get("expect", "").lower() == "100-continue"
        else:  # HTTP/1.0: one request per connection, and never a 100 (RFC 9110 §10.1.1)
            head.keep_alive = head.expects_continue = False
        return head

    def _request_line(self):
        readline = self.rfile.readline
        line = readline(MAX_LINE_BYTES + 1)
        for _ in range(4):  # empty lines before a request line are to be ignored (RFC 9112 §2.2)
            if line not in (b"\r\n", b"\n"):
                break
            line = readline(MAX_LINE_BYTES + 1)
        if not line.endswith(b"\n"):
            if len(line) > MAX_LINE_BYTES:
                raise ProxyError(414, f"request line longer than {MAX_LINE_BYTES} bytes", retry=False)
            return None  # the client closed, or ReadDeadlines cut it off mid-line
        return line

    @staticmethod
    def _plain_field_block(lines):
        return lines.count(b"\n") <= MAX_HEADER_LINES and HEADER_BLOCK.fullmatch(lines) is not None

    @staticmethod
    def _field_block(block, start):
        """The header lines of `block` (a whole head, checked by _plain_field_block), split without one
        regex per line."""
        lines = block[start:-2]
        fields, repeated = {}, None
        for line in lines.decode("latin-1").split("\r\n")[:-1]:
            name, _, value = line.partition(":")
            name, value = name.lower(), value.strip(" \t")
            if name in fields:
                fields[name] += ", " + value
                repeated = (repeated or set()) | {name}
            else:
                fields[name] = value
        headers = RequestHeaders(fields)
        if repeated:
            headers.repeated = repeated
        return headers

    @staticmethod
    def _fields(readline):
        fields, repeated = {}, None
        for _ in range(MAX_HEADER_LINES + 1):
            line = readline(MAX_LINE_BYTES + 1)
            if line == b"\r\n" or line == b"\n":
                headers = RequestHeaders(fields)
                if repeated:
                    headers.repeated = repeated
                return headers
            match = HEADER_LINE.fullmatch(line)
            if match is None:
                if len(line) > MAX_LINE_BYTES:
                    raise ProxyError(431, f"a header line is longer than {MAX_LINE_BYTES} bytes", retry=False)
                if not line.endswith(b"\n"):
                    raise ClientGone()
                raise bad_request(f"malformed header line {line[:100].decode('latin-1')!r}")
            name, value = match.groups()
            name = name.decode("latin-1").lower()
            value = value.decode("latin-1")
            if name in fields:
                fields[name] += ", " + value
                repeated = (repeated or set()) | {name}
            else:
                fields[name] = value
        raise ProxyError(431, f"more than {MAX_HEADER_LINES} header lines", retry=False)

    @staticmethod
    def _framing(head):
        """Where the body ends (RFC 9112 §6.3); anything ambiguous is refused, never guessed."""
        fields = head.headers.fields
        coding, length = fields.get("transfer-encoding"), fields.get("content-length")
        head.chunked, head.content_length = False, None
        if coding is None and (length is None or (length.isdigit() and length.isascii())):
            if length is not None:  # the common case, one plain length
                head.content_length = int(length)
        elif coding is not None:
            if head.version == "HTTP/1.0":
                raise bad_request("Transfer-Encoding in an HTTP/1.0 request: its framing cannot be trusted")
            if length is not None:
                raise bad_request("both Content-Length and Transfer-Encoding: the body's length is ambiguous")
            codings = [part.strip().lower() for part in coding.split(",") if part.strip()]
            unknown = [part for part in codings if part != "chunked"]
            if unknown:
                raise ProxyError(501, f"transfer coding {unknown[0][:40]!r} is not supported; send the body "
                                      "with Content-Length or Transfer-Encoding: chunked", "invalid_request_error",
                                 retry=False)
            if len(codings) != 1:
                raise bad_request("Transfer-Encoding must be chunked, once")
            head.chunked = True
        elif length is not None:
            # A repeated identical value is one length (RFC 9110 §8.6); differing values are not.
            values = {part.strip() for part in length.split(",")}
            if len(values) != 1:
                raise bad_request(f"differing Content-Length values {length[:100]!r}")
            value = values.pop()
            if not (value.isascii() and value.isdigit()):
                raise bad_request(f"Content-Length {value[:40]!r} is not a number")
            head.content_length = int(value)

    def read_body(self, head, limit):
        """The whole body, at most `limit` bytes; a ProxyError for a body over it or malformed."""
        if head.chunked:
            return self._chunked_body(limit)
        size = head.content_length or 0
        if size > limit:
            raise body_too_large(limit, size)
        return self._exactly(size)

    @staticmethod
    def can_discard(head):
        """Whether an unwanted body is worth reading to keep the connection. Not when the client waits
        for a 100 Continue: it may send the body after all, or may not, so no request boundary is known."""
        return not head.expects_continue and (head.chunked or (head.content_length or 0) <= MAX_DISCARDED_BODY)

    def discard_body(self, head):
        """Read and drop an unwanted body; False when the connection cannot be kept for the next request."""
        if not self.can_discard(head):
            return False
        try:
            self.read_body(head, MAX_DISCARDED_BODY)
        except ProxyError:
            return False
        return True

    def _exactly(self, size):
        data = self.rfile.read(size)
        if len(data) != size:
            raise bad_request(f"request body ended after {len(data)} of {size} bytes")
        return data

    def _chunked_body(self, limit):
        readline, read = self.rfile.readline, self.rfile.read
        parts, total, extensions = [], 0, 0
        for _ in range(MAX_CHUNKS):
            line = readline(MAX_CHUNK_EXTENSION_BYTES + 64)
            match = CHUNK_LINE.fullmatch(line)
            if match is None:
                if not line.endswith(b"\n") and len(line) <= MAX_CHUNK_EXTENSION_BYTES:
                    raise bad_request("request body ended inside a chunk size line")
                raise bad_request(f"malformed chunk size line {line[:40].decode('latin-1')!r}: a chunk size "
                                  "is hexadecimal digits, optionally followed by ;extensions, then CRLF")
            size_text, extension = match.groups()
            extensions += len(extension)
            if extensions > MAX_CHUNK_EXTENSION_BYTES:
                raise bad_request(f"chunk extensions exceed {MAX_CHUNK_EXTENSION_BYTES} bytes in all")
            size = int(size_text, 16)
            if size == 0:
                self._trailer(readline)
                return b"".join(parts)
            total += size
            if total > limit:
                raise body_too_large(limit)
            parts.append(self._exactly(size))
            if read(2) != b"\r\n":
                raise bad_request("chunk data is not followed by CRLF where its size says it ends")
        raise bad_request(f"chunked body of more than {MAX_CHUNKS} chunks")

    @staticmethod
    def _trailer(readline):
        for _ in range(MAX_HEADER_LINES + 1):
            line = readline(MAX_LINE_BYTES + 1)
            if line == b"\r\n" or line == b"\n":
                return
            if HEADER_LINE.fullmatch(line) is None:
                raise bad_request("malformed trailer after the last chunk")
        raise bad_request(f"more than {MAX_HEADER_LINES} trailer lines")


###############################################################################
# Origin and host checks
###############################################################################

# A web page in the user's browser can send requests to the proxy's loopback port (the SSH tunnel's
# end), and with DNS rebinding read the answers. As Ollama does since CVE-2024-28224: bound to
# loopback, the proxy serves only requests addressed to a loopback name; and it serves a browser
# only for origins it trusts, answering CORS preflights for those.

# Origins of local desktop apps, which no web page can claim (Ollama trusts the same).
APP_ORIGIN_SCHEMES = ("app", "file", "tauri", "vscode-webview", "vscode-file")
CORS_ALLOWED_HEADERS = ("content-type", "x-api-key", "authorization", "anthropic-version", "anthropic-beta",
                        "anthropic-dangerous-direct-browser-access", "accept", "cache-control")
# The SDKs add headers under these prefixes, more with each version (x-stainless-retry-count...).
CORS_ALLOWED_HEADER_PREFIXES = ("x-stainless-", "anthropic-")
CORS_EXPOSED_HEADERS = "request-id, x-cache, retry-after, x-should-retry"


def split_authority(authority):
    """'host', 'host:port', '[v6]' or '[v6]:port' -> the host (lower case), or None if malformed."""
    if authority.startswith("["):
        host, sep, rest = authority[1:].partition("]")
        if not sep or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        return host.lower()
    host, sep, port = authority.partition(":")
    if sep and not port.isdigit():
        return None
    return host.lower()


@functools.lru_cache(maxsize=256)  # asked for every request's Host and Origin; parsing an address costs ~10 µs
def is_loopback_name(host):
    """localhost, a name under .localhost (RFC 6761: always loopback), or a loopback address."""
    host = host.rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


class OriginPolicy:
    """Which Host and Origin values the proxy serves, and the CORS headers its answers carry."""

    def __init__(self, config):
        # Bound to a public address, clients reach it by names of their own: nothing to compare with.
        self.check_host = is_loopback_name(config.api_host)
        self.allowed = config.allowed_origins

    def refusal(self, authority, origin):
        """A 403 ProxyError if the request must not be served, else None."""
        if self.check_host and authority:
            host = split_authority(authority)
            if host is None or not is_loopback_name(host):
                return ProxyError(403, f"Host {authority[:100]!r} is not a loopback name: the proxy is bound to "
                                       "loopback and serves only requests addressed to localhost or 127.0.0.1 "
                                       "(protection against DNS rebinding); a reverse proxy in front must "
                                       "send Host: localhost, or set API_HOST to the address clients reach",
                                 "permission_error", retry=False)
        if origin is not None and not self.origin_allowed(origin):
            return ProxyError(403, f"Origin {origin[:100]!r} is not allowed; add it to ALLOWED_ORIGINS to let "
                                   "that web page use the proxy", "permission_error", retry=False)
        return None

    def origin_allowed(self, origin):
        origin = origin.strip().lower()
        scheme, sep, rest = origin.partition("://")
        if not sep:
            return any(pattern.fullmatch(origin) for pattern in self.allowed)  # "null" unless allowed
        if scheme in APP_ORIGIN_SCHEMES:
            return True
        if scheme in ("http", "https"):
            host = split_authority(rest)
            if host is not None and (is_loopback_name(host) or host == "0.0.0.0"):
                return True
        return any(pattern.fullmatch(origin) for pattern in self.allowed)

    @staticmethod
    def response_headers(origin):
        """Headers every answer to an allowed browser origin carries."""
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": CORS_EXPOSED_HEADERS,
                "Vary": "Origin"}

    @staticmethod
    def preflight_headers(request_headers):
        """The answer to a CORS preflight: every method the proxy serves, the SDKs' headers, and
        Chrome's Private Network Access consent, which a public page needs to reach a loopback port."""
        requested = request_headers.get("Access-Control-Request-Headers", "")
        extra = [name for name in (part.strip().lower() for part in requested.split(","))
                 if name.startswith(CORS_ALLOWED_HEADER_PREFIXES) and name not in CORS_ALLOWED_HEADERS
                 and re.fullmatch(r"[-a-z0-9]+", name)]
        headers = {"Access-Control-Allow-Methods": "GET, HEAD, POST, OPTIONS",
                   "Access-Control-Allow-Headers": ", ".join(CORS_ALLOWED_HEADERS + tuple(extra)),
                   "Access-Control-Max-Age": "600"}
        if request_headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
            headers["Access-Control-Allow-Private-Network"] = "true"
        return headers


###############################################################################
# Metrics
###############################################################################

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds; from a cache hit (sub-millisecond) to a long generation.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


def label_value(value):
    # backslashreplace: a lone surrogate (valid in JSON's \\uXXXX) must not make the page unencodable.
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def labels(**pairs):
    return "{" + ",".join(f'{name}="{label_value(value)}"' for name, value in pairs.items()) + "}"


class Histogram:
    """Observations counted per bucket (cumulated when written out), with their sum."""

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value):
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def lines(self, name, **pairs):
        total = 0
        for bound, count in zip(self.bounds + (math.inf,), self.counts):
            total += count
            yield f"{name}_bucket{labels(**pairs, le='+Inf' if bound == math.inf else repr(bound))} {total}"
        yield f"{name}_sum{labels(**pairs) if pairs else ''} {self.sum!r}"
        yield f"{name}_count{labels(**pairs) if pairs else ''} {total}"


class Metrics:
    """What GET /metrics reports, in Prometheus' text format 0.0.4. Each request costs one lock and
    a few dictionary updates; gauges and the cache and upstream counts are read when scraped."""

    def __init__(self, config, installed=lambda model: False):
        self.lock = threading.Lock()
        # A model label only for models this proxy is configured with or Ollama has installed:
        # names clients make up would each become a series of their own.
        self.known_models = {config.ollama_model, *config.model_map.values()}
        self.installed = installed
        self.requests = collections.Counter()  # (route, status, model) -> count
        self.durations = {}  # route -> Histogram
        self.first_token = Histogram(FIRST_TOKEN_BUCKETS)
        self.tokens = {"input": 0, "output": 0}
        self.calls_from_text = 0
        self.overloaded = collections.Counter()  # which limit -> 529s sent

    def request_done(self, route, status, model, seconds, first_token_seconds, input_tokens, output_tokens,
                     calls_from_text=0):
        if model != "none" and model not in self.known_models and not self.installed(model):
            model = "other"
        with self.lock:
            self.requests[route, status, model] += 1
            histogram = self.durations.get(route)
            if histogram is None:
                histogram = self.durations[route] = Histogram(DURATION_BUCKETS)
            histogram.observe(seconds)
            if first_token_seconds is not None:
                self.first_token.observe(first_token_seconds)
            self.tokens["input"] += input_tokens
            self.tokens["output"] += output_tokens
            self.calls_from_text += calls_from_text

    def overloaded_by(self, limit):
        with self.lock:
            self.overloaded[limit] += 1

    def render(self, server):
        prefix = "simple_api_proxy_"
        out = []

        def family(name, kind, text, samples):
            out.append(f"# HELP {prefix}{name} {text}")
            out.append(f"# TYPE {prefix}{name} {kind}")
            out.extend(samples)

        with self.lock:
            requests = sorted(self.requests.items())
            durations = sorted((route, list(h.lines(prefix + "request_duration_seconds", route=route)))
                               for route, h in self.durations.items())
            first_token = list(self.first_token.lines(prefix + "time_to_first_token_seconds"))
            tokens = dict(self.tokens)
            calls_from_text = self.calls_from_text
            overloaded = dict(self.overloaded)
        family("info", "gauge", "This proxy's version.", [f"{prefix}info{labels(version=__version__)} 1"])
        family("requests_total", "counter", "Requests answered, by route, HTTP status and Ollama model.",
               [f"{prefix}requests_total{labels(route=route, status=status, model=model)} {count}"
                for (route, status, model), count in requests])
        family("request_duration_seconds", "histogram", "Seconds from a request's arrival to its last byte.",
               [line for _, lines in durations for line in lines])
        family("time_to_first_token_seconds", "histogram",
               "Seconds from a request's arrival to Ollama's first output, streams and not.", first_token)
        family("tokens_total", "counter", "Tokens Ollama read (input) and wrote (output); cache hits excluded.",
               [f"{prefix}tokens_total{labels(direction=d)} {tokens[d]}" for d in ("input", "output")])
        family("tool_calls_from_text_total", "counter",
               "Tool calls the model wrote as text, turned into tool_use blocks (TOOL_CALL_RECOVERY).",
               [f"{prefix}tool_calls_from_text_total {calls_from_text}"])
        cache = server.cache
        tiers = (("memory", cache.memory), ("redis", cache.redis))
        family("cache_lookups_total", "counter", "Response cache lookups by tier and result.",
               [f"{prefix}cache_lookups_total{labels(tier=name, result=result)} "
                f"{0 if tier is None else tier.stats.hits if result == 'hit' else tier.stats.misses}"
                for name, tier in tiers for result in ("hit", "miss")])
        family("in_flight", "gauge", "Generations Ollama is working on for this proxy.",
               [f"{prefix}in_flight {server.in_flight}"])
        family("active_requests", "gauge", "Requests being answered.", [f"{prefix}active_requests {server.active_requests}"])
        family("overloaded_total", "counter", "529 overloaded answers, by the limit reached "
               "(MAX_CONCURRENT generations, MAX_CONNECTIONS connections).",
               [f"{prefix}overloaded_total{labels(limit=limit)} {overloaded.get(limit, 0)}"
                for limit in ("generations", "connections")])
        hosts = server.pool.hosts
        family("upstream_up", "gauge", "1 while an Ollama host takes requests, 0 while it is marked down.",
               [f"{prefix}upstream_up{labels(host=host.url)} {int(host.up)}" for host in hosts])
        family("upstream_in_flight", "gauge", "Generations in flight per Ollama host.",
               [f"{prefix}upstream_in_flight{labels(host=host.url)} {host.in_flight}" for host in hosts])
        family("upstream_errors_total", "counter",
               "Ollama hosts failing before their answer, by kind (refused, reset, closed, timeout, other).",
               [f"{prefix}upstream_errors_total{labels(host=host.url, kind=kind)} {count}"
                for host in hosts for kind, count in sorted(host.errors.items())])
        return "\n".join(out) + "\n"


###############################################################################
# HTTP handler
###############################################################################

def describe_failure(exc):
    """An unexpected exception as one log line's worth: type, message and where it was raised."""
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    where = f" at {os.path.basename(frame.tb_frame.f_code.co_filename)}:{frame.tb_lineno} in " \
            f"{frame.tb_frame.f_code.co_name}" if frame is not None else ""
    return f"{type(exc).__name__}: {str(exc)[:300]}{where}"


_date_cache = (0, "")


def http_date():
    """The Date header's value, formatted once per second rather than once per response."""
    global _date_cache
    second = int(time.time())
    if _date_cache[0] != second:
        _date_cache = (second, email.utils.formatdate(second, usegmt=True))
    return _date_cache[1]


def canned_response(error):
    """A complete HTTP response for an error sent without a handler thread."""
    body = json.dumps(error.body(None), separators=(",", ":")).encode()
    head = f"HTTP/1.1 {error.status} Error\r\nContent-Type: application/json\r\nConnection: close\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in error.headers().items())
    return head.encode() + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


TOO_MANY_CONNECTIONS = canned_response(ProxyError(
    529, "too many open connections to the proxy (MAX_CONNECTIONS); try again shortly", retry_after=1))


class ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, config, handler_class=None):
        self.config = config
        self.thinking_seal = ThinkingSeal.from_key_file(config.thinking_key_file)
        self.pool = UpstreamPool(config)
        self.cache = ResponseCache(config)
        self.metrics = Metrics(config, installed=self.pool.installed)
        self.slots = threading.BoundedSemaphore(config.max_concurrent)
        self.origin_policy = OriginPolicy(config)
        self.read_deadlines = ReadDeadlines()
        self.counts_lock = threading.Lock()
        self.connections = 0
        self.active_requests = 0
        self.in_flight = 0  # generations: requests Ollama is working on
        self.stopping = False
        # Readable once SHUTDOWN_GRACE is over: every request waiting on Ollama polls it too.
        self.grace_over_fd, self._grace_over_signal = os.pipe()
        self.started = time.time()
        # When a client last asked for a generation or a count, or a generation ended: /health's
        # idle_s, which the box's idle watchdog (claude_vast.py) reads.
        self.last_request = time.monotonic()
        # Tells one proxy run from another behind the same address: the launcher compares the id
        # seen through its tunnel with the one on the box, so it never talks to a stranger's proxy.
        self.instance_id = secrets.token_hex(8)
        if ":" in config.api_host:  # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        super().__init__((config.api_host, config.api_port), handler_class or ProxyHandler)
        self.pool.start()

    def process_request(self, request, client_address):
        """One thread per connection, up to MAX_CONNECTIONS; past that a 529 without a thread."""
        with self.counts_lock:
            admitted = self.connections < self.config.max_connections
            if admitted:
                self.connections += 1
        if admitted:
            return super().process_request(request, client_address)
        self.metrics.overloaded_by("connections")
        try:
            request.setblocking(False)
            request.send(TOO_MANY_CONNECTIONS)
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.count("connections", -1)

    def count(self, name, delta):
        with self.counts_lock:
            setattr(self, name, getattr(self, name) + delta)

    def end_requests_in_flight(self):
        """SHUTDOWN_GRACE is over: requests still waiting on Ollama end with an error now."""
        os.write(self._grace_over_signal, b"x")

    def server_close(self):
        super().server_close()
        os.close(self.grace_over_fd)
        os.close(self._grace_over_signal)
        self.read_deadlines.stopped.set()
        self.cache.close()
        self.pool.close()


# Per-token events from pre-encoded templates: only the index and the text vary.
DELTA_EVENT = {"text_delta": ("text", b'event: content_block_delta\ndata: {"type":"content_block_delta",'
                                     b'"index":%d,"delta":{"type":"text_delta","text":%s}}\n\n'),
               "thinking_delta": ("thinking", b'event: content_block_delta\ndata: {"type":"content_block_delta",'
                                              b'"index":%d,"delta":{"type":"thinking_delta","thinking":%s}}\n\n')}
STOP_EVENT = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n'
FIXED_EVENTS = {"ping": ({"type": "ping"}, b'event: ping\ndata: {"type":"ping"}\n\n'),
                "message_stop": ({"type": "message_stop"}, b'event: message_stop\ndata: {"type":"message_stop"}\n\n')}


def sse_event(name, data):
    """One event as SSE bytes: the same as the generic JSON encoding, faster for the events every
    token and every block sends."""
    if name == "content_block_delta" and len(data) == 3:
        delta = data["delta"]
        field, template = DELTA_EVENT.get(delta["type"], (None, None))
        if field in delta and len(delta) == 2:
            text = delta[field]
            if text.__class__ is str and data["index"].__class__ is int:
                return template % (data["index"], _json_string(text).encode())
    elif name == "content_block_stop" and len(data) == 2 and data["index"].__class__ is int:
        return STOP_EVENT % data["index"]
    else:
        fixed = FIXED_EVENTS.get(name)
        if fixed is not None and data == fixed[0]:
            return fixed[1]
    return b"event: " + name.encode() + b"\ndata: " + _compact_json(data).encode() + b"\n\n"


class Response:
    """One request's answer as it is framed and sent: the head (status line and headers, which
    leave with the first body bytes), then a JSON body, or an SSE stream in HTTP chunks (bare to
    the close for HTTP/1.0). ProxyHandler makes one per request; a Generation streams through
    begin_stream(), write_events() and end_stream(), and watches `connection`, the client's socket.

    `close` says the connection ends after this answer; `status` and `answered` (when the last
    byte left) are what the log and /metrics report."""

    def __init__(self, wfile, connection, request_id, server_version):
        self.wfile = wfile
        self.connection = connection
        self.request_id = request_id
        self.server_version = server_version
        self.version = "HTTP/1.1"  # the request's, once its line is read
        self.method = "-"
        self.cors_headers = {}
        self.close = True
        self.status = None
        self.answered = None
        self.committed = False  # a 200 event stream has begun
        self.ended = False
        self._chunked = True
        self._head = b""

    def head(self, status, headers):
        """The status line and headers as bytes; sent together with the first body bytes."""
        self.status = status
        phrase = http.server.BaseHTTPRequestHandler.responses.get(
            status, ("Overloaded" if status == 529 else "Error",))[0]
        head = (f"HTTP/1.1 {status} {phrase}\r\nServer: {self.server_version}\r\n"
                f"Date: {http_date()}\r\nrequest-id: {self.request_id}\r\n")
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        if self.cors_headers:
            head += "".join(f"{name}: {value}\r\n" for name, value in self.cors_headers.items())
        if self.close:
            head += "Connection: close\r\n"
        return (head + "\r\n").encode("latin-1")

    def send(self, data):
        try:
            self.wfile.write(data)
        except OSError as exc:
            raise ClientGone() from exc
        self.answered = time.monotonic()  # the answer's last byte, once no more follow

    def send_json(self, status, payload, headers=None):
        self.send_json_body(status, json_bytes(payload), headers)

    def send_json_body(self, status, body, headers=None):
        all_headers = {"Content-Type": "application/json", "Content-Length": len(body)}
        all_headers.update(headers or {})
        head = self.head(status, all_headers)
        self.send(head if self.method == "HEAD" else head + body)

    def begin_stream(self, cache_state=None):
        """Commit to a 200 event stream; the head leaves with the first events."""
        headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        # An HTTP/1.0 client cannot read chunked framing: it gets the stream up to the close.
        self._chunked = self.version != "HTTP/1.0"
        if self._chunked:
            headers["Transfer-Encoding"] = "chunked"
        else:
            self.close = True
        if cache_state:
            headers["x-cache"] = cache_state
        self._head = self.head(200, headers)
        self.committed = True

    def framed(self, events):
        """Events as one HTTP chunk (or bare, for HTTP/1.0), behind the head if it has not left yet."""
        data = b"".join([sse_event(name, data) for name, data in events])
        if self._chunked and data:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        data, self._head = self._head + data, b""
        return data

    def write_events(self, events):
        """All the events of one moment in one write: one chunk, one send."""
        if events:
            self.send(self.framed(events))

    def end_stream(self, events=()):
        self.ended = True
        self.send(self.framed(events) + (b"0\r\n\r\n" if self._chunked else b""))


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    """Serves one client connection, one request after another (http.server's handle() loop).

    Its parts, as socketserver.BaseServer's docstring maps its own:
    - the connection loop: handle_one_request() makes each request's Response (its answer as it
      is framed and sent) and read_and_answer() reads the request line and headers with
      RequestReader, not with http.server's parser; the connection stays open while
      Response.close is false;
    - admission: dispatch() calls admit(), every check that can refuse a request in the order
      that reads nothing it need not (Host and Origin, route, API key, body size, then the body),
      and then the route; refuse() and send_error_envelope() answer failures; log_request_line()
      and record_metrics() close every request;
    - request bodies: read_json(), check_api_key();
    - the routes: route_preflight, route_root, route_health, route_metrics, route_models,
      route_model, route_count_tokens and route_messages, which hands a generation to a
      Generation (the upstream part of the file) and takes and gives back its slot.
    Per-request state lives on the Response and the Generation; what stays here is the
    request's line and headers (command, path, headers, as in http.server), its id, body and
    log fields."""

    protocol_version = "HTTP/1.1"
    server_version = f"simple_api_proxy/{__version__}"

    ROUTES = {
        ("GET", "/"): "root",
        ("HEAD", "/"): "root",
        ("GET", "/health"): "health",
        ("HEAD", "/health"): "health",
        ("GET", "/metrics"): "metrics",
        ("HEAD", "/metrics"): "metrics",
        ("GET", "/v1/models"): "models",
        ("HEAD", "/v1/models"): "models",
        ("POST", "/v1/messages"): "messages",
        ("POST", "/v1/messages/count_tokens"): "count_tokens",
    }
    MODEL_ROUTE = "/v1/models/"

    def setup(self):
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.config = self.server.config
        # No Python-level timeout: it costs a poll() before every send and receive. Reads are
        # bounded by ReadDeadlines; a client that stops reading fails our sends after
        # CLIENT_TIMEOUT by the kernel's send timeout.
        seconds = self.config.client_timeout
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                struct.pack("ll", int(seconds), max(1, int(seconds % 1 * 1e6))))
        self.deadlines = self.server.read_deadlines
        self.reader = RequestReader(self.rfile)

    # -- dispatch ------------------------------------------------------------
    def handle_one_request(self):
        self.request_id = new_id("req_")
        self.started = None
        self.log_extra = {}
        self.response = Response(self.wfile, self.connection, self.request_id, self.server_version)
        self.generation = None  # the conversation with Ollama, for /v1/messages
        self.body = b""
        self.head = None
        self.command, self.path, self.request_version = "-", "-", "HTTP/1.1"
        try:
            self.read_and_answer()
        finally:
            self.close_connection = self.response.close or self.server.stopping

    def read_and_answer(self):
        # Idle keep-alive time, request line and headers: CLIENT_TIMEOUT in all.
        self.deadlines.arm(self.request, self.config.client_timeout)
        try:
            # The request's time starts when its first byte is there, not with keep-alive idle time.
            self.rfile.peek(1)
            self.started = time.monotonic()
            self.head = self.reader.read_head()
        except ProxyError as error:  # no framing to trust: answer, and end the connection
            self.send_error_envelope(error)
            self.log_request_line("-")
            self.record_metrics("unknown")
            return
        except (OSError, ClientGone):  # the client reset or dropped the connection between requests
            return
        finally:
            self.deadlines.disarm(self.request)
        if self.head is None:
            return
        head = self.head
        self.command, self.path, self.request_version, self.headers = \
            head.method, head.target, head.version, head.headers
        self.response.version, self.response.method = head.version, head.method
        self.response.close = not head.keep_alive or self.server.stopping
        self.dispatch()

    def dispatch(self):
        # The body gets CLIENT_TIMEOUT of its own; answering has no such limit.
        self.deadlines.arm(self.request, self.config.client_timeout)
        self.server.count("active_requests", 1)
        path = self.path.split("?", 1)[0]
        name = None
        try:
            name = self.admit(path)
            getattr(self, "route_" + name)()
        except ProxyError as error:
            self.refuse(error)
        except ClientGone:
            self.response.status = 499  # nginx's convention: the client left before the answer was complete
            self.response.close = True
        except Exception as exc:  # RecursionError too: deep bodies are refused before this, so it is ours
            log.error("%s internal error on %s %s: %s", self.request_id, self.command, path, describe_failure(exc))
            log.debug("%s traceback", self.request_id, exc_info=True)
            self.response.close = True
            self.send_error_envelope(ProxyError(500, "internal proxy error; see the proxy's log", "api_error"),
                                     logged=True)
        finally:
            self.deadlines.disarm(self.request)
            self.server.count("active_requests", -1)
            self.log_request_line(path)
            self.record_metrics(name or self.ROUTES.get((self.command, path)) or "unknown")

    def log_request_line(self, path):
        extra = self.log_extra
        model = f" {extra['model']}->{extra['ollama_model']}" if "model" in extra else ""
        tokens = f" tokens={extra['input_tokens']}/{extra['output_tokens']}" if "output_tokens" in extra else ""
        flags = (" stream" if extra.get("stream") else "") + (f" cache={extra['cache']}" if "cache" in extra else "")
        log.info("%s %s %s%s %s%s%s %.1fms", self.request_id, self.command, path, model, self.response.status,
                 flags, tokens, ((self.response.answered or time.monotonic()) - self.started) * 1000)

    def record_metrics(self, route):
        extra = self.log_extra
        generated = extra.get("cache") != "HIT" and "output_tokens" in extra
        self.server.metrics.request_done(
            route, self.response.status or 499, extra.get("ollama_model", "none"), time.monotonic() - self.started,
            None if self.generation is None or self.generation.first_token_at is None
            else self.generation.first_token_at - self.started,
            extra["input_tokens"] if generated else 0, extra["output_tokens"] if generated else 0,
            extra.get("calls_from_text", 0))

    def admit(self, path):
        """Every check that can refuse a request, in the order that reads nothing it need not:
        Host and Origin, route, API key, body size; then `100 Continue` and the body. The route's name."""
        head = self.head
        self.body_settled = not head.has_body
        policy = self.server.origin_policy
        origin = head.headers.fields.get("origin")
        refusal = policy.refusal(head.authority, origin)
        if refusal is not None:
            raise refusal
        if origin is not None:
            self.response.cors_headers = policy.response_headers(origin)
        name = self.ROUTES.get((self.command, path))
        if name is None and path.startswith(self.MODEL_ROUTE) and self.command in ("GET", "HEAD"):
            name = "model"
        if name is None and self.command == "OPTIONS" and (path == "*" or self.known_path(path)):
            name = "preflight"
        if name is None:
            known = {m for (m, p) in self.ROUTES if p == path}
            if known:
                allow = ", ".join(sorted(known))
                raise ProxyError(405, f"{self.command} is not allowed on {path}; use {allow}", "invalid_request_error",
                                 allow=allow)
            raise ProxyError(404, f"Not found: {self.command} {path}", "not_found_error")
        if path.startswith("/v1/") and name != "preflight":
            self.check_api_key()
        if self.command != "POST":
            if head.has_body:
                self.drop_body()
            self.deadlines.disarm(self.request)
            return name
        if not head.chunked and head.content_length is None:
            self.response.close = True
            raise ProxyError(411, "a request body needs a Content-Length header", retry=False)
        if (head.content_length or 0) > self.config.max_body_bytes:
            raise body_too_large(self.config.max_body_bytes, head.content_length)
        if head.expects_continue:
            self.response.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.body_settled = True
        try:
            self.body = self.reader.read_body(head, self.config.max_body_bytes)
        except ProxyError:
            self.response.close = True
            raise
        self.deadlines.disarm(self.request)
        return name

    def known_path(self, path):
        return any(p == path for (_, p) in self.ROUTES) or path.startswith(self.MODEL_ROUTE)

    def refuse(self, error):
        """Answer with an error at once, even when the client waits to send its body (Expect: 100-continue,
        or a slow upload); then drop that body to keep the connection, if it can be done cheaply."""
        unread = self.head.has_body and not self.body_settled
        if unread and not self.reader.can_discard(self.head):
            self.response.close = True
            unread = False
        self.send_error_envelope(error)
        if unread and not self.response.close:
            self.drop_body()

    def drop_body(self):
        """Read and drop a body nobody will use, or close the connection when that cannot be done."""
        self.body_settled = True
        if not self.reader.discard_body(self.head):
            self.response.close = True

    # -- answers ---------------------------------------------------------------
    def send_error_envelope(self, error, logged=False):
        """Report a failure: as an error response, or as the last event of a stream already under way."""
        self.log_extra["error"] = error.message
        if error.status >= 500 and not logged:
            log.warning("%s %s: %s", self.request_id, error.error_type, error.message)
        response = self.response
        try:
            if response.ended or (response.status is not None and not response.committed):
                # The answer has left already: nothing more can be said on this connection.
                response.close = True
            elif response.committed:
                response.close = True
                response.end_stream([("error", {"type": "error",
                                                "error": {"type": error.error_type, "message": error.message}})])
            else:
                response.send_json(error.status, error.body(self.request_id), error.headers())
        except ClientGone:
            response.close = True

    # -- request bodies --------------------------------------------------------
    def read_json(self):
        body = self.body
        if self.config.log_bodies:
            log.info("%s body: %s", self.request_id, body.decode("utf-8", "replace"))
        try:
            with large_body_gate(body):
                text = body.decode("utf-8")
                value = decode_strict_json(text)
        except NonFiniteNumber as exc:
            raise invalid(f"{non_finite_field(text)}: Input should be a finite number (got {exc})") from None
        except UnicodeDecodeError as exc:
            raise invalid(f"request body is not valid UTF-8 (byte {exc.start})") from None
        except ValueError as exc:
            raise invalid(f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise body_nested_too_deeply() from None
        check_nesting(value)
        return value

    def check_api_key(self):
        key = self.config.proxy_api_key
        if key and not self.has_api_key():
            raise ProxyError(401, "invalid x-api-key: this proxy needs PROXY_API_KEY in x-api-key or "
                                  "Authorization: Bearer", "authentication_error", retry=False)

    def has_api_key(self):
        key = self.config.proxy_api_key.encode()
        given = self.headers.get("x-api-key", "")
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            given = given or auth[7:].strip()
        return hmac.compare_digest(given.encode("utf-8", "replace"), key)

    # -- routes ----------------------------------------------------------------
    def route_preflight(self):
        """OPTIONS: a CORS preflight from an allowed origin (others got a 403), or a plain question."""
        headers = {"Allow": "GET, HEAD, POST, OPTIONS"}
        if self.response.cors_headers:
            headers.update(self.server.origin_policy.preflight_headers(self.headers))
        self.response.send(self.response.head(204, headers))

    def route_root(self):
        self.response.send_json(200, {"status": "ok", "service": "simple_api_proxy", "version": __version__,
                             "message": "Anthropic Messages API proxy for Ollama; see /health"})

    def route_health(self):
        hosts = self.server.pool.health(timeout=min(5.0, self.config.ollama_timeout))
        # One host: its report is the "ollama" object, as before there could be several.
        ollama = dict(hosts[0]) if len(hosts) == 1 else {"url": ",".join(host["url"] for host in hosts)}
        models = []
        for host in hosts:
            models += [name for name in host.get("models", ()) if name not in models]
        ollama.update(default_model=self.config.ollama_model, models=models,
                      reachable=any(host["reachable"] for host in hosts),
                      default_model_installed=any(host.get("default_model_installed") for host in hosts),
                      hosts=hosts)
        if len(hosts) > 1 and not ollama["reachable"]:
            ollama["error"] = "no Ollama host answers; see hosts"
        healthy = any(host["reachable"] and host.get("default_model_installed") for host in hosts)
        payload = {"status": "ok" if healthy else "degraded", "service": "simple_api_proxy",
                   "version": __version__, "uptime_s": round(time.time() - self.server.started, 1),
                   "ollama": ollama, "cache": self.server.cache.health(),
                   "in_flight": self.server.in_flight, "instance_id": self.server.instance_id,
                   "idle_s": round(time.monotonic() - self.server.last_request, 1)}
        if self.config.proxy_api_key and not self.has_api_key():
            # Without the key, say only whether it works: no addresses, models or errors.
            payload = {"status": payload["status"], "service": "simple_api_proxy", "version": __version__,
                       "instance_id": self.server.instance_id}
        self.response.send_json(200 if healthy else 503, payload)

    def route_metrics(self):
        self.check_api_key()  # Prometheus sends it with `authorization` in its scrape config
        body = self.server.metrics.render(self.server).encode()
        head = self.response.head(200, {"Content-Type": METRICS_CONTENT_TYPE, "Content-Length": len(body)})
        self.response.send(head if self.command == "HEAD" else head + body)

    def route_models(self):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        try:
            limit = int(query.get("limit", ["20"])[0])
        except ValueError:
            raise invalid("limit: Input should be a valid integer") from None
        if not 1 <= limit <= 1000:
            raise invalid("limit: Input should be between 1 and 1000")
        models = [model_object(m) for m in self.server.pool.installed_models()]
        ids = [m["id"] for m in models]
        after, before = query.get("after_id", [None])[0], query.get("before_id", [None])[0]
        if after in ids:
            models = models[ids.index(after) + 1:]
        elif before in ids:
            models = models[:ids.index(before)]
        page = models[-limit:] if before in ids else models[:limit]
        self.response.send_json(200, {"data": page, "has_more": len(page) < len(models),
                             "first_id": page[0]["id"] if page else None,
                             "last_id": page[-1]["id"] if page else None})

    def route_model(self):
        wanted = urllib.parse.unquote(self.path.split("?", 1)[0][len(self.MODEL_ROUTE):])
        target = resolve_model(wanted, self.config)
        for model in self.server.pool.installed_models():
            if same_model(target, model["name"]):
                found = model_object(model)
                if target != wanted:
                    found.update(id=wanted, display_name=f"{wanted} (served by {model['name']})")
                return self.response.send_json(200, found)
        raise ProxyError(404, f"model {wanted!r} not found in Ollama at "
                              f"{', '.join(address.url for address in self.config.ollama_addresses)}",
                         "not_found_error", retry=False)

    def route_count_tokens(self):
        self.server.last_request = time.monotonic()
        request = validate_messages_request(self.read_json(), default_max_tokens=self.config.default_max_tokens,
                                            for_count=True)
        ollama_model = resolve_model(request["model"], self.config)
        # The prompt /v1/messages would send (tool results cut as it would cut them); count_tokens
        # takes no max_tokens, so one sent along is used only when it is valid.
        max_tokens = request.get("max_tokens")
        if type(max_tokens) is not int or max_tokens < 0:
            max_tokens = self.config.default_max_tokens
        _, input_tokens = anthropic_to_ollama(dict(request, max_tokens=max_tokens), ollama_model, self.config,
                                              thinking_seal=self.server.thinking_seal)
        self.require_model(ollama_model)
        self.response.send_json(200, {"input_tokens": input_tokens})

    def require_model(self, ollama_model):
        """A 404 for a model Ollama lacks, on a route that answers without generating. Ollama
        unreachable is no error there: the answer needs no Ollama."""
        try:
            self.server.pool.capabilities(ollama_model)
        except ProxyError as error:
            if error.status == 404:
                raise

    def route_messages(self):
        self.server.last_request = time.monotonic()
        request = validate_messages_request(self.read_json(), default_max_tokens=self.config.default_max_tokens)
        model = request["model"]
        ollama_model = resolve_model(model, self.config)
        stream = bool(request.get("stream"))
        self.log_extra.update(model=model, ollama_model=ollama_model, stream=stream)
        pool = self.server.pool
        notes = []
        payload, input_tokens = anthropic_to_ollama(request, ollama_model, self.config, notes=notes,
                                                    can_see=not carries_images(request) or self.model_can_see(ollama_model),
                                                    thinking_seal=self.server.thinking_seal)
        if notes:
            log.info("%s changed for the model: %s", self.request_id, "; ".join(notes))
        demanded = demanded_server_tool(request)
        if demanded is not None:
            log.info("%s %s is a server tool this proxy cannot run: answered unavailable", self.request_id,
                     _one_line(demanded["name"], 80))
            self.log_extra["cache"] = "BYPASS"
            self.require_model(ollama_model)
            return self.respond_message(server_tool_unavailable(demanded, model, input_tokens), stream, "BYPASS")
        hidden_thinking = thinking_hidden(request, self.headers.get("anthropic-beta", ""))
        cache = self.server.cache
        key, lookup, store = cache_policy(cache, self.headers.get("Cache-Control", ""), request, payload,
                                          self.config.tool_call_recovery, hidden_thinking == "redacted")
        if lookup:
            cached = cache.get(key)
            if cached is not None:
                return self.replay(cached, model, stream)
        cache_state = "MISS" if lookup else "BYPASS"
        self.log_extra["cache"] = cache_state
        num_ctx = self.config.ollama_num_ctx
        if input_tokens > num_ctx:
            raise prompt_too_long(input_tokens, num_ctx)
        maximum = prompt_limit(request["max_tokens"], num_ctx)
        if input_tokens > maximum:
            raise prompt_too_long(input_tokens, maximum, f" (the {num_ctx}-token window keeps room for the answer)")

        if request["max_tokens"] == 0:
            self.require_model(ollama_model)
            return self.respond_message(empty_message(model, input_tokens, "max_tokens"), stream, cache_state)
        if "thinking" in pool.capabilities(ollama_model):
            payload["think"] = ollama_think(request)
        tools = client_tools(request)
        translator = StreamTranslator(
            model, input_tokens, stop_sequences=request.get("stop_sequences") or (),
            tool_names={t["name"]: t.get("input_schema") for t in tools},
            show_thinking=thinking_requested(request) and hidden_thinking is None,
            hidden_thinking=hidden_thinking, thinking_seal=self.server.thinking_seal,
            recover_tool_calls=self.config.tool_call_recovery, forced=forces_tool_use(request))
        route = pool.route(ollama_model, payload)
        self.take_generation_slot()
        generation = self.generation = Generation(
            self.config, route, translator, self.response, request_id=self.request_id, input_estimate=input_tokens,
            stop_fd=self.server.grace_over_fd, on_over=self.give_generation_slot_back)
        try:
            generation.open("/api/chat", payload)
            message = generation.stream(cache_state) if stream else generation.collect()
            if message is None:
                self.log_extra["error"] = generation.error.message
            else:
                self.log_extra.update(input_tokens=message["usage"]["input_tokens"],
                                      output_tokens=message["usage"]["output_tokens"],
                                      calls_from_text=translator.calls_from_text)
                body = None if stream else json_bytes(message)
                if store:
                    cache.put(key, message, body)
                if not stream:
                    generation.over()
                    self.response.send_json_body(200, body, {"x-cache": cache_state})
        except ClientGone:
            self.log_extra.update(input_tokens=translator.input_tokens, output_tokens=translator.chunks)
            raise
        finally:
            if translator.dropped_calls:
                log.warning("%s dropped the model's call(s) to %s: not offered to it", self.request_id,
                            ", ".join(translator.dropped_calls))
            # Whatever happened, the slot and Ollama's connection are given back; the connection
            # only after the client has its answer, as keeping it may wait a moment.
            generation.close()

    def take_generation_slot(self):
        if not self.server.slots.acquire(blocking=False):
            self.server.metrics.overloaded_by("generations")
            raise ProxyError(529, f"the proxy has {self.config.max_concurrent} generations in flight "
                                  "(MAX_CONCURRENT); try again shortly", "overloaded_error", retry_after=2)
        self.server.count("in_flight", 1)

    def give_generation_slot_back(self):
        self.server.last_request = time.monotonic()
        self.server.count("in_flight", -1)
        self.server.slots.release()

    def model_can_see(self, ollama_model):
        """Whether the model takes images; when Ollama could not say, images go through as before."""
        capabilities = self.server.pool.capabilities(ollama_model)
        return "vision" in capabilities or not capabilities

    def replay(self, answer, model, stream):
        self.log_extra.update(cache="HIT", input_tokens=answer.input_tokens, output_tokens=answer.output_tokens)
        if stream:
            self.respond_message(answer.fresh_message(model), stream, "HIT")
        else:
            self.response.send_json_body(200, answer.body(model), {"x-cache": "HIT"})

    def respond_message(self, message, stream, cache_state):
        if not stream:
            return self.response.send_json(200, message, {"x-cache": cache_state})
        self.response.begin_stream(cache_state)
        self.response.end_stream(message_to_events(message))


###############################################################################
# main()
###############################################################################

# C0 and C1 control characters (CR, LF, ESC among them), DEL, Unicode line and paragraph
# separators, and lone surrogates, which no log file's encoding can write.
UNLOGGABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _escaped_character(match):
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class EscapingFormatter(logging.Formatter):
    """Every log line is one line, whatever a client or Ollama put into it.

    Model names, paths, headers and upstream error text reach log messages; escaping the finished
    message covers all of them at one point. A clean line costs one isprintable() scan in C."""

    def formatMessage(self, record):
        if not record.message.isprintable():
            record.message = UNLOGGABLE.sub(_escaped_character, record.message)
        return super().formatMessage(record)


def setup_logging(config):
    handlers = [logging.StreamHandler()]
    problem = None
    if config.log_file:
        try:
            handlers.append(logging.FileHandler(config.log_file, encoding="utf-8"))
        except OSError as exc:
            problem = f"cannot write LOG_FILE {config.log_file!r} ({exc.strerror}); logging to stderr only"
    formatter = EscapingFormatter("%(asctime)s %(levelname)s %(message)s")
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=config.log_level, handlers=handlers, force=True)
    if problem:
        log.warning(problem)


def serve(config):
    """Run until SIGTERM/SIGINT; requests in flight get SHUTDOWN_GRACE seconds to finish.
    Returns the exit status."""
    try:
        server = ProxyServer(config)
    except ThinkingKeyError as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s; another process holds the port (stop it, or set API_PORT)",
                  config.api_host, config.api_port, exc.strerror or exc)
        return 1
    host, port = server.server_address[:2]
    log.info("simple_api_proxy %s listening on http://%s:%s | %s", __version__, host, port, config.describe())
    window_warning = small_window_warning(config.ollama_num_ctx)
    if window_warning:
        log.warning("%s", window_warning)
    if not is_loopback_name(config.api_host) and not config.proxy_api_key:
        log.warning("API_HOST=%s exposes the proxy beyond this machine WITHOUT an API key: anyone who reaches "
                    "port %s can use your GPU. Set PROXY_API_KEY, or bind 127.0.0.1 and use an SSH tunnel.",
                    config.api_host, port)
    def on_signal(signum, frame):
        if server.stopping:
            log.warning("second signal: exiting now")
            os._exit(1)
        server.stopping = True
        log.info("%s received: finishing %d request(s) in flight (up to %g s)",
                 signal.Signals(signum).name, server.active_requests, config.shutdown_grace)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.serve_forever(poll_interval=0.2)
    server.socket.close()  # stop accepting; requests in flight go on
    deadline = time.monotonic() + config.shutdown_grace
    while server.active_requests and time.monotonic() < deadline:
        time.sleep(0.05)
    if server.active_requests:
        log.warning("shutdown grace over with %d request(s) still in flight; ending them", server.active_requests)
        server.end_requests_in_flight()
        deadline = time.monotonic() + 2.0  # enough to write an error event; a stuck client is not waited for
        while server.active_requests and time.monotonic() < deadline:
            time.sleep(0.02)
    server.server_close()
    log.info("stopped")
    return 0


def main(argv=None):
    config = load_config(argv)
    setup_logging(config)
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
