"""Tests for simple_api_proxy.

Pure translation is tested without sockets; everything else goes through a real proxy on an
ephemeral port, in front of StandInOllama: a small server that speaks Ollama's wire format
(chunked NDJSON streams, tool_calls, {"error": ...} bodies, hangs and resets on request).
Run with: python3 -m pytest -q
"""

import contextlib
import http.client
import http.server
import io
import itertools
import json
import os
import pwd
import queue
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import simple_api_proxy as proxy

HERE = Path(__file__).resolve().parent
IN_CI = os.environ.get("CI", "").lower() == "true"
MODEL = "qwen2.5-coder:7b"


def need(condition, reason):
    """Skip on a laptop that lacks a real part; under CI the part must be there."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must provide this: {reason}")
    pytest.skip(reason)


###############################################################################
# Stand-in Ollama
###############################################################################

def chunk(model=MODEL, content="", thinking=None, tool_calls=None, done=False, **extra):
    message = {"role": "assistant", "content": content}
    if thinking is not None:
        message["thinking"] = thinking
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    body = {"model": model, "created_at": "2026-11-26T10:00:00.000000Z", "message": message, "done": done}
    body.update(extra)
    return body


def final_chunk(model=MODEL, done_reason="stop", prompt_eval_count=26, eval_count=7, content=""):
    return chunk(model, content=content, done=True, done_reason=done_reason, total_duration=4883583458,
                 load_duration=1334875, prompt_eval_count=prompt_eval_count, prompt_eval_duration=342546000,
                 eval_count=eval_count, eval_duration=4535599000)


def ollama_call(name, arguments, index=0, call_id="call_k3j9x0qa"):
    return {"id": call_id, "function": {"index": index, "name": name, "arguments": arguments}}


class Reply:
    """What the stand-in does for one /api/chat request.

    steps: dicts are NDJSON lines, each sent as its own chunk the way Ollama flushes them;
    ("sleep", s) waits (and notices a client that leaves); ("raw", b) writes bytes as a chunk;
    ("after_end", b) ends the reply and writes b after it (bytes that answer no request);
    ("reset",) drops the connection with a TCP reset; ("cut",) closes without the final chunk.
    status != 200 sends {"error": error} with that status before any stream.
    drop="reset" or "close" ends the connection before any byte of an answer, as a host that dies does."""

    def __init__(self, steps=(), status=200, error=None, delay_before=0.0, per_token_delay=0.0, drop=None):
        self.steps = list(steps)
        self.drop = drop
        self.status = status
        self.error = error
        self.delay_before = delay_before
        self.per_token_delay = per_token_delay


def text_reply(text="Hello! I am the stand-in model.", pieces=None, done_reason="stop", **options):
    pieces = pieces if pieces is not None else [w for w in text.replace(" ", " \0").split("\0")]
    steps = [chunk(content=p) for p in pieces]
    steps.append(final_chunk(done_reason=done_reason, eval_count=len(pieces)))
    return Reply(steps, **options)


def tool_reply(*calls, text=""):
    steps = [chunk(content=text)] if text else []
    steps.append(chunk(tool_calls=[ollama_call(name, args, i, f"call_{i:08d}") for i, (name, args) in
                                   enumerate(calls)]))
    steps.append(final_chunk())
    return Reply(steps)


class StandInOllama:
    """An Ollama look-alike on 127.0.0.1, scripted per test."""

    def __init__(self, models=None, port=0, responder=None):
        self.models = models or {MODEL: ["completion", "tools"], "llama3.2:3b": ["completion", "tools"],
                                 "qwen3:8b": ["completion", "tools", "thinking"]}
        self.requests = []
        self.loaded = {}  # model -> num_ctx it was loaded with, for /api/ps
        self.scripted = queue.Queue()
        self.responder = responder
        self.disconnects = 0
        self.connections = 0
        self.open_connections = set()
        self.drop_kept = False
        self.close_idle = False  # close each connection after its reply, as a server with an idle timeout does
        self.chat_started = threading.Event()
        self.load_gate = None  # an Event that load requests wait for, to model a slow model load
        self.lock = threading.Lock()
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with stand_in.lock:
                    stand_in.connections += 1
                    stand_in.open_connections.add(self.connection)

            def handle_one_request(self):
                try:
                    super().handle_one_request()
                except OSError:  # the proxy dropped a connection: how it cancels a generation
                    self.close_connection = True

            def finish(self):
                super().finish()
                with stand_in.lock:
                    stand_in.open_connections.discard(self.connection)

            def log_message(self, *args):
                pass

            def do_GET(self):
                stand_in.get(self)

            def do_HEAD(self):
                stand_in.get(self)

            def do_POST(self):
                stand_in.post(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self):
        """Stop listening and drop every open connection, as an Ollama that goes away would."""
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            for connection in self.open_connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def script(self, *replies):
        for reply in replies:
            self.scripted.put(reply)

    def chats(self):
        """The generations asked for (not the empty-prompt loads)."""
        return [body for path, body in self.requests if path == "/api/chat" and body.get("messages")]

    def loads(self):
        return [body for path, body in self.requests if path == "/api/chat" and not body.get("messages")]

    # -- wire format -------------------------------------------------------------
    @staticmethod
    def send_json(handler, status, payload):
        body = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json; charset=utf-8")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)

    def get(self, handler):
        path = handler.path.split("?")[0]
        self.requests.append((path, None))
        if path == "/":
            body = b"Ollama is running"
            handler.send_response(200)
            handler.send_header("Content-Type", "text/plain; charset=utf-8")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(body)
        elif path == "/api/version":
            self.send_json(handler, 200, {"version": "0.33.0"})
        elif path == "/api/ps":
            with self.lock:
                loaded = dict(self.loaded)
            self.send_json(handler, 200, {"models": [
                {"name": name, "model": name, "size": 6654289920, "digest": "a" * 64,
                 "details": {"parent_model": "", "format": "gguf", "family": "qwen2", "families": ["qwen2"],
                             "parameter_size": "7.6B", "quantization_level": "Q4_K_M"},
                 "expires_at": "2026-11-26T10:05:00.000000Z", "size_vram": 6654289920, "context_length": num_ctx}
                for name, num_ctx in loaded.items()]})
        elif path == "/api/tags":
            self.send_json(handler, 200, {"models": [
                {"name": name, "model": name, "modified_at": "2026-05-10T08:06:48.123456789+02:00",
                 "size": 4683087332, "digest": "a" * 64,
                 "details": {"parent_model": "", "format": "gguf", "family": "qwen2", "families": ["qwen2"],
                             "parameter_size": "7.6B", "quantization_level": "Q4_K_M"}}
                for name in self.models]})
        else:
            body = b"404 page not found"
            handler.send_response(404)
            handler.send_header("Content-Type", "text/plain")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)

    def post(self, handler):
        handler.close_connection = self.close_idle
        handler.served = getattr(handler, "served", 0) + 1
        if self.drop_kept and handler.served > 1:
            self.drop_kept = False  # a kept connection closed just as it is used again: no answer
            handler.close_connection = True
            return
        path = handler.path.split("?")[0]
        length = int(handler.headers.get("Content-Length", 0))
        try:
            body = json.loads(handler.rfile.read(length))
        except ValueError:
            return self.send_json(handler, 400, {"error": "invalid character 'x' looking for beginning of value"})
        self.requests.append((path, body))
        if path == "/api/show":
            if body.get("model") not in self.models:
                return self.send_json(handler, 404, {"error": f"model '{body.get('model')}' not found"})
            return self.send_json(handler, 200, {"capabilities": self.models[body["model"]],
                                                 "details": {"family": "qwen2"}, "model_info": {}})
        if path != "/api/chat":
            return self.send_json(handler, 404, {"error": "404 page not found"})
        if body.get("model") not in self.models:
            return self.send_json(handler, 404, {"error": f"model '{body.get('model')}' not found"})
        if not body.get("messages"):  # Ollama's load request
            return self.load(handler, body)
        self.mark_loaded(body)
        if not self.scripted.empty():
            reply = self.scripted.get()
        elif self.responder:
            reply = self.responder(body)
        else:
            reply = text_reply()
        self.chat_started.set()
        self.play(handler, body, reply)

    def mark_loaded(self, body):
        with self.lock:
            self.loaded[body["model"]] = (body.get("options") or {}).get("num_ctx", 4096)

    def load(self, handler, body):
        """Load the model and generate nothing: one done line with done_reason "load"."""
        if self.load_gate is not None:
            self.load_gate.wait(30)
        self.mark_loaded(body)
        line = {"model": body["model"], "created_at": "2026-11-26T10:00:00.000000Z",
                "message": {"role": "assistant", "content": ""}, "done_reason": "load", "done": True}
        if body.get("stream", True):
            return self.play(handler, body, Reply([line]))
        return self.send_json(handler, 200, line)

    def play(self, handler, request, reply):
        if reply.delay_before and not self.pause(handler, reply.delay_before):
            return
        if reply.drop:
            handler.close_connection = True
            if reply.drop == "reset":
                handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                handler.connection.close()
            else:
                handler.connection.shutdown(socket.SHUT_RDWR)
            return
        if reply.status != 200:
            return self.send_json(handler, reply.status, {"error": reply.error or "error"})
        if not request.get("stream", True):
            raise AssertionError("the proxy always streams from Ollama")
        handler.send_response(200)
        handler.send_header("Content-Type", "application/x-ndjson")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        try:
            for number, step in enumerate(reply.steps, 1):
                if isinstance(step, dict):
                    if reply.per_token_delay and not self.pause(handler, reply.per_token_delay):
                        return
                    step = dict(step, model=request["model"])
                    line = json.dumps(step).encode() + b"\n"
                    # Like Go's server, the last line and the closing chunk leave together.
                    end = b"0\r\n\r\n" if number == len(reply.steps) else b""
                    handler.wfile.write(b"%x\r\n%s\r\n%s" % (len(line), line, end))
                    if end:
                        return
                elif step[0] == "sleep":
                    if not self.pause(handler, step[1]):
                        return
                elif step[0] == "raw":
                    handler.wfile.write(b"%x\r\n%s\r\n" % (len(step[1]), step[1]))
                elif step[0] == "after_end":  # the closing chunk, then bytes that answer no request
                    handler.wfile.write(b"0\r\n\r\n" + step[1])
                    return
                elif step[0] == "reset":
                    handler.close_connection = True
                    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    handler.connection.close()
                    return
                elif step[0] == "cut":
                    handler.close_connection = True
                    handler.connection.shutdown(socket.SHUT_RDWR)
                    return
            handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            with self.lock:
                self.disconnects += 1

    def pause(self, handler, seconds):
        """Sleep, but notice the proxy closing the connection (as Ollama's request context does)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([handler.connection], [], [], max(0.0, min(0.02, deadline - time.monotonic())))
            if ready and not handler.connection.recv(1, socket.MSG_PEEK):
                with self.lock:
                    self.disconnects += 1
                return False
        return True


###############################################################################
# Fixtures and helpers
###############################################################################

@pytest.fixture
def ollama():
    stand_in = StandInOllama()
    yield stand_in
    stand_in.stop()


@contextlib.contextmanager
def running_proxy(ollama_url, **settings):
    # No warm-up unless a test asks: its background requests would mix with the ones a test counts.
    env = {"OLLAMA_HOST": ollama_url, "API_PORT": "0", "LOG_FILE": "", "CACHE": "off", "LOG_LEVEL": "WARNING",
           "OLLAMA_WARMUP": "off"}
    env.update({k: str(v) for k, v in settings.items()})
    config = proxy.load_config([], env)
    server = proxy.ProxyServer(config)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Proxy(server)
    finally:
        server.shutdown()
        server.server_close()


class Proxy:
    def __init__(self, server):
        self.server = server
        self.port = server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def call(self, method, path, body=None, headers=None, timeout=30):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            all_headers = {"Content-Type": "application/json"} if data is not None else {}
            all_headers.update(headers or {})
            connection.request(method, path, body=data, headers=all_headers)
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def json(self, method, path, body=None, headers=None, timeout=30):
        status, headers, raw = self.call(method, path, body, headers, timeout)
        return status, headers, json.loads(raw) if raw else None

    def messages(self, body, headers=None):
        return self.json("POST", "/v1/messages", body, headers)

    def stream(self, body, headers=None):
        status, headers, raw = self.call("POST", "/v1/messages", dict(body, stream=True), headers)
        return status, headers, raw


@pytest.fixture
def gateway(ollama):
    with running_proxy(ollama.url) as running:
        yield running


def parse_sse(raw):
    """SSE text -> [(event, data)], insisting on the framing the SDKs and Claude Code need."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ") and len(lines) == 2, block
        name, data = lines[0][7:], json.loads(lines[1][6:])
        assert data["type"] == name
        events.append((name, data))
    return events


def assert_valid_stream(events):
    """The order of PROTOCOL A.7: message_start, blocks with contiguous indexes, message_delta, message_stop."""
    names = [name for name, _ in events if name != "ping"]
    assert names[0] == "message_start"
    open_index, next_index = None, 0
    for name, data in events[1:]:
        if name == "content_block_start":
            assert open_index is None and data["index"] == next_index
            open_index = data["index"]
        elif name == "content_block_delta":
            assert data["index"] == open_index
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index, next_index = None, next_index + 1
    assert open_index is None
    assert names[-2:] == ["message_delta", "message_stop"]


def request_body(text="Hello", **extra):
    body = {"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": [{"role": "user", "content": text}]}
    body.update(extra)
    return body


def config(**settings):
    return proxy.load_config([], {k: str(v) for k, v in settings.items()})


def ollama_body(request, ollama_model, settings, **options):
    """anthropic_to_ollama's body for Ollama, without its token estimate."""
    return proxy.anthropic_to_ollama(request, ollama_model, settings, **options)[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


###############################################################################
# Configuration
###############################################################################

@pytest.mark.parametrize("value, url", [
    ("localhost:11434", "http://localhost:11434"),
    ("gpu-box", "http://gpu-box:11434"),
    ("http://gpu-box", "http://gpu-box:80"),
    ("https://gpu-box", "https://gpu-box:443"),
    ("https://gpu-box:8443", "https://gpu-box:8443"),
    (":5000", "http://127.0.0.1:5000"),
    ("0.0.0.0:11434", "http://127.0.0.1:11434"),
    ("[::1]:11434", "http://[::1]:11434"),
])
def test_ollama_host_follows_ollamas_port_rules(value, url):
    assert proxy.parse_ollama_host(value).url == url


def test_defaults_are_the_documented_ones():
    settings = proxy.load_config([], {})
    assert (settings.api_host, settings.api_port) == ("127.0.0.1", 8000)
    assert [h.url for h in settings.ollama_hosts] == ["http://localhost:11434"]
    assert settings.ollama_model == MODEL and settings.ollama_num_ctx == 32768
    assert (settings.ollama_timeout, settings.ollama_first_token_timeout) == (30, 300)
    assert settings.cache_ttl == 86400 and settings.cache_enabled and settings.redis_url == ""
    assert settings.log_file == "simple_api_proxy.log"


def test_flags_win_over_environment_and_bad_values_are_refused(capsys):
    settings = proxy.load_config(["--api-port", "9001"], {"API_PORT": "9000", "MODEL_MAP": "haiku=llama3.2:3b"})
    assert settings.api_port == 9001 and settings.model_map == {"haiku": "llama3.2:3b"}
    with pytest.raises(SystemExit):
        proxy.load_config([], {"API_PORT": "eighty"})
    assert "API_PORT must be an integer, not 'eighty'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        proxy.load_config([], {"MODEL_MAP": "haiku"})


def test_redis_settings_become_a_url_and_the_password_never_shows():
    settings = proxy.load_config([], {"REDIS_HOST": "r.example", "REDIS_PORT": "12000", "REDIS_PASSWORD": "s3cr:t",
                                      "REDIS_SSL": "on", "REDIS_DB": "2"})
    assert settings.redis_url == "rediss://:s3cr%3At@r.example:12000/2"
    assert "s3cr" not in settings.describe() and "***" in settings.describe()


def test_help_lists_every_setting():
    result = subprocess.run([sys.executable, str(HERE / "simple_api_proxy.py"), "--help"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for name, *_ in proxy.SETTINGS:
        assert name in result.stdout


###############################################################################
# Translation: request
###############################################################################

def test_model_names_map_per_family():
    settings = config(MODEL_MAP="haiku=llama3.2:3b,opus=qwen2.5-coder:32b")
    assert proxy.resolve_model("claude-3-5-haiku-20241022", settings) == "llama3.2:3b"
    assert proxy.resolve_model("claude-opus-5-5", settings) == "qwen2.5-coder:32b"
    assert proxy.resolve_model("claude-sonnet-4-5", settings) == MODEL
    assert proxy.resolve_model("llama3.2:3b", settings) == "llama3.2:3b"


def test_system_blocks_join_and_billing_header_goes():
    body = request_body(system=[
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332; cch=abc123;"},
        {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Be brief."}])
    payload = ollama_body(body, MODEL, config())
    assert payload["messages"][0] == {"role": "system", "content": "You are Claude Code.\n\nBe brief."}
    other = dict(body, system=[dict(body["system"][0], text="x-anthropic-billing-header: cch=zzz;")] + body["system"][1:])
    assert ollama_body(other, MODEL, config()) == payload


def test_options_and_fields_map_to_ollama():
    body = request_body(temperature=0.2, top_p=0.9, top_k=40, stop_sequences=["###"], metadata={"user_id": "u"},
                        context_management={"edits": []}, service_tier="auto", unknown_new_field={"x": 1})
    payload = ollama_body(body, MODEL, config(OLLAMA_KEEP_ALIVE="30m"))
    assert payload["model"] == MODEL and payload["stream"] is True and payload["keep_alive"] == "30m"
    assert payload["options"] == {"num_ctx": 32768, "num_predict": 1024, "temperature": 0.2, "top_p": 0.9,
                                  "top_k": 40}
    assert "think" not in payload and "tools" not in payload
    assert ollama_body(body, MODEL, config(OLLAMA_KEEP_ALIVE="-1"))["keep_alive"] == -1


def test_thinking_is_sent_only_to_models_that_can_think(gateway, ollama):
    adaptive = request_body(thinking={"type": "adaptive", "display": "omitted"})
    effort = request_body(thinking={"type": "enabled", "budget_tokens": 2048}, output_config={"effort": "low"},
                          max_tokens=4096)
    for model, body, think in ((MODEL, adaptive, None), ("qwen3:8b", adaptive, True),
                               ("qwen3:8b", request_body(), False), ("qwen3:8b", effort, "low")):
        assert gateway.messages(dict(body, model=model))[0] == 200, (model, body)
        assert ollama.chats()[-1].get("think") == think, (model, body)


def test_messages_convert_with_tools_images_and_merging():
    body = request_body(messages=[
        {"role": "system", "content": [{"type": "text", "text": "Environment: linux"}]},
        {"role": "user", "content": "List files"},
        {"role": "user", "content": [{"type": "text", "text": "in /tmp"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                  "data": "iVBORw0KGgo="}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "use ls", "signature": "sig"},
            {"type": "text", "text": "Running ls."},
            {"type": "tool_use", "id": "toolu_01", "name": "Bash", "input": {"command": "ls /tmp"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "text", "text": "a.txt"},
                                                                           {"type": "text", "text": "b.txt"}]},
            {"type": "text", "text": "Now count them."}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_02", "name": "Bash",
                                           "input": {"command": "nope"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_02", "content": "not found",
                                      "is_error": True}]},
    ])
    assert ollama_body(body, MODEL, config())["messages"] == [
        {"role": "user", "content": "<system-reminder>\nEnvironment: linux\n</system-reminder>\n\nList files\n\nin /tmp",
         "images": ["iVBORw0KGgo="]},
        {"role": "assistant", "content": "Running ls.", "thinking": "use ls",
         "tool_calls": [{"id": "toolu_01", "function": {"name": "Bash", "arguments": {"command": "ls /tmp"}}}]},
        {"role": "tool", "content": "a.txt\nb.txt", "tool_call_id": "toolu_01", "tool_name": "Bash"},
        {"role": "user", "content": "Now count them."},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "toolu_02", "function": {"name": "Bash", "arguments": {"command": "nope"}}}]},
        {"role": "tool", "content": "Error: not found", "tool_call_id": "toolu_02", "tool_name": "Bash"},
    ]


def test_documents_become_text_and_unreadable_ones_become_notes():
    text_doc = {"type": "document", "title": "notes", "source": {"type": "text", "media_type": "text/plain",
                                                                 "data": "line one"}}
    payload = ollama_body(request_body(messages=[{"role": "user", "content": [text_doc]}]),
                                        MODEL, config())
    assert payload["messages"] == [{"role": "user", "content": "notes\n\nline one"}]
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "QUJDRA=="}}
    url_doc = {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}
    url_image = {"type": "image", "source": {"type": "url", "url": "http://x/y.png\nforged log line"}}
    file_image = {"type": "image", "source": {"type": "file", "file_id": "file_011"}}
    png = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    body = request_body(messages=[
        {"role": "user", "content": [{"type": "text", "text": "Read it"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Read", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "text", "text": "PDF file read: a.pdf (4 bytes)"}, pdf, png]}, url_doc, url_image, file_image]}])
    notes = []
    blind = ollama_body(body, MODEL, config(), can_see=False, notes=notes)
    tool, user = blind["messages"][2:]
    assert tool["content"] == ("PDF file read: a.pdf (4 bytes)\n"
                               "[PDF document (application/pdf, 4 bytes) left out: this model can't read PDF documents]\n"
                               "[image (image/png, 8 bytes) left out: this model can't see images]")
    assert user["content"] == (
        "[document at https://example.com/a.pdf left out: this model can't read documents]\n\n"
        "[image at http://x/y.png forged log line left out: this proxy passes on only inline images]\n\n"
        "[image file file_011 left out: this proxy passes on only inline images]")
    assert "images" not in tool and "images" not in user and len(notes) == 5
    seeing = ollama_body(body, MODEL, config(), can_see=True)
    assert seeing["messages"][2]["images"] == ["iVBORw0KGgo="]


def test_tools_map_to_functions_minus_server_and_deferred_tools():
    tools = [{"name": "Bash", "description": "Run a command", "input_schema": {"type": "object", "properties": {
                 "command": {"type": "string"}}, "required": ["command"], "additionalProperties": False}},
             {"name": "DeferredToolPlaceholder", "description": "-", "input_schema": {"type": "object"},
              "defer_loading": True},
             {"type": "web_search_20250305", "name": "web_search"},
             {"type": "custom", "name": "Read", "input_schema": {"type": "object"}}]
    payload = ollama_body(request_body(tools=tools), MODEL, config())
    assert [t["function"]["name"] for t in payload["tools"]] == ["Bash", "Read"]
    assert payload["tools"][0] == {"type": "function", "function": {
        "name": "Bash", "description": "Run a command", "parameters": {"type": "object", "properties": {
            "command": {"type": "string"}}, "required": ["command"]}}}
    none = ollama_body(request_body(tools=tools, tool_choice={"type": "none"}), MODEL, config())
    assert "tools" not in none
    one = ollama_body(request_body(tools=tools, tool_choice={"type": "tool", "name": "Read"}),
                                    MODEL, config())
    assert [t["function"]["name"] for t in one["tools"]] == ["Read"]


def tool_search_turns(*names, call_id="toolu_search"):
    """The assistant's ToolSearch call and Claude Code's result: one tool_reference per loaded tool."""
    return [{"role": "assistant", "content": [{"type": "tool_use", "id": call_id, "name": "ToolSearch",
                                               "input": {"query": "select:" + ",".join(names)}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": call_id,
                 "content": [{"type": "tool_reference", "tool_name": name} for name in names]},
                {"type": "text", "text": "Tool loaded."}]}]


def test_deferred_tools_are_offered_once_a_tool_search_loads_them():
    schema = {"type": "object", "properties": {"notebook_path": {"type": "string"}}}
    tools = [{"name": "Bash", "input_schema": {"type": "object"}},
             {"name": "NotebookEdit", "description": "Edit a cell", "input_schema": schema, "defer_loading": True},
             {"name": "ToolSearch", "input_schema": {"type": "object"}},
             {"name": "WebFetch", "input_schema": {"type": "object"}, "defer_loading": True},
             {"name": "CronList", "input_schema": {"type": "object"}, "defer_loading": True}]
    first = [{"role": "user", "content": "edit the notebook"}]
    assert [t["name"] for t in proxy.client_tools(request_body(messages=first, tools=tools))] == ["Bash", "ToolSearch"]
    loaded = first + tool_search_turns("NotebookEdit") + tool_search_turns("CronList", "Missing", call_id="t2")
    payload = ollama_body(request_body(messages=loaded, tools=tools), MODEL, config())
    # Loaded tools go last, in load order, with their schema from the request; WebFetch stays out.
    assert [t["function"]["name"] for t in payload["tools"]] == ["Bash", "ToolSearch", "NotebookEdit", "CronList"]
    assert payload["tools"][2]["function"] == {"name": "NotebookEdit", "description": "Edit a cell",
                                               "parameters": schema}
    assert payload["messages"][2] == {"role": "tool", "content": "Tool loaded: NotebookEdit",
                                      "tool_call_id": "toolu_search", "tool_name": "ToolSearch"}


def test_a_deferred_tool_named_by_tool_choice_is_offered_and_forced():
    tools = [{"name": "Bash", "input_schema": {"type": "object"}},
             {"name": "NotebookEdit", "defer_loading": True, "input_schema": {"type": "object", "properties": {
                 "cell": {"type": "string"}}}}]
    payload = ollama_body(request_body(tools=tools, tool_choice={"type": "tool", "name": "NotebookEdit"}),
                                        MODEL, config())
    assert [tool["function"]["name"] for tool in payload["tools"]] == ["NotebookEdit"]
    assert payload["format"]["properties"]["name"]["enum"] == ["NotebookEdit"]


def test_system_entries_in_messages_become_reminders_at_their_place():
    nudge = "The user hasn't heard from you in a while."
    call = {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "ls"}}
    body = request_body(system="You are Claude Code.", messages=[
        {"role": "user", "content": "go"},
        {"role": "system", "content": [{"type": "text", "text": "# Environment\nlinux"}]},
        {"role": "assistant", "content": [call]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "a.txt"}]},
        {"role": "system", "content": nudge},
        {"role": "assistant", "content": [dict(call, id="t2")]},
        {"role": "system", "content": "<system-reminder>\nalready wrapped\n</system-reminder>"},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t2", "content": "b.txt"},
                                     {"type": "text", "text": "keep going"}]},
    ])
    messages = ollama_body(body, MODEL, config())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "user", "assistant", "tool", "user"]
    assert messages[0] == {"role": "system", "content": "You are Claude Code."}
    assert messages[1]["content"] == "go\n\n<system-reminder>\n# Environment\nlinux\n</system-reminder>"
    assert messages[4]["content"] == f"<system-reminder>\n{nudge}\n</system-reminder>"
    # A tool result still comes straight after its call, with the reminder after it.
    assert messages[6]["content"] == "b.txt"
    assert messages[7]["content"] == "<system-reminder>\nalready wrapped\n</system-reminder>\n\nkeep going"


def test_parallel_tool_results_follow_the_order_of_their_calls():
    calls = [{"type": "tool_use", "id": f"t{n}", "name": name, "input": {}}
             for n, name in ((1, "Bash"), (2, "Read"), (3, "Glob"))]
    results = [{"type": "tool_result", "tool_use_id": call_id, "content": call_id} for call_id in ("t3", "tx", "t1", "t2")]
    body = request_body(messages=[{"role": "user", "content": "go"}, {"role": "assistant", "content": calls},
                                  {"role": "user", "content": results + [{"type": "text", "text": "and?"}]}])
    messages = ollama_body(body, MODEL, config())["messages"]
    assert [(m["role"], m.get("tool_call_id")) for m in messages[2:]] == [
        ("tool", "t1"), ("tool", "t2"), ("tool", "t3"), ("tool", "tx"), ("user", None)]


def test_tool_schemas_lose_validator_metadata_but_keep_constraints():
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "title": "Args",
              "properties": {"title": {"type": "string", "title": "Title", "maxLength": 80},
                             "mode": {"enum": ["a", "b"], "default": "a"},
                             "items": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                                                  "properties": {"n": {"type": "integer",
                                                                                       "minimum": 1}}}},
                             "either": {"anyOf": [{"type": "string", "$comment": "x"}, {"type": "null"}]}},
              "required": ["title"], "additionalProperties": False}
    assert proxy.lean_schema(schema) == {
        "type": "object",
        "properties": {"title": {"type": "string", "maxLength": 80}, "mode": {"enum": ["a", "b"], "default": "a"},
                       "items": {"type": "array", "items": {"type": "object", "properties": {
                           "n": {"type": "integer", "minimum": 1}}}},
                       "either": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "required": ["title"]}
    assert schema["$schema"] and schema["properties"]["title"]["title"] == "Title"  # the request is left alone


def read_result_body(sizes, window=32768, max_tokens=32000, tail_text="final words"):
    """A conversation of Reads whose results have the given sizes (characters), at a window."""
    messages = [{"role": "user", "content": "read the files"}]
    for n, size in enumerate(sizes):
        line = f"{n}: " + "x" * 60 + "\n"
        text = (line * (size // len(line) + 1))[:size - len(tail_text)] + tail_text
        messages += [{"role": "assistant", "content": [{"type": "tool_use", "id": f"r{n}", "name": "Read",
                                                        "input": {"file_path": f"/f{n}"}}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"r{n}", "content": text}]}]
    return request_body(messages=messages, max_tokens=max_tokens, system="base prompt " * 4000)


def test_largest_tool_results_are_cut_middle_out_to_fit_the_window():
    notes = []
    body = read_result_body([80_000, 3_000])
    payload, estimate = proxy.anthropic_to_ollama(body, MODEL, config(), notes=notes)
    assert estimate == proxy.estimate_tokens(payload)
    assert estimate <= 32768 - proxy.answer_room(32000, 32768) == 32768 - 4096
    big, small = (m["content"] for m in payload["messages"] if m["role"] == "tool")
    original = body["messages"][2]["content"][0]["content"]
    assert small == body["messages"][4]["content"][0]["content"]  # under the cut size: untouched
    head, tail = big.split("[simple_api_proxy: ")[0], big.rsplit("]\n", 1)[1]
    assert original.startswith(head) and original.endswith(tail) and tail.endswith("final words")
    cut = int(big.split("[simple_api_proxy: ")[1].split(" characters")[0].replace(",", ""))
    assert cut == len(original) - len(head) - len(tail) and cut > 40_000
    assert "to fit the model's 32768-token window; read the rest in ranges" in big
    assert notes and "1 tool result(s) cut" in notes[0]
    assert payload["options"]["num_predict"] == 32768 - estimate
    # The next turn adds a small result: the cut result stays byte for byte the same.
    grown = read_result_body([80_000, 3_000, 2_000])
    assert ollama_body(grown, MODEL, config())["messages"][:len(payload["messages"])] == payload["messages"]
    # Nothing to cut that would make it fit: the request stays as sent, for `prompt is too long`.
    hopeless = dict(read_result_body([80_000]), system="base prompt " * 12000)
    payload = ollama_body(hopeless, MODEL, config())
    assert payload["messages"][3]["content"] == hopeless["messages"][2]["content"][0]["content"]
    assert proxy.estimate_tokens(payload) > 32768 and payload["options"]["num_predict"] == 32000


def test_prompt_of_a_growing_session_extends_the_previous_one():
    """Each turn's prompt, as Ollama's templates lay it out (system head, tools, messages), starts
    with the previous turn's: nudges, a cut read and parallel results must not rewrite the past.
    (Only a step down the cut ladder, when the session outgrows a step, rewrites a cut result.)"""
    messages = [{"role": "user", "content": "go"},
                {"role": "system", "content": [{"type": "text", "text": "# Environment\nlinux"}]}]
    prompts = []
    for turn in range(6):
        calls = [{"type": "tool_use", "id": f"t{turn}{n}", "name": "Read", "input": {"file_path": f"/f{n}"}}
                 for n in range(2)]
        size = 90_000 if turn == 1 else 200
        results = [{"type": "tool_result", "tool_use_id": call["id"], "content": f"{call['id']}:" + "y" * size}
                   for call in reversed(calls)]
        messages += [{"role": "assistant", "content": calls}, {"role": "user", "content": results},
                     {"role": "system", "content": "The user hasn't heard from you in a while."}]
        body = request_body(system=[{"type": "text", "text": f"x-anthropic-billing-header: cch={turn};"},
                                    {"type": "text", "text": "base " * 6000}],
                            messages=messages, max_tokens=32000,
                            tools=[{"name": "Read", "input_schema": {"type": "object"}}])
        payload = ollama_body(body, MODEL, config())
        assert proxy.estimate_tokens(payload) <= 32768 - 4096
        prompts.append(ollama_prompt(payload))
    assert "characters cut from the middle" in prompts[-1]
    for earlier, later in zip(prompts, prompts[1:]):
        assert later.startswith(earlier)


def test_num_predict_is_capped_at_what_the_window_has_left():
    payload = ollama_body(request_body("hi", max_tokens=128000), MODEL, config())
    assert payload["options"]["num_predict"] == 32768 - proxy.estimate_tokens(payload)
    assert ollama_body(request_body("hi", max_tokens=500), MODEL, config())["options"]["num_predict"] == 500
    assert ollama_body(request_body("hi", max_tokens=0), MODEL, config())["options"]["num_predict"] == 0


def test_a_prompt_that_leaves_the_answer_no_room_is_too_long_not_cut_off(ollama):
    with running_proxy(ollama.url, OLLAMA_NUM_CTX=4096) as gateway:
        crowded = request_body("x " * 7000, max_tokens=32000)  # ~4000 of the 4096 tokens
        status, _, error = gateway.messages(crowded)
        assert status == 400 and re.match(r"prompt is too long: \d+ tokens > 3072 maximum", error["error"]["message"])
        assert ollama.chats() == []
        assert gateway.messages(dict(crowded, max_tokens=50))[0] == 200  # a short answer still fits
        assert ollama.chats()[-1]["options"]["num_predict"] == 50


@pytest.mark.parametrize("body, message", [
    ([], "Request body must be a JSON object"),
    ({"max_tokens": 5, "messages": []}, "model: Field required"),
    ({"model": "m", "max_tokens": 5}, "messages: Field required"),
    ({"model": "m", "max_tokens": 5, "messages": []}, "messages: at least one message is required"),
    ({"model": 7, "max_tokens": 5, "messages": []}, "model: Input should be a valid string"),
    ({"model": "m", "max_tokens": "5", "messages": []}, "max_tokens: Input should be a valid integer"),
    ({"model": "m", "max_tokens": True, "messages": []}, "max_tokens: Input should be a valid integer"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"text": "x"}]}]},
     "messages.0.content.0.type"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user"}]}, "messages.0.content: Field required"),
    ({"model": "m", "max_tokens": 5, "stream": "yes", "messages": [{"role": "user", "content": "x"}]}, "stream"),
    ({"model": "m", "max_tokens": 5, "temperature": "hot", "messages": [{"role": "user", "content": "x"}]},
     "temperature"),
    ({"model": "m", "max_tokens": 5, "tools": [{"name": "t"}], "messages": [{"role": "user", "content": "x"}]},
     "tools.0.input_schema"),
    ({"model": "m", "max_tokens": 5, "stop_sequences": [1], "messages": [{"role": "user", "content": "x"}]},
     "stop_sequences.0"),
])
def test_validation_names_the_field(body, message):
    with pytest.raises(proxy.ProxyError) as caught:
        proxy.validate_messages_request(body, default_max_tokens=4096)
    assert caught.value.status == 400 and caught.value.error_type == "invalid_request_error"
    assert message in caught.value.message


def test_token_estimate_grows_with_prompt_and_tools():
    small = proxy.estimate_tokens(ollama_body(request_body("hi"), MODEL, config()))
    large = proxy.estimate_tokens(ollama_body(request_body("word " * 7000), MODEL, config()))
    assert small < 10 and 9000 < large < 11000


###############################################################################
# Translation: response
###############################################################################

def translate(chunks, **options):
    translator = proxy.StreamTranslator("claude-sonnet-4-5", 10, **options)
    events = translator.start()
    for item in chunks:
        events += translator.feed(item)
        if translator.done:
            break
    return events, translator


def test_stream_text_then_tool_calls_in_protocol_order():
    events, translator = translate([
        chunk(content="Checking"), chunk(content=" now."),
        chunk(tool_calls=[ollama_call("get_weather", {"city": "Paris"}), ollama_call("get_time", {}, 1)]),
        final_chunk(prompt_eval_count=412, eval_count=38)], tool_names=["get_weather", "get_time"],
        recover_tool_calls=False)
    assert_valid_stream(events)
    names = [name for name, _ in events]
    assert names == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop"] + ["content_block_start", "content_block_delta",
                                              "content_block_stop"] * 2 + ["message_delta", "message_stop"]
    tool_start = events[5][1]["content_block"]
    assert tool_start["type"] == "tool_use" and tool_start["input"] == {} and tool_start["id"].startswith("toolu_")
    assert json.loads(events[6][1]["delta"]["partial_json"]) == {"city": "Paris"}
    message = translator.message
    assert message["stop_reason"] == "tool_use" and message["content"][0] == {"type": "text", "text": "Checking now."}
    assert message["usage"]["input_tokens"] == 412 and message["usage"]["output_tokens"] == 38
    assert events[-2][1]["usage"] == {"input_tokens": 412, "output_tokens": 38}


def test_a_chunk_without_a_role_keeps_its_tool_calls_and_thinking():
    events, translator = translate([
        chunk(content="Checking"),
        {"message": {"content": " now", "tool_calls": [ollama_call("get_weather", {"city": "Oslo"})]}, "done": False},
        {"message": {"content": " and", "thinking": "hmm"}, "done": False}, final_chunk()],
        tool_names=["get_weather"], recover_tool_calls=False, show_thinking=True)
    kinds = [block["type"] for block in translator.message["content"]]
    assert kinds == ["text", "tool_use", "thinking", "text"] and translator.message["stop_reason"] == "tool_use"


def test_one_final_chunk_holding_everything_converts_whole():
    translator = proxy.StreamTranslator("claude-x", 5, show_thinking=True)
    translator.feed({"message": {"role": "assistant", "content": "Hi", "thinking": "hmm"}, "done": True,
                     "done_reason": "length", "prompt_eval_count": 3, "eval_count": 9})
    message = translator.message
    assert message["content"] == [{"type": "thinking", "thinking": "hmm", "signature": ""},
                                  {"type": "text", "text": "Hi"}]
    assert message["stop_reason"] == "max_tokens" and message["model"] == "claude-x"
    assert message["id"].startswith("msg_") and len(message["id"]) == 28


def test_thinking_is_dropped_unless_asked_for():
    events, translator = translate([chunk(thinking="secret plan"), chunk(content="Answer"), final_chunk()])
    assert translator.message["content"] == [{"type": "text", "text": "Answer"}]


def test_stop_sequence_is_found_across_chunks_and_cut():
    events, translator = translate([chunk(content="one two ##"), chunk(content="# three"), chunk(content="more")],
                                   stop_sequences=["###"])
    assert_valid_stream(events)
    assert translator.done and translator.message["stop_reason"] == "stop_sequence"
    assert translator.message["stop_sequence"] == "###"
    assert translator.message["content"] == [{"type": "text", "text": "one two "}]


def test_text_that_only_looks_like_a_stop_sequence_is_released():
    events, translator = translate([chunk(content="a #"), chunk(content="# b"), final_chunk()],
                                   stop_sequences=["###"])
    assert translator.message["content"][0]["text"] == "a ## b"
    assert translator.message["stop_reason"] == "end_turn"


def test_message_replays_as_events_that_rebuild_it():
    _, translator = translate([chunk(content="Hi"), chunk(tool_calls=[ollama_call("Bash", {"command": "ls"})]),
                               final_chunk()], tool_names=["Bash"])
    events = proxy.message_to_events(translator.message)
    assert_valid_stream(events)
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


###############################################################################
# HTTP: endpoints
###############################################################################

def test_root_answers_get_and_head(gateway):
    status, headers, body = gateway.json("GET", "/")
    assert status == 200 and body["status"] == "ok" and headers["request-id"].startswith("req_")
    status, headers, raw = gateway.call("HEAD", "/")
    assert status == 200 and raw == b""


def test_health_reports_ollama_and_cache(gateway):
    status, _, body = gateway.json("GET", "/health")
    assert status == 200 and body["status"] == "ok"
    assert body["ollama"]["reachable"] and body["ollama"]["version"] == "0.33.0"
    assert body["ollama"]["default_model_installed"] is True and MODEL in body["ollama"]["models"]
    assert body["ollama"]["latency_ms"] >= 0 and body["cache"]["enabled"] is False


def test_health_is_503_json_when_ollama_is_down():
    with running_proxy(f"127.0.0.1:{free_port()}") as gateway:
        status, headers, body = gateway.json("GET", "/health")
    assert status == 503 and headers["content-type"] == "application/json"
    assert body["status"] == "degraded" and body["ollama"]["reachable"] is False
    assert "cannot reach Ollama" in body["ollama"]["error"]


def test_models_list_in_anthropic_shape_with_paging(gateway):
    status, _, body = gateway.json("GET", "/v1/models?limit=2")
    assert status == 200 and body["has_more"] is True
    assert [m["id"] for m in body["data"]] == [MODEL, "llama3.2:3b"]
    assert body["data"][0] == {"type": "model", "id": MODEL, "display_name": f"{MODEL} (7.6B)",
                               "created_at": "2026-05-10T08:06:48Z"}
    status, _, rest = gateway.json("GET", "/v1/models?after_id=llama3.2:3b")
    assert [m["id"] for m in rest["data"]] == ["qwen3:8b"] and rest["has_more"] is False
    status, _, one = gateway.json("GET", "/v1/models/claude-opus-5-5")
    assert status == 200 and one["id"] == "claude-opus-5-5" and MODEL in one["display_name"]
    status, _, missing = gateway.json("GET", "/v1/models/mistral:7b")
    assert status == 404 and missing["error"]["type"] == "not_found_error"


def test_unknown_routes_and_methods_get_the_error_envelope(gateway):
    status, _, body = gateway.json("GET", "/v2/anything")
    assert status == 404 and body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert body["request_id"].startswith("req_")
    status, headers, body = gateway.json("GET", "/v1/messages")
    assert status == 405 and "POST" in body["error"]["message"] and headers["allow"] == "POST"
    status, _, body = gateway.json("DELETE", "/v1/messages")
    assert status == 405 and body["type"] == "error" and "DELETE" in body["error"]["message"]
    # HEAD goes wherever GET does (RFC 9110 §9.3.2), and a 405 says what does (§15.5.6).
    status, headers, _ = gateway.call("HEAD", "/v1/models")
    assert status == 200 and int(headers["content-length"]) > 0
    assert gateway.call("DELETE", "/v1/models")[1]["allow"] == "GET, HEAD"


def test_count_tokens_estimates_without_calling_ollama(gateway, ollama):
    body = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "word " * 700}],
            "system": "Be brief.", "tools": [{"name": "Bash", "input_schema": {"type": "object"}}]}
    status, _, counted = gateway.json("POST", "/v1/messages/count_tokens?beta=true", body)
    assert status == 200 and 1000 < counted["input_tokens"] < 1100
    assert ollama.chats() == []


###############################################################################
# HTTP: messages
###############################################################################

def test_message_non_streaming(gateway, ollama):
    status, headers, message = gateway.messages(request_body(system="Be brief.", temperature=0.1))
    assert status == 200 and headers["content-type"] == "application/json"
    assert int(headers["content-length"]) > 0
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["model"] == "claude-sonnet-4-5" and message["id"].startswith("msg_")
    assert message["content"] == [{"type": "text", "text": "Hello! I am the stand-in model."}]
    assert message["stop_reason"] == "end_turn" and message["stop_sequence"] is None
    assert message["usage"] == {"input_tokens": 26, "output_tokens": 6, "cache_creation_input_tokens": 0,
                                "cache_read_input_tokens": 0}
    sent = ollama.chats()[-1]
    assert sent["model"] == MODEL and sent["stream"] is True and sent["options"]["temperature"] == 0.1
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


def test_message_streaming_follows_the_protocol(gateway):
    status, headers, raw = gateway.stream(request_body())
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = parse_sse(raw)
    assert_valid_stream(events)
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "Hello! I am the stand-in model."
    assert events[0][1]["message"]["model"] == "claude-sonnet-4-5"
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn" and events[-2][1]["usage"]["output_tokens"] == 6


def test_query_string_and_unknown_fields_are_accepted(gateway):
    body = request_body(context_management={"edits": [{"type": "clear_thinking_20251015"}]},
                        output_config={"effort": "high"}, thinking={"type": "adaptive", "display": "omitted"},
                        metadata={"user_id": "u1"}, cache_control={"type": "ephemeral"}, speed="fast")
    status, _, message = gateway.json("POST", "/v1/messages?beta=true", body,
                                      {"anthropic-beta": "a,b", "anthropic-version": "2026-10-21"})
    assert status == 200 and message["content"][0]["type"] == "text"


def test_tool_calls_round_trip(gateway, ollama):
    ollama.script(tool_reply(("Bash", {"command": "ls"}), text="Let me look."))
    tools = [{"name": "Bash", "description": "Run", "input_schema": {"type": "object"}}]
    status, _, message = gateway.messages(request_body(tools=tools))
    assert message["stop_reason"] == "tool_use"
    text, call = message["content"]
    assert text == {"type": "text", "text": "Let me look."}
    assert call["type"] == "tool_use" and call["name"] == "Bash" and call["input"] == {"command": "ls"}
    follow_up = request_body(tools=tools, messages=[
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": message["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "a.txt"}]}])
    status, _, final = gateway.messages(follow_up)
    assert status == 200 and final["stop_reason"] == "end_turn"
    sent = ollama.chats()[-1]["messages"]
    assert sent[-2]["tool_calls"][0]["id"] == call["id"]
    assert sent[-1] == {"role": "tool", "content": "a.txt", "tool_call_id": call["id"], "tool_name": "Bash"}


def test_streamed_tool_call_uses_input_json_delta(gateway, ollama):
    ollama.script(tool_reply(("Bash", {"command": "ls -la"})))
    status, _, raw = gateway.stream(request_body(tools=[{"name": "Bash", "input_schema": {"type": "object"}}]))
    events = parse_sse(raw)
    assert_valid_stream(events)
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert deltas == [{"type": "input_json_delta", "partial_json": '{"command": "ls -la"}'}]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_max_tokens_maps_to_length_stop(gateway, ollama):
    ollama.script(text_reply("cut short", done_reason="length"))
    status, _, message = gateway.messages(request_body(max_tokens=2))
    assert message["stop_reason"] == "max_tokens" and ollama.chats()[-1]["options"]["num_predict"] == 2


def test_max_tokens_zero_answers_without_generating(gateway, ollama):
    status, _, message = gateway.messages(request_body(max_tokens=0))
    assert status == 200 and message["content"] == [] and message["stop_reason"] == "max_tokens"
    assert ollama.chats() == []


def test_stop_sequence_is_reported_and_generation_stopped(gateway, ollama):
    ollama.script(Reply([chunk(content="alpha "), chunk(content="END"), ("sleep", 5), chunk(content="late")]))
    started = time.monotonic()
    status, _, message = gateway.messages(request_body(stop_sequences=["END"]))
    assert message["stop_reason"] == "stop_sequence" and message["stop_sequence"] == "END"
    assert message["content"] == [{"type": "text", "text": "alpha "}]
    assert time.monotonic() - started < 3


def test_thinking_model_gets_think_flag_and_capabilities_are_cached(gateway, ollama):
    ollama.script(Reply([chunk(thinking="pondering"), chunk(content="42"), final_chunk()]), text_reply())
    body = request_body(model="qwen3:8b", max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 2000})
    status, _, message = gateway.messages(body)
    assert ollama.chats()[-1]["think"] is True
    assert message["content"] == [{"type": "thinking", "thinking": "pondering", "signature": ""},
                                  {"type": "text", "text": "42"}]
    gateway.messages(request_body(model="qwen3:8b"))
    assert ollama.chats()[-1]["think"] is False
    assert sum(1 for path, _ in ollama.requests if path == "/api/show") == 1


###############################################################################
# HTTP: errors
###############################################################################

@pytest.mark.parametrize("raw, fragment", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"model": "m", "max_tokens": 5.5, "messages": [{"role": "user", "content": "x"}]}',
     "max_tokens: Input should be a valid integer"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
])
def test_bad_bodies_get_400_and_the_server_keeps_serving(gateway, raw, fragment):
    status, headers, body = gateway.json("POST", "/v1/messages", raw)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert fragment in body["error"]["message"] and headers["x-should-retry"] == "false"
    assert "Traceback" not in json.dumps(body)
    assert gateway.json("GET", "/")[0] == 200


def test_ollama_unreachable_is_502_naming_the_address():
    port = free_port()
    with running_proxy(f"127.0.0.1:{port}") as gateway:
        status, _, body = gateway.messages(request_body())
    assert status == 502 and body["error"]["type"] == "api_error"
    assert f"127.0.0.1:{port}" in body["error"]["message"] and "ollama serve" in body["error"]["message"]


def test_missing_model_is_404_listing_installed_models(gateway):
    status, headers, body = gateway.messages(request_body(model="mistral:7b"))
    assert status == 404 and body["error"]["type"] == "not_found_error"
    message = body["error"]["message"]
    assert "mistral:7b" in message and MODEL in message and "ollama pull" in message
    status, _, raw = gateway.stream(request_body(model="mistral:7b"))
    assert status == 404


def test_prompt_too_long_uses_anthropics_wording(ollama):
    with running_proxy(ollama.url, OLLAMA_NUM_CTX=1000) as gateway:
        status, _, body = gateway.messages(request_body("word " * 5000))
    assert status == 400
    assert body["error"]["message"].startswith("prompt is too long: ")
    assert body["error"]["message"].endswith(" tokens > 1000 maximum")
    assert ollama.chats() == []


def test_big_tool_results_are_cut_to_fit_and_num_predict_capped_through_the_proxy(gateway, ollama):
    status, _, body = gateway.messages(read_result_body([100_000]))
    assert status == 200, body
    sent = ollama.chats()[-1]
    assert "characters cut from the middle of this tool result" in sent["messages"][-1]["content"]
    assert sent["options"]["num_predict"] == 32768 - proxy.estimate_tokens(sent) < 32000
    status, _, body = gateway.messages(dict(read_result_body([100_000]), system="base prompt " * 12000))
    assert status == 400 and body["error"]["message"].startswith("prompt is too long: ")
    assert len(ollama.chats()) == 1


def test_a_prompt_no_cut_brings_within_the_limit_is_refused_at_the_size_sent(gateway, ollama):
    """At 32k with max_tokens 4096 the limit is 31,744 tokens: a prompt whose smallest cut lands
    between that and the window is refused uncut, with the size the client sent."""
    body = dict(read_result_body([80_000], max_tokens=4096), system="base prompt " * 9100)
    limit = proxy.prompt_limit(4096, 32768)
    payload, sent = proxy.anthropic_to_ollama(body, MODEL, config())
    result = payload["messages"][-1]
    assert result["content"] == body["messages"][-1]["content"][0]["content"]  # not cut
    result["content"] = proxy.trimmed_tool_text(result["content"], proxy.TRIM_LADDER[-1], 32768)
    assert limit == 31744 < proxy.estimate_tokens(payload) <= 32768  # the smallest cut: between
    status, _, error = gateway.messages(body)
    assert status == 400 and error["error"]["message"] == f"prompt is too long: {sent} tokens > 32768 maximum"
    assert ollama.chats() == []
    count = dict(body)
    del count["max_tokens"]  # count_tokens takes none; DEFAULT_MAX_TOKENS is 4096 too
    assert gateway.json("POST", "/v1/messages/count_tokens", count)[2] == {"input_tokens": sent}


def test_count_tokens_counts_the_prompt_messages_would_send(gateway, ollama):
    body = read_result_body([100_000])
    status, _, counted = gateway.json("POST", "/v1/messages/count_tokens", dict(body))
    assert gateway.messages(body)[0] == 200
    sent = ollama.chats()[-1]
    assert "characters cut" in sent["messages"][-1]["content"]
    assert counted == {"input_tokens": proxy.estimate_tokens(sent)}


def test_images_reach_only_models_that_can_see(gateway, ollama, caplog):
    ollama.models["llava:7b"] = ["completion", "vision"]
    png = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    content = [{"type": "text", "text": "What is this?"}, png]
    caplog.set_level("INFO", logger="simple_api_proxy")
    assert gateway.messages(request_body(model="llava:7b", messages=[{"role": "user", "content": content}]))[0] == 200
    assert gateway.messages(request_body(messages=[{"role": "user", "content": content}]))[0] == 200
    seeing, blind = ollama.chats()
    assert seeing["messages"][-1]["images"] == ["iVBORw0KGgo="]
    assert "images" not in blind["messages"][-1]
    assert blind["messages"][-1]["content"] == ("What is this?\n\n[image (image/png, 8 bytes) left out: "
                                                "this model can't see images]")
    assert caplog.text.count("changed for the model: [image (image/png, 8 bytes)") == 1


@pytest.mark.parametrize("reply, status, error_type", [
    (Reply(status=503, error="server busy, please try again.  maximum pending requests exceeded"), 529,
     "overloaded_error"),
    (Reply(status=500, error="llama runner process has terminated"), 500, "api_error"),
    (Reply(status=400, error='"qwen2.5-coder:7b" does not support thinking'), 400, "invalid_request_error"),
    (Reply(status=429, error="rate limited"), 429, "rate_limit_error"),
])
def test_ollama_errors_before_the_stream_keep_their_status(gateway, ollama, reply, status, error_type):
    for stream in (False, True):
        ollama.script(reply)
        got, headers, raw = gateway.call("POST", "/v1/messages", request_body(stream=stream))
        body = json.loads(raw)
        assert got == status and body["error"]["type"] == error_type
        assert reply.error in body["error"]["message"]


def test_first_token_timeout_is_504(ollama):
    ollama.script(Reply(delay_before=3))
    with running_proxy(ollama.url, OLLAMA_FIRST_TOKEN_TIMEOUT=0.5) as gateway:
        status, _, body = gateway.messages(request_body())
    assert status == 504 and body["error"]["type"] == "timeout_error"
    assert "OLLAMA_FIRST_TOKEN_TIMEOUT" in body["error"]["message"]


def test_silence_mid_stream_ends_the_stream_with_an_error_event(ollama):
    ollama.script(Reply([chunk(content="Hel"), ("sleep", 3), chunk(content="lo"), final_chunk()]))
    with running_proxy(ollama.url, OLLAMA_TIMEOUT=0.5) as gateway:
        status, _, raw = gateway.stream(request_body())
    events = parse_sse(raw)
    assert status == 200 and events[-1][0] == "error"
    assert events[-1][1]["error"]["type"] == "timeout_error" and "OLLAMA_TIMEOUT" in events[-1][1]["error"]["message"]
    assert events[-2][0] == "content_block_stop"


@pytest.mark.parametrize("steps, fragment", [
    ([chunk(content="Hi"), {"error": "an error was encountered while running the model"}], "running the model"),
    ([chunk(content="Hi"), ("raw", b"{garbage\n")], "not JSON"),
    ([chunk(content="Hi"), ("cut",)], "closed the connection mid-reply"),
    ([chunk(content="Hi")], "ended the reply before it was done"),
    ([chunk(content="Hi"), ("reset",)], "Ollama"),
])
def test_upstream_faults_mid_stream_end_with_an_error_event(gateway, ollama, steps, fragment):
    ollama.script(Reply(steps))
    status, _, raw = gateway.stream(request_body())
    events = parse_sse(raw)
    assert status == 200 and events[-1][0] == "error" and fragment in events[-1][1]["error"]["message"]
    ollama.script(Reply(steps))
    status, _, body = gateway.messages(request_body())
    assert status in (502, 500) and fragment in body["error"]["message"]
    assert_threads_freed(gateway)


def assert_threads_freed(gateway):
    deadline = time.monotonic() + 2
    while gateway.server.in_flight or gateway.server.active_requests:
        assert time.monotonic() < deadline, "a request never finished"
        time.sleep(0.01)
    assert gateway.server.slots._value == gateway.server.config.max_concurrent


def test_slow_model_load_streams_pings_then_the_answer(ollama):
    ollama.script(text_reply(delay_before=2))
    with running_proxy(ollama.url, PING_INTERVAL=0.3) as gateway:
        status, _, raw = gateway.stream(request_body())
    events = parse_sse(raw)
    assert_valid_stream(events)
    assert events[0][0] == "message_start" and sum(1 for n, _ in events if n == "ping") >= 3


def test_error_after_commit_is_an_error_event(ollama):
    ollama.script(Reply(delay_before=1.5, status=404, error="model 'qwen2.5-coder:7b' not found"))
    with running_proxy(ollama.url, PING_INTERVAL=0.3) as gateway:
        status, _, raw = gateway.stream(request_body())
    events = parse_sse(raw)
    assert status == 200 and events[0][0] == "message_start" and events[-1][0] == "error"
    assert events[-1][1]["error"]["type"] == "not_found_error"


def test_client_disconnect_closes_the_upstream_request(gateway, ollama):
    ollama.script(Reply([chunk(content="a")] + [("sleep", 0.05), chunk(content="b")] * 200 + [final_chunk()]))
    connection = socket.create_connection(("127.0.0.1", gateway.port))
    body = json.dumps(request_body(stream=True)).encode()
    connection.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert connection.recv(100).startswith(b"HTTP/1.1 200")
    connection.close()
    deadline = time.monotonic() + 3
    while ollama.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ollama.disconnects == 1


def test_client_leaving_during_model_load_closes_upstream_within_a_second(gateway, ollama):
    ollama.script(text_reply(delay_before=10))
    connection = socket.create_connection(("127.0.0.1", gateway.port))
    body = json.dumps(request_body()).encode()
    connection.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert ollama.chat_started.wait(5)
    connection.close()
    left = time.monotonic()
    while ollama.disconnects == 0 and time.monotonic() - left < 3:
        time.sleep(0.02)
    assert ollama.disconnects == 1 and time.monotonic() - left < 1.5


def test_one_slow_generation_does_not_hold_up_another(gateway, ollama):
    ollama.script(text_reply(delay_before=2))
    slow = threading.Thread(target=gateway.messages, args=(request_body(),))
    slow.start()
    assert ollama.chat_started.wait(5)
    started = time.monotonic()
    status, _, _ = gateway.messages(request_body("fast one"))
    assert status == 200 and time.monotonic() - started < 1.5
    slow.join()


def test_upstream_connections_are_kept_alive_and_stale_ones_replaced(gateway, ollama):
    def answered(expected=200):
        status = gateway.messages(request_body())[0]
        # The connection goes back to the pool only after the client has its answer: wait for
        # the request to be over, or the next one would find the pool empty and open another.
        wait_until(lambda: gateway.server.active_requests == 0, what="the request to finish")
        return expected is None or status == expected

    for _ in range(3):
        assert answered()
    assert ollama.connections == 1
    ollama.script(Reply([chunk(content="Hi"), ("cut",)]))
    answered(None)
    for _ in range(2):
        assert answered()
    assert ollama.connections == 2
    ollama.close_idle = True  # the kept connection is used once more, then found closed and replaced
    for _ in range(2):
        assert answered()
    assert ollama.connections == 3


def test_a_kept_connection_closed_as_it_is_reused_gets_the_request_resent(gateway, ollama):
    assert gateway.messages(request_body())[0] == 200
    ollama.drop_kept = True
    for stream in (False, True):
        status, _, raw = gateway.call("POST", "/v1/messages", request_body(stream=stream))
        assert status == 200
        if stream:
            assert_valid_stream(parse_sse(raw))
        else:
            assert json.loads(raw)["content"][0]["text"] == "Hello! I am the stand-in model."
        ollama.drop_kept = True
    assert ollama.connections == 3


def test_lines_before_a_bad_line_in_the_same_read_still_arrive(gateway, ollama):
    good = json.dumps(chunk(content="Hello")).encode() + b"\n"
    ollama.script(Reply([("raw", good + b"{garbage\n")]))
    status, _, raw = gateway.stream(request_body())
    events = parse_sse(raw)
    assert [d["delta"]["text"] for n, d in events if n == "content_block_delta"] == ["Hello"]
    assert events[-1][0] == "error"


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_timeouts_must_be_finite(value, capsys):
    with pytest.raises(SystemExit):
        proxy.load_config([], {"CLIENT_TIMEOUT": value})
    assert "CLIENT_TIMEOUT must be a number greater than 0" in capsys.readouterr().err


def test_keep_alive_connection_serves_several_requests(gateway):
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    for stream in (False, True, False):
        connection.request("POST", "/v1/messages", json.dumps(request_body(stream=stream)),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.read()
    connection.close()


###############################################################################
# The official anthropic SDK, unmodified
###############################################################################

def anthropic_module():
    try:
        import anthropic
    except ImportError:
        need(False, "the anthropic SDK is not installed (pip install anthropic)")
    return anthropic


@pytest.fixture
def sdk(gateway):
    anthropic = anthropic_module()
    return anthropic, anthropic.Anthropic(base_url=gateway.url, api_key="dummy", max_retries=0, timeout=30)


def test_sdk_messages_create(sdk):
    anthropic, client = sdk
    message = client.messages.create(model="claude-opus-5-5", max_tokens=100,
                                     messages=[{"role": "user", "content": "Hello"}])
    assert message.content[0].text == "Hello! I am the stand-in model."
    assert message.stop_reason == "end_turn" and message.usage.output_tokens == 6
    assert message._request_id.startswith("req_")


def test_sdk_stream_get_final_message(sdk, ollama):
    anthropic, client = sdk
    ollama.script(Reply([chunk(content="Streaming "), chunk(content="works."), final_chunk(eval_count=2)]))
    with client.messages.stream(model="claude-opus-5-5", max_tokens=100,
                                messages=[{"role": "user", "content": "Hi"}]) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert texts == ["Streaming ", "works."]
    assert final.content[0].text == "Streaming works." and final.usage.output_tokens == 2


def test_sdk_tool_use_both_directions(sdk, ollama):
    anthropic, client = sdk
    tools = [{"name": "get_weather", "description": "Weather for a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    ollama.script(tool_reply(("get_weather", {"city": "Paris"})))
    with client.messages.stream(model="claude-opus-5-5", max_tokens=100, tools=tools,
                                messages=[{"role": "user", "content": "Weather in Paris?"}]) as stream:
        first = stream.get_final_message()
    call = first.content[0]
    assert first.stop_reason == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
    ollama.script(text_reply("It is 11 °C in Paris."))
    second = client.messages.create(model="claude-opus-5-5", max_tokens=100, tools=tools, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "11 °C"}]}])
    assert second.content[0].text == "It is 11 °C in Paris."
    assert ollama.chats()[-1]["messages"][-1] == {"role": "tool", "content": "11 °C", "tool_call_id": call.id,
                                                  "tool_name": "get_weather"}


def test_sdk_count_tokens_and_models(sdk):
    anthropic, client = sdk
    counted = client.messages.count_tokens(model="claude-opus-5-5", messages=[{"role": "user", "content": "Hi"}])
    assert counted.input_tokens > 0
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL, "llama3.2:3b", "qwen3:8b"]
    assert client.models.retrieve("claude-haiku-4-5").id == "claude-haiku-4-5"


def test_sdk_raises_the_matching_exception_for_each_error(sdk, ollama):
    anthropic, client = sdk
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="claude-opus-5-5", max_tokens=10, messages=[])
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="mistral:7b", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    ollama.script(Reply(status=503, error="server busy, please try again.  maximum pending requests exceeded"))
    with pytest.raises(anthropic.OverloadedError):
        client.messages.create(model="claude-opus-5-5", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    ollama.script(Reply([chunk(content="Hi"), {"error": "runner crashed"}]))
    with pytest.raises(anthropic.APIStatusError, match="runner crashed"):
        with client.messages.stream(model="claude-opus-5-5", max_tokens=10,
                                    messages=[{"role": "user", "content": "x"}]) as stream:
            stream.get_final_message()
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("nothing-here")


def test_sdk_sees_gateway_timeout_and_unreachable_ollama(ollama):
    anthropic = anthropic_module()
    ollama.script(Reply(delay_before=3))
    with running_proxy(ollama.url, OLLAMA_FIRST_TOKEN_TIMEOUT=0.5) as gateway:
        client = anthropic.Anthropic(base_url=gateway.url, api_key="dummy", max_retries=0)
        with pytest.raises(anthropic.GatewayTimeoutError):
            client.messages.create(model="claude-opus-5-5", max_tokens=10,
                                   messages=[{"role": "user", "content": "x"}])
    with running_proxy(f"127.0.0.1:{free_port()}") as gateway:
        client = anthropic.Anthropic(base_url=gateway.url, api_key="dummy", max_retries=0)
        with pytest.raises(anthropic.InternalServerError) as caught:
            client.messages.create(model="claude-opus-5-5", max_tokens=10,
                                   messages=[{"role": "user", "content": "x"}])
        assert caught.value.status_code == 502


###############################################################################
# Cache
###############################################################################

def key_of(body, **config_settings):
    request = proxy.validate_messages_request(body, default_max_tokens=4096)
    settings = config(**config_settings)
    payload = ollama_body(request, proxy.resolve_model(request["model"], settings), settings)
    return proxy.cache_key(payload, request, settings.tool_call_recovery)


def test_cache_key_changes_with_everything_that_changes_the_answer():
    base = request_body(system="Be brief.", tools=[{"name": "Bash", "input_schema": {"type": "object"}}])
    variations = {
        "model": dict(base, model="llama3.2:3b"),
        "system": dict(base, system="Be verbose."),
        "messages": dict(base, messages=[{"role": "user", "content": "Hello!"}]),
        "tools": dict(base, tools=[{"name": "Read", "input_schema": {"type": "object"}}]),
        "tool_choice": dict(base, tool_choice={"type": "none"}),
        "max_tokens": dict(base, max_tokens=1025),
        "temperature": dict(base, temperature=0.5),
        "top_p": dict(base, top_p=0.5),
        "top_k": dict(base, top_k=5),
        "stop_sequences": dict(base, stop_sequences=["\n\n"]),
        "thinking": dict(base, thinking={"type": "adaptive"}),
        "output_config": dict(base, output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}}),
    }
    keys = {name: key_of(body) for name, body in variations.items()}
    keys["base"] = key_of(base)
    assert len(set(keys.values())) == len(keys), keys
    assert keys["base"].startswith("simple_api_proxy:v2:") and len(keys["base"]) == 20 + 64
    assert key_of(base, MODEL_MAP="sonnet=llama3.2:3b") != keys["base"]


def test_cache_key_ignores_what_does_not_change_the_answer():
    base = request_body(system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cch=aaa;"},
                                {"type": "text", "text": "Be brief."}])
    same = [
        dict(base, stream=True),
        dict(base, metadata={"user_id": "someone"}),
        dict(base, system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cch=bbb;"},
                           {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]),
        dict(base, messages=[{"role": "user", "content": [{"type": "text", "text": "Hello",
                                                           "cache_control": {"type": "ephemeral"}}]}]),
        dict(base, model="claude-opus-5-5"),
        dict(base, context_management={"edits": []}),
    ]
    assert {key_of(body) for body in same} == {key_of(base)}


def test_memory_tier_is_bounded_by_entries_and_bytes():
    tier = proxy.MemoryTier(max_entries=3, max_bytes=100, ttl=60)
    for name in "abcd":
        tier.put(name, name * 10, 10)
    assert tier.get("a") is None and tier.get("d") == "d" * 10
    tier.get("b")
    tier.put("e", "e", 10)
    assert tier.get("c") is None and tier.get("b") is not None
    tier.put("big", "z", 90)
    assert tier.bytes <= 100 and tier.get("big") is not None
    tier.put("huge", "z", 101)
    assert tier.get("huge") is None
    health = tier.health()
    assert health["state"] == "up" and health["entries"] == len(tier.entries) and health["hits"] >= 3


@pytest.mark.parametrize("text", ["plain", "\x00i\x00", '"\x00m\x00"', "\x00t\x00 and \x00i\x00", "é \u2028 \\u0000i\\u0000"])
def test_a_replayed_answer_is_the_stored_one_with_fresh_ids_and_the_callers_model(text):
    stored = proxy.message_object("msg_old", "claude-x", [
        {"type": "thinking", "thinking": text, "signature": ""},
        {"type": "text", "text": text},
        {"type": "tool_use", "id": "toolu_a", "name": "Bash", "input": {"command": text}},
        {"type": "tool_use", "id": "toolu_b", "name": "Read", "input": {"path": "/x"}}], "tool_use", None, 12, 34)
    original = json.loads(json.dumps(stored))
    answer = proxy.ReplayableAnswer(stored, proxy.json_bytes(stored))
    bodies = [answer.body(model) for model in ("claude-opus-5-5", 'odd "model" \u00e9', "claude-opus-5-5")]
    replays = [json.loads(body) for body in bodies] + [answer.fresh_message("claude-y")]
    ids = set()
    for replay, model in zip(replays, ("claude-opus-5-5", 'odd "model" \u00e9', "claude-opus-5-5", "claude-y")):
        assert replay["model"] == model
        ids.add(replay["id"])
        ids.update(block["id"] for block in replay["content"] if block["type"] == "tool_use")
        expected = dict(original, id=replay["id"], model=model, content=[
            dict(block, id=replay_block["id"]) if block["type"] == "tool_use" else block
            for block, replay_block in zip(original["content"], replay["content"])])
        assert replay == expected
    assert len(ids) == 12 and not ids & {"msg_old", "toolu_a", "toolu_b"}
    assert bodies[0] == proxy.json_bytes(replays[0])  # the very bytes json gives
    assert stored == original  # replays never change what is stored


def test_the_first_replays_of_an_answer_may_come_at_once_from_many_threads():
    stored = proxy.message_object("msg_old", "claude-x", [
        {"type": "text", "text": "hi " * 200},
        {"type": "tool_use", "id": "toolu_a", "name": "Bash", "input": {"command": "ls"}}], "tool_use", None, 3, 4)
    expected = dict(json.loads(proxy.json_bytes(stored)), id=None, model="m")
    for _ in range(30):
        answer = proxy.ReplayableAnswer(stored, proxy.json_bytes(stored))
        start, bodies = threading.Barrier(8), []

        def replay():
            start.wait(10)
            bodies.append(answer.body("m"))
        threads = [threading.Thread(target=replay) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        replays = [json.loads(body) for body in bodies]
        assert len(replays) == 8
        for replay in replays:
            replay["id"] = None
            assert replay["content"][1].pop("id").startswith("toolu_")
            assert replay == dict(expected, content=[expected["content"][0], {k: v for k, v in expected["content"][1].items() if k != "id"}])


def test_an_answer_that_would_not_be_replayed_is_not_stored(caplog):
    cache = proxy.ResponseCache(config(CACHE="on"))
    good = proxy.message_object("msg_a", "claude-x", [{"type": "text", "text": "hi"}], "end_turn", None, 3, 2)
    bad = proxy.message_object("msg_b", "claude-x", [{"type": "text", "text": "hi"}], "end_turn", None, 2.5, -3)
    cache.put("good", good)
    cache.put("bad", bad)
    assert cache.get("bad") is None and list(cache.memory.entries) == ["good"]
    assert json.loads(cache.get("good").body("claude-y"))["content"] == good["content"]
    assert any("bad" in r.getMessage() and "not stored" in r.getMessage() for r in caplog.records)


def test_memory_tier_entries_expire():
    tier = proxy.MemoryTier(max_entries=3, max_bytes=100, ttl=0.05)
    tier.put("a", "1", 1)
    time.sleep(0.1)
    assert tier.get("a") is None and tier.bytes == 0


def test_cache_hit_skips_ollama_and_says_so(ollama):
    with running_proxy(ollama.url, CACHE="on") as gateway:
        status, headers, first = gateway.messages(request_body())
        assert headers["x-cache"] == "MISS"
        status, headers, second = gateway.messages(request_body(model="claude-opus-5-5"))
        assert headers["x-cache"] == "HIT" and len(ollama.chats()) == 1
        assert second["content"] == first["content"] and second["id"] != first["id"]
        assert second["model"] == "claude-opus-5-5"
        status, headers, raw = gateway.stream(request_body())
        events = parse_sse(raw)
        assert_valid_stream(events)
        assert headers["x-cache"] == "HIT" and len(ollama.chats()) == 1
        assert "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta") == \
            first["content"][0]["text"]
        health = gateway.json("GET", "/health")[2]["cache"]
        assert health["memory"]["hits"] == 2 and health["memory"]["entries"] == 1
        assert health["redis"]["state"] == "disabled"


def test_cache_control_headers_and_cache_off(ollama):
    with running_proxy(ollama.url, CACHE="on") as gateway:
        assert gateway.messages(request_body(), {"Cache-Control": "no-store"})[1]["x-cache"] == "BYPASS"
        assert gateway.messages(request_body())[1]["x-cache"] == "MISS"
        assert gateway.messages(request_body(), {"Cache-Control": "no-cache"})[1]["x-cache"] == "BYPASS"
        assert gateway.messages(request_body())[1]["x-cache"] == "HIT"
        assert len(ollama.chats()) == 3
    with running_proxy(ollama.url, CACHE="off") as gateway:
        assert gateway.messages(request_body())[1]["x-cache"] == "BYPASS"
        assert gateway.messages(request_body())[1]["x-cache"] == "BYPASS"


@pytest.mark.parametrize("reply", [
    Reply(status=500, error="runner crashed"),
    Reply([chunk(content="Hi"), {"error": "runner crashed"}]),
    Reply([chunk(content="Hi"), ("cut",)]),
])
def test_errors_and_cut_streams_are_not_stored(ollama, reply):
    with running_proxy(ollama.url, CACHE="on") as gateway:
        for stream in (True, False):
            ollama.script(reply)
            gateway.call("POST", "/v1/messages", request_body(stream=stream))
        assert gateway.server.cache.memory.entries == {}
        assert gateway.messages(request_body())[1]["x-cache"] == "MISS"


def test_stream_whose_client_left_is_not_stored(ollama):
    ollama.script(Reply([chunk(content="a")] + [("sleep", 0.05), chunk(content="b")] * 40 + [final_chunk()]))
    with running_proxy(ollama.url, CACHE="on") as gateway:
        connection = socket.create_connection(("127.0.0.1", gateway.port))
        body = json.dumps(request_body(stream=True)).encode()
        connection.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert connection.recv(100).startswith(b"HTTP/1.1 200")
        connection.close()
        time.sleep(3)
        assert ollama.disconnects == 1 and gateway.server.cache.memory.entries == {}


def redis_module():
    try:
        import redis
    except ImportError:
        need(False, "redis-py is not installed (pip install redis)")
    return redis


@pytest.fixture
def shared_redis():
    """The machine's Redis on 127.0.0.1:6379, database 13, emptied before and after."""
    redis = redis_module()
    client = redis.Redis(host="127.0.0.1", port=6379, db=13, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError:
        need(False, "no redis-server answers on 127.0.0.1:6379")
    client.flushdb()
    yield client, "redis://127.0.0.1:6379/13"
    client.flushdb()


class PrivateRedis:
    """A redis-server of our own on a free port, to kill and restart."""

    def __init__(self):
        need(shutil.which("redis-server"), "redis-server is not installed")
        self.port = free_port()
        self.process = None
        self.start()

    def start(self):
        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.02)
        raise RuntimeError("private redis-server did not start")

    def kill(self):
        self.process.kill()
        self.process.wait(10)


@pytest.fixture
def private_redis():
    server = PrivateRedis()
    yield server
    server.kill()


def test_redis_tier_is_shared_between_proxies_and_sets_the_ttl(ollama, shared_redis):
    client, url = shared_redis
    with running_proxy(ollama.url, CACHE="on", REDIS_URL=url, CACHE_TTL=600) as first, \
            running_proxy(ollama.url, CACHE="on", REDIS_URL=url) as second:
        assert first.messages(request_body())[1]["x-cache"] == "MISS"
        keys = client.keys("simple_api_proxy:v2:*")
        assert len(keys) == 1 and 590 <= client.ttl(keys[0]) <= 600
        stored = json.loads(client.get(keys[0]))
        assert stored["v"] == proxy.CACHE_ENTRY_VERSION
        assert stored["message"]["content"][0]["text"] == "Hello! I am the stand-in model."
        status, headers, raw = second.stream(request_body())
        assert headers["x-cache"] == "HIT" and len(ollama.chats()) == 1
        assert_valid_stream(parse_sse(raw))
        health = second.json("GET", "/health")[2]["cache"]["redis"]
        assert health["state"] == "up" and health["hits"] == 1 and health["db_keys"] == 1
        assert "127.0.0.1:6379" in health["url"]


def test_sdk_stream_accumulator_parses_a_replayed_hit(ollama, shared_redis):
    anthropic = anthropic_module()
    client_redis, url = shared_redis
    tools = [{"name": "Bash", "input_schema": {"type": "object"}}]
    ollama.script(tool_reply(("Bash", {"command": "ls"}), text="Listing."))
    with running_proxy(ollama.url, CACHE="on", REDIS_URL=url) as gateway:
        client = anthropic.Anthropic(base_url=gateway.url, api_key="dummy", max_retries=0)
        finals = []
        for _ in range(2):
            with client.messages.stream(model="claude-opus-5-5", max_tokens=100, tools=tools,
                                        messages=[{"role": "user", "content": "ls"}]) as stream:
                finals.append(stream.get_final_message())
    assert len(ollama.chats()) == 1
    miss, hit = finals
    assert hit.id != miss.id and hit.stop_reason == "tool_use"
    assert [b.model_dump(exclude={"id"}) for b in hit.content] == [b.model_dump(exclude={"id"}) for b in miss.content]
    assert hit.content[1].id != miss.content[1].id  # each replay's tool_use ids are its own


def test_redis_killed_mid_traffic_costs_nothing_and_comes_back(ollama, private_redis):
    url = f"redis://127.0.0.1:{private_redis.port}/0"
    with running_proxy(ollama.url, CACHE="on", REDIS_URL=url) as gateway:
        results = []
        for index in range(60):
            if index == 20:
                private_redis.kill()
            started = time.monotonic()
            status, headers, _ = gateway.messages(request_body(f"question {index % 30}"))
            results.append((status, time.monotonic() - started, headers.get("x-cache")))
        assert all(status == 200 for status, _, _ in results)
        assert max(elapsed for _, elapsed, _ in results) < 1.0
        assert [cache for _, _, cache in results[30:40]] == ["HIT"] * 10  # memory tier still serves
        health = gateway.json("GET", "/health")[2]["cache"]["redis"]
        assert health["state"] == "down" and "Error" in health["last_error"]

        private_redis.start()
        deadline = time.monotonic() + 10
        while gateway.json("GET", "/health")[2]["cache"]["redis"]["state"] != "up":
            assert time.monotonic() < deadline, "Redis writes did not resume within 10 s"
            time.sleep(0.2)
        gateway.messages(request_body("after the restart"))
        client = redis_module().Redis(host="127.0.0.1", port=private_redis.port)
        assert len(client.keys("simple_api_proxy:v2:*")) == 1


def test_proxy_runs_without_redis_py(ollama, tmp_path):
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['redis'] = None\n")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(tmp_path), API_PORT=str(port), OLLAMA_HOST=ollama.url,
               REDIS_URL="redis://127.0.0.1:6379/13", LOG_FILE="")
    process = subprocess.Popen([sys.executable, str(HERE / "simple_api_proxy.py")], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        gateway = Proxy.__new__(Proxy)
        gateway.port, gateway.url = port, f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                if gateway.call("GET", "/")[0] == 200:
                    break
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        health = gateway.json("GET", "/health")[2]["cache"]
        assert health["redis"]["state"] == "disabled" and "redis-py is not installed" in health["redis"]["reason"]
        assert gateway.messages(request_body())[1]["x-cache"] == "MISS"
        assert gateway.messages(request_body())[1]["x-cache"] == "HIT"
    finally:
        process.terminate()
        output = process.communicate(timeout=15)[0]
    assert process.returncode == 0, output
    assert "redis-py is not installed" in output


###############################################################################
# Several Ollama hosts and warm-up
###############################################################################

def wait_for(condition, what, timeout=15):
    """Poll a condition the proxy reaches by itself (a background check, a request arriving)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Gate:
    """A stand-in responder that holds every generation until opened."""

    def __init__(self):
        self.opened = threading.Event()

    def __call__(self, body):
        self.opened.wait(20)
        return text_reply()


@pytest.fixture
def hosts():
    """Two stand-in Ollama servers with the same models; a test may stop and restart them."""
    made = [StandInOllama(), StandInOllama()]
    yield made
    for host in made:
        host.stop()


def host_list(hosts):
    return ",".join(host.url for host in hosts)


def restarted(host):
    """The same Ollama back on the same port, as after a reboot."""
    return StandInOllama(models=host.models, port=host.port)


@pytest.fixture
def fast_recheck(monkeypatch):
    monkeypatch.setattr(proxy.UpstreamPool, "RECHECK_SECONDS", 0.05)


def test_ollama_host_lists_several_hosts(capsys):
    settings = config(OLLAMA_HOST="gpu-a, gpu-b:11500 ,https://gpu-c")
    assert [h.url for h in settings.ollama_hosts] == ["http://gpu-a:11434", "http://gpu-b:11500",
                                                      "https://gpu-c:443"]
    assert settings.ollama_warmup == "on"
    for value, message in (("gpu-a,gpu-a:11434", "more than once"), (" , ", "OLLAMA_HOST is empty")):
        with pytest.raises(SystemExit):
            proxy.load_config([], {"OLLAMA_HOST": value})
        assert message in capsys.readouterr().err
    assert config(OLLAMA_WARMUP="ALL").ollama_warmup == "all" and config(OLLAMA_WARMUP="0").ollama_warmup == "off"
    with pytest.raises(SystemExit):
        proxy.load_config([], {"OLLAMA_WARMUP": "later"})
    assert "on, off or all" in capsys.readouterr().err


def test_concurrent_generations_spread_over_the_hosts(hosts):
    gate = Gate()
    for host in hosts:
        host.responder = gate
    with running_proxy(host_list(hosts)) as gateway:
        results = queue.Queue()
        threads = [threading.Thread(target=lambda n=n: results.put(gateway.messages(request_body(f"task {n}"))[0]))
                   for n in range(4)]
        for thread in threads:
            thread.start()
        wait_for(lambda: sum(len(host.chats()) for host in hosts) == 4, "4 generations upstream")
        assert [len(host.chats()) for host in hosts] == [2, 2]
        health = gateway.json("GET", "/health")[2]
        assert [h["in_flight"] for h in health["ollama"]["hosts"]] == [2, 2]
        gate.opened.set()
        for thread in threads:
            thread.join(20)
        assert [results.get() for _ in threads] == [200] * 4
        wait_for(lambda: [h.in_flight for h in gateway.server.ollama.hosts] == [0, 0], "the generations to end")


@pytest.mark.parametrize("stream", [False, True])
def test_a_host_that_fails_before_answering_costs_no_request(hosts, stream):
    first, second = hosts
    with running_proxy(host_list(hosts)) as gateway:
        pool = gateway.server.ollama

        def first_host_next():
            # Both hosts idle: the tie goes to the first, marked up again so that it is tried.
            pool.hosts[0].up, pool._turn = True, 0

        # The first host dies as it is asked (reset, or closed), then does not listen at all.
        drops = itertools.cycle(["reset", "close"])
        first.responder = lambda body: Reply(drop=next(drops))
        for n in range(3):
            if n == 2:
                first.stop()
            first_host_next()
            body = request_body(f"question {n}")
            if stream:
                status, _, raw = gateway.stream(body)
                assert status == 200
                assert_valid_stream(parse_sse(raw))
            else:
                status, _, answer = gateway.messages(body)
                assert status == 200 and answer["content"][0]["text"] == "Hello! I am the stand-in model."
        for n in range(2):  # down: not tried until it is back
            assert gateway.call("POST", "/v1/messages", request_body(f"again {n}", stream=stream))[0] == 200
        assert len(second.chats()) == 5
        assert not pool.hosts[0].up and "cannot reach Ollama" in pool.hosts[0].last_error
        assert pool.hosts[0].errors["refused"] >= 1 and pool.hosts[0].errors["reset"] + pool.hosts[0].errors["closed"] >= 2
        wait_for(lambda: [host.in_flight for host in pool.hosts] == [0, 0], "the generations to end")


def test_when_every_host_fails_the_error_names_each_of_them(hosts):
    for host in hosts:
        host.responder = lambda body: Reply(drop="reset")
    with running_proxy(host_list(hosts)) as gateway:
        status, _, error = gateway.messages(request_body())
        assert status == 502 and "none of the 2 Ollama hosts" in error["error"]["message"], error
        assert all(host.url in error["error"]["message"] for host in hosts)
        for host in hosts:
            host.stop()
        status, _, error = gateway.json("GET", "/v1/models")
        assert status == 502 and all(host.url in error["error"]["message"] for host in hosts), error
        wait_for(lambda: gateway.server.in_flight == 0, "the generation slot to be freed")


def test_a_hung_host_marked_down_does_not_hold_up_the_model_list(ollama, monkeypatch):
    monkeypatch.setattr(proxy.UpstreamPool, "RECHECK_SECONDS", 3600)  # no re-check during the test
    hung, accepted = socket.socket(), []
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)  # takes connections, never answers: a frozen box

    def take():
        with contextlib.suppress(OSError):
            while True:
                accepted.append(hung.accept()[0])

    threading.Thread(target=take, daemon=True).start()
    try:
        with running_proxy(f"http://127.0.0.1:{hung.getsockname()[1]},{ollama.url}", OLLAMA_TIMEOUT=1) as gateway:
            pool = gateway.server.ollama
            wait_for(lambda: not pool.hosts[0].up, "the start-up check to mark the hung host down")
            asked = len(accepted)
            status, _, body = gateway.json("GET", "/v1/models")
            assert status == 200 and MODEL in [model["id"] for model in body["data"]]
            assert len(accepted) == asked, "the hung host was asked again"
    finally:
        hung.close()
        for connection in accepted:
            connection.close()


def test_a_stream_committed_while_waiting_still_moves_to_another_host(hosts):
    first, second = hosts
    # Silent past FAIL_FAST_SECONDS (the client already has message_start and a ping), then gone.
    first.responder = lambda body: Reply(delay_before=proxy.ProxyHandler.FAIL_FAST_SECONDS + 0.5, drop="reset")
    with running_proxy(host_list(hosts)) as gateway:
        gateway.server.ollama._turn = 0  # both idle: the first host is tried first
        status, _, raw = gateway.stream(request_body())
    events = parse_sse(raw)
    assert status == 200 and [name for name, _ in events].count("message_start") == 1
    assert_valid_stream(events)
    text = "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")
    assert text == "Hello! I am the stand-in model." and first.chats() and len(second.chats()) == 1


def test_once_the_answer_started_there_is_no_second_host(hosts):
    with running_proxy(host_list(hosts)) as gateway:
        hosts[0].script(Reply([chunk(content="Hel"), ("cut",)]))
        hosts[1].script(Reply([chunk(content="Hel"), ("cut",)]))
        status, _, raw = gateway.stream(request_body())
        assert status == 200 and parse_sse(raw)[-1][0] == "error"
        assert sum(len(host.chats()) for host in hosts) == 1


def test_a_host_that_comes_back_is_warmed_up_and_used_again(hosts, fast_recheck):
    first, second = hosts
    first.stop()
    with running_proxy(host_list(hosts), OLLAMA_WARMUP="on", OLLAMA_NUM_CTX=8192) as gateway:
        pool = gateway.server.ollama.hosts
        wait_for(lambda: not pool[0].up, "the stopped host to be marked down")
        assert gateway.messages(request_body())[0] == 200 and len(second.chats()) == 1
        back = restarted(first)
        try:
            wait_for(lambda: pool[0].up, "the host to be back")
            wait_for(lambda: back.loads(), "the warm-up of the host that came back")
            assert back.loads()[0]["options"] == {"num_ctx": 8192}
            for n in range(2):  # two idle hosts: the tie rotates
                assert gateway.messages(request_body(f"new conversation {n}"))[0] == 200
            assert len(back.chats()) == 1 and len(second.chats()) == 2
        finally:
            back.stop()


def test_each_model_goes_to_a_host_that_has_it():
    coder = StandInOllama(models={MODEL: ["completion", "tools"]})
    small = StandInOllama(models={"llama3.2:3b": ["completion", "tools"]})
    try:
        with running_proxy(host_list([coder, small]), MODEL_MAP="haiku=llama3.2:3b") as gateway:
            for n in range(3):
                assert gateway.messages(request_body(f"code {n}"))[0] == 200
                assert gateway.messages(request_body(f"chat {n}", model="claude-haiku-4-5"))[0] == 200
            assert [c["model"] for c in coder.chats()] == [MODEL] * 3
            assert [c["model"] for c in small.chats()] == ["llama3.2:3b"] * 3
            status, _, body = gateway.messages(request_body(model="mistral:7b"))
            message = body["error"]["message"]
            assert status == 404 and body["error"]["type"] == "not_found_error"
            assert f"{coder.url}: {MODEL}" in message and f"{small.url}: llama3.2:3b" in message
            assert "ollama pull mistral:7b" in message
            models = gateway.json("GET", "/v1/models")[2]
            assert [m["id"] for m in models["data"]] == [MODEL, "llama3.2:3b"]
            assert gateway.json("GET", "/v1/models/llama3.2:3b")[0] == 200
    finally:
        coder.stop()
        small.stop()


def test_a_conversation_stays_on_its_host_while_that_host_is_not_busier(hosts):
    system = "You are a coding assistant."

    def turns(host):
        return sum(1 for chat in host.chats() if chat["messages"][0]["content"] == system)

    with running_proxy(host_list(hosts)) as gateway:
        messages = [{"role": "user", "content": "Fix the bug in app.py"}]

        def next_turn():
            status, _, answer = gateway.messages(request_body(system=system, messages=messages))
            assert status == 200
            messages.extend([{"role": "assistant", "content": answer["content"]},
                             {"role": "user", "content": f"and now step {len(messages)}"}])

        for _ in range(4):  # idle hosts would take turns; the conversation does not move
            next_turn()
            # The host counts a generation until just after its answer left: the next turn comes later.
            wait_for(lambda: not any(host.in_flight for host in gateway.server.ollama.hosts), "the generation to end")
        home = 0 if turns(hosts[0]) else 1
        assert turns(hosts[home]) == 4 and turns(hosts[1 - home]) == 0
        gate = Gate()
        for host in hosts:
            host.responder = gate
        threads = []

        def in_background(target, total):
            threads.append(threading.Thread(target=target))
            threads[-1].start()
            wait_for(lambda: sum(len(host.chats()) for host in hosts) == total, f"{total} generations upstream")

        try:
            for n in range(2):  # one other generation on each host
                in_background(lambda n=n: gateway.messages(request_body(f"other {n}")), 5 + n)
            in_background(next_turn, 7)  # home not busier (1 and 1): the turn stays
            assert turns(hosts[home]) == 5
            in_background(lambda: gateway.messages(request_body("one more")), 8)  # to the idler host
            in_background(next_turn, 9)  # 2 and 2: stays
            assert turns(hosts[home]) == 6
            in_background(next_turn, 10)  # home busier (3 and 2): the turn moves
            assert turns(hosts[home]) == 6 and turns(hosts[1 - home]) == 1
        finally:
            gate.opened.set()
            for thread in threads:
                thread.join(20)


def test_health_lists_each_host_and_is_200_while_one_serves_the_default_model(hosts):
    first, second = hosts
    with running_proxy(host_list(hosts), OLLAMA_WARMUP="on", OLLAMA_NUM_CTX=16384) as gateway:
        wait_for(lambda: first.loads() and second.loads(), "the warm-up of both hosts")
        status, _, body = gateway.json("GET", "/health")
        assert status == 200 and body["ollama"]["reachable"] and body["ollama"]["default_model_installed"]
        for report, host in zip(body["ollama"]["hosts"], hosts):
            assert report["url"] == host.url and report["reachable"] and report["version"] == "0.33.0"
            assert MODEL in report["models"] and report["in_flight"] == 0 and report["up"]
            assert report["default_model_loaded"] is True
            assert report["loaded"][0]["name"] == MODEL and report["loaded"][0]["context_length"] == 16384
        first.stop()
        status, _, body = gateway.json("GET", "/health")
        down, up = body["ollama"]["hosts"]
        assert status == 200 and not down["reachable"] and not down["up"]
        assert "cannot reach Ollama" in down["error"] and down["last_error"] and up["reachable"]
        second.models = {"llama3.2:3b": ["completion"]}  # the default model gone from the last host
        status, _, body = gateway.json("GET", "/health")
        assert status == 503 and body["status"] == "degraded"
        second.stop()
        status, _, body = gateway.json("GET", "/health")
        assert status == 503 and body["ollama"]["reachable"] is False and "no Ollama host" in body["ollama"]["error"]
        assert gateway.json("GET", "/v1/models")[0] == 502


def test_warm_up_never_delays_start_up_and_loads_the_models_asked_for(ollama):
    ollama.load_gate = threading.Event()  # a model load that takes its time
    try:
        with running_proxy(ollama.url, OLLAMA_WARMUP="all", OLLAMA_NUM_CTX=12288, OLLAMA_KEEP_ALIVE="30m",
                           MODEL_MAP="haiku=llama3.2:3b") as gateway:
            status, _, body = gateway.json("GET", "/health")
            assert status == 200 and body["ollama"]["default_model_loaded"] is False
            assert gateway.messages(request_body())[0] == 200
            ollama.load_gate.set()
            wait_for(lambda: len(ollama.loads()) == 2, "both loads")
            assert ollama.loads() == [{"model": model, "messages": [], "stream": False, "keep_alive": "30m",
                                       "options": {"num_ctx": 12288}} for model in (MODEL, "llama3.2:3b")]
            assert gateway.json("GET", "/health")[2]["ollama"]["default_model_loaded"] is True
    finally:
        ollama.load_gate.set()
    with running_proxy(ollama.url) as gateway:  # OLLAMA_WARMUP=off
        assert gateway.messages(request_body())[0] == 200
    assert len(ollama.loads()) == 2


###############################################################################
# Metrics
###############################################################################

def scrape(gateway, headers=None, busy=0):
    """GET /metrics parsed by Prometheus' own parser: {(name, sorted labels): value}."""
    try:
        from prometheus_client import parser
    except ImportError:
        parser = None
    need(parser is not None, "prometheus_client is not installed (pip install prometheus_client)")
    # A request is counted once answered: after its last byte has left.
    wait_for(lambda: gateway.server.active_requests == busy, "the requests to be counted")
    status, response_headers, raw = gateway.call("GET", "/metrics", headers=headers)
    assert status == 200 and response_headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {}
    for family in parser.text_string_to_metric_families(raw.decode()):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def sample(samples, name, **labels):
    return samples.get(("simple_api_proxy_" + name, tuple(sorted(labels.items()))), 0)


def test_metrics_count_known_traffic(ollama):
    with running_proxy(ollama.url, CACHE="on") as gateway:
        for _ in range(2):  # a miss, then a hit
            assert gateway.messages(request_body("count me"))[0] == 200
        assert gateway.stream(request_body("stream me"))[0] == 200
        assert gateway.messages(request_body(model="mistral:7b"))[0] == 404
        assert gateway.call("GET", "/nowhere")[0] == 404
        gate = Gate()
        ollama.responder = gate
        waiting = threading.Thread(target=gateway.messages, args=(request_body("held"),))
        waiting.start()
        wait_for(lambda: len(ollama.chats()) == 3, "the held generation upstream")
        during = scrape(gateway, busy=1)
        gate.opened.set()
        waiting.join(20)
        wait_for(lambda: gateway.server.in_flight == 0, "the generation to end")
        after = scrape(gateway)
    assert sample(during, "in_flight") == 1 and sample(after, "in_flight") == 0
    assert sample(after, "requests_total", route="messages", status="200", model=MODEL) == 4
    assert sample(after, "requests_total", route="messages", status="404", model="other") == 1
    assert sample(after, "requests_total", route="unknown", status="404", model="none") == 1
    assert sample(after, "requests_total", route="metrics", status="200", model="none") == 1
    assert sample(after, "request_duration_seconds_count", route="messages") == 5
    assert sample(after, "request_duration_seconds_bucket", route="messages", le="+Inf") == 5
    assert sample(after, "time_to_first_token_seconds_count") == 3  # the generations, not the hit
    assert sample(after, "cache_lookups_total", tier="memory", result="hit") == 1
    assert sample(after, "cache_lookups_total", tier="memory", result="miss") == 4  # the 404 looked too
    # The stand-in reports 26 prompt tokens and one output token per word, for each generation.
    assert sample(after, "tokens_total", direction="input") == 3 * 26
    assert sample(after, "tokens_total", direction="output") == 3 * 6
    assert sample(after, "upstream_up", host=ollama.url) == 1


def test_metrics_count_tool_calls_recovered_from_text(gateway, ollama):
    tools = [{"name": "Bash", "input_schema": {"type": "object"}}]
    ollama.script(Reply([chunk(content='{"name": "Bash", "arguments": {"command": "ls"}}'), final_chunk()]),
                  tool_reply(("Bash", {"command": "pwd"})))  # a structured call: not counted
    for n in range(2):
        status, _, message = gateway.messages(request_body(f"run {n}", tools=tools))
        assert status == 200 and message["stop_reason"] == "tool_use"
    assert sample(scrape(gateway), "tool_calls_from_text_total") == 1


def test_metrics_need_the_api_key_and_count_upstream_failures(hosts):
    with running_proxy(host_list(hosts), PROXY_API_KEY="s3cret") as gateway:
        assert gateway.call("GET", "/metrics")[0] == 401
        key = {"x-api-key": "s3cret"}
        hosts[0].stop()
        gateway.server.ollama._turn = 0  # both idle: the first host is tried first
        assert gateway.messages(request_body(), headers=key)[0] == 200
        samples = scrape(gateway, {"authorization": "Bearer s3cret"})
    assert sample(samples, "upstream_up", host=hosts[0].url) == 0
    assert sample(samples, "upstream_up", host=hosts[1].url) == 1
    # refused, or closed if the start-up check met the host as it stopped
    assert sum(sample(samples, "upstream_errors_total", host=hosts[0].url, kind=kind)
               for kind in ("refused", "closed", "reset")) >= 1
    assert sample(samples, "requests_total", route="messages", status="200", model=MODEL) == 1


def test_metrics_count_529s_by_limit(ollama):
    ollama.responder = gate = Gate()
    with running_proxy(ollama.url, MAX_CONCURRENT=1) as gateway:
        held = threading.Thread(target=gateway.messages, args=(request_body("first"),))
        held.start()
        wait_for(lambda: ollama.chats(), "the first generation upstream")
        assert gateway.messages(request_body("second"))[0] == 529
        gate.opened.set()
        held.join(20)
        samples = scrape(gateway)
    assert sample(samples, "overloaded_total", limit="generations") == 1
    assert sample(samples, "requests_total", route="messages", status="529", model=MODEL) == 1


###############################################################################
# Tool calls a model writes as text
###############################################################################

TOOLS = ["Bash", "Write"]
BASH_CALL = '{"name": "Bash", "arguments": {"command": "ls -la"}}'


def text_calls(text, tools):
    """What find_text_tool_calls, as the stream translator calls it, finds in a whole reply:
    (the prose before the calls, the calls), or None. tools: {name: input_schema}, or bare names."""
    found = proxy.find_text_tool_calls(text, proxy.offered_tools(tools))
    return (text[:found[0]].strip(), found[1]) if found else None


def stream_text(text, piece=3, **options):
    """Feed text to a translator a few characters at a time, as a model streams it."""
    options.setdefault("tool_names", TOOLS)
    chunks = [chunk(content=text[i:i + piece]) for i in range(0, len(text), piece)] + [final_chunk()]
    return translate(chunks, **options)


@pytest.mark.parametrize("text, calls", [
    (BASH_CALL, [("Bash", {"command": "ls -la"})]),
    ('{"name": "Bash", "parameters": {"command": "ls -la"}}', [("Bash", {"command": "ls -la"})]),
    ('\n```json\n' + BASH_CALL + '\n```\n', [("Bash", {"command": "ls -la"})]),
    ('```\n' + BASH_CALL + '\n```', [("Bash", {"command": "ls -la"})]),
    ('<tool_call>\n' + BASH_CALL + '\n</tool_call>', [("Bash", {"command": "ls -la"})]),
    ('<tool_call>' + BASH_CALL + '</tool_call>\n<tool_call>{"name": "Write", "arguments": '
     '{"file_path": "a.txt", "content": "hi"}}</tool_call>',
     [("Bash", {"command": "ls -la"}), ("Write", {"file_path": "a.txt", "content": "hi"})]),
    (BASH_CALL + "\n" + BASH_CALL, [("Bash", {"command": "ls -la"})] * 2),
    ('{"name": "Bash", "arguments": "{\\"command\\": \\"ls -la\\"}"}', [("Bash", {"command": "ls -la"})]),
])
def test_text_tool_call_shapes_become_tool_use(text, calls):
    events, translator = stream_text(text)
    assert_valid_stream(events)
    message = translator.message
    assert message["stop_reason"] == "tool_use"
    assert [(b["name"], b["input"]) for b in message["content"]] == calls
    assert all(b["type"] == "tool_use" for b in message["content"])


def test_prose_then_tagged_call_keeps_the_prose_as_text():
    events, translator = stream_text("I will list the files.\n<tool_call>" + BASH_CALL + "</tool_call>")
    assert_valid_stream(events)
    text, call = translator.message["content"]
    assert text["text"].strip() == "I will list the files." and call["name"] == "Bash"
    first_delta = next(i for i, (n, _) in enumerate(events) if n == "content_block_delta")
    assert first_delta < len(events) - 6  # the prose streamed before the call was complete


@pytest.mark.parametrize("text, options", [
    ('{"name": "Deploy", "arguments": {"env": "prod"}}', {}),
    ('Here is an example:\n```json\n' + BASH_CALL + '\n```\nThat is how the tool is called.', {}),
    ('```python\nprint({"name": "Bash"})\n```', {}),
    (BASH_CALL, {"tool_names": []}),
    (BASH_CALL, {"recover_tool_calls": False}),
    ('{"name": "Bash", "arguments": {"command": "ls"}, "note": "extra keys mean data, not a call"}', {}),
    ('{"name": "Bash", "arguments": {"command": "ls"}} and then some words', {}),
    ('<tool_call>{"name": "Bash", "arguments": {"command"</tool_call>', {}),
    ('{"name": ["Bash"], "arguments": {}}', {}),
])
def test_near_misses_stay_text(text, options):
    events, translator = stream_text(text, **options)
    assert_valid_stream(events)
    assert translator.message["content"] == [{"type": "text", "text": text}]
    assert translator.message["stop_reason"] == "end_turn"


def test_plain_answer_streams_token_by_token_when_tools_are_offered():
    text = "Sure, the files are listed below with their sizes."
    events, translator = stream_text(text, piece=5)
    deltas = [d["delta"]["text"] for n, d in events if n == "content_block_delta"]
    assert len(deltas) >= 9 and "".join(deltas) == text


def test_json_answer_that_is_not_a_call_is_released_at_the_end():
    events, translator = stream_text('{"status": "ok", "count": 3}')
    assert translator.message["content"] == [{"type": "text", "text": '{"status": "ok", "count": 3}'}]


def test_text_tool_call_through_the_proxy_streaming_and_not(gateway, ollama):
    tools = [{"name": "Bash", "input_schema": {"type": "object"}}]
    pieces = ['{"name": "Ba', 'sh", "argum', 'ents": {"command": "echo hi"}}']
    for stream in (False, True):
        ollama.script(Reply([chunk(content=p) for p in pieces] + [final_chunk()]))
        status, _, raw = gateway.call("POST", "/v1/messages", request_body(tools=tools, stream=stream))
        if stream:
            events = parse_sse(raw)
            assert_valid_stream(events)
            assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
            deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
            assert [json.loads(d["partial_json"]) for d in deltas] == [{"command": "echo hi"}]
        else:
            message = json.loads(raw)
            assert message["stop_reason"] == "tool_use" and message["content"][0]["input"] == {"command": "echo hi"}


def test_text_tool_call_recovery_can_be_turned_off(ollama):
    ollama.script(Reply([chunk(content=BASH_CALL), final_chunk()]))
    with running_proxy(ollama.url, TOOL_CALL_RECOVERY="off") as gateway:
        status, _, message = gateway.messages(request_body(tools=[{"name": "Bash", "input_schema": {"type": "object"}}]))
    assert message["content"] == [{"type": "text", "text": BASH_CALL}] and message["stop_reason"] == "end_turn"


# A corpus of replies real models wrote, quoted from public threads (repository#issue), with the
# tools those threads offered (minimal schemas) and what the reply must become: its calls, or
# TEXT. Abridged only where marked.

TEXT = "text"


def tools(**offered):
    """Offered tools, each given as {property: JSON type}."""
    return {name: {"type": "object", "properties": {key: {"type": kind} for key, kind in properties.items()}}
            for name, properties in offered.items()}


class Written:
    def __init__(self, source, model, offered, text, expected):
        self.source, self.model, self.tools, self.text, self.expected = source, model, offered, text, expected

    def __repr__(self):
        return f"{self.source} {self.model}"


WEATHER = tools(get_weather={"location": "string"})
CORPUS = [
    # Qwen3-Coder's XML, with or without <tool_call>, after a preamble or not
    Written("ollama/ollama#14745", "qwen3.5:9b", tools(bash={"command": "string", "description": "string"}),
            "I need to mock Valkey for tests. Let me check how the app initializes Valkey and update TESTING.md "
            "with this information.\n<tool_call>\n<function=bash>\n<parameter=command>\ngrep \"redacted\" | head -20"
            "\n</parameter>\n<parameter=description>\nFind Valkey initialization\n</parameter>\n</function>\n"
            "</tool_call>",
            [("bash", {"command": 'grep "redacted" | head -20', "description": "Find Valkey initialization"})]),
    Written("ggml-org/llama.cpp#15012", "Qwen3-Coder-30B-A3B", tools(get_current_weather={"location": "string"}),
            "<tool_call>\n<function=get_current_weather>\n<parameter=location>\nTokyo, Japan\n</parameter>\n"
            "</function>\n</tool_call>",
            [("get_current_weather", {"location": "Tokyo, Japan"})]),
    Written("ggml-org/llama.cpp#15012", "Qwen3-Coder-30B-A3B", tools(get_current_weather={"location": "string"}),
            "I need to check the weather for Tokyo and Paris as well. Let me get that information for you.\n\n"
            "<tool_call>\n<function=get_current_weather>\n<parameter=location>\nTokyo, Japan\n</parameter>\n"
            "</function>\n</tool_call> ",
            [("get_current_weather", {"location": "Tokyo, Japan"})]),
    Written("ggml-org/llama.cpp#22878", "Qwen3.6-27B", tools(read={"path": "string"}),
            "\n<tool_call>\n<function=read>\n<parameter=path>\n/home/ps/workspace/docker/aichat/openclaw/.openclaw/"
            "workspace/USER.md\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=read>\n"
            "<parameter=path>\n/home/ps/workspace/docker/aichat/openclaw/.openclaw/workspace/MEMORY.md\n"
            "</parameter>\n</function>\n</tool_call>",
            [("read", {"path": "/home/ps/workspace/docker/aichat/openclaw/.openclaw/workspace/USER.md"}),
             ("read", {"path": "/home/ps/workspace/docker/aichat/openclaw/.openclaw/workspace/MEMORY.md"})]),
    Written("continuedev/continue#13057", "qwen3-coder:30b",
            tools(create_new_file={"filepath": "string", "contents": "string"}),
            "I'll create a file called test.txt with the content \"hello\".\n\n<function=create_new_file>\n"
            "<parameter=filepath> test.txt\n<parameter=contents> hello\n",
            [("create_new_file", {"filepath": " test.txt", "contents": " hello"})]),  # Qwen keeps the spaces
    Written("ZolOnTheNet/agentichat FEATURE_QWEN3_XML_SUPPORT.md", "Qwen3-Coder-30B-A3B-Instruct",
            tools(list_files={"path": "string"}),
            "Je vais analyser le programme dans le répertoire courant.\n<tool_call>\n<function=list_files>\n"
            "<parameter=path>\n.\n</parameter>\n</function>\n</tool_call>",
            [("list_files", {"path": "."})]),
    Written("waybarrios/vllm-mlx#63", "Qwen3-Coder", tools(search={"query": "array"}),
            "<tool_call>\n<function=search>\n<parameter=query>['python', 'tutorial']</parameter>\n</function>\n"
            "</tool_call>",
            [("search", {"query": ["python", "tutorial"]})]),
    Written("waybarrios/vllm-mlx#63", "Qwen3-Coder", tools(config={"settings": "object"}),
            "<tool_call>\n<function=config>\n<parameter=settings>{'theme': 'dark', 'size': 14}</parameter>\n"
            "</function>\n</tool_call>",
            [("config", {"settings": {"theme": "dark", "size": 14}})]),
    # JSON: bare, fenced (also on the fence's own line), wrapped, nested, other argument keys
    Written("ollama/ollama#12174", "qwen2.5-coder:14b", tools(calculator={"expr": "string"}),
            '{"name": "calculator", "arguments": {"expr": "17 * 23"}}',
            [("calculator", {"expr": "17 * 23"})]),
    Written("openai/codex#2229", "qwen2.5-coder:14b", tools(shell={"command": "array"}),
            '{"name": "shell", "arguments": {"command": ["ls"]}}',
            [("shell", {"command": ["ls"]})]),
    Written("anomalyco/opencode#46625", "qwen2.5-coder:7b", tools(glob={"pattern": "string"}),
            '{"name":"glob","arguments":{"pattern":"*"}}',
            [("glob", {"pattern": "*"})]),
    Written("anomalyco/opencode#10402", "qwen2.5-coder", tools(write={"content": "string", "filePath": "string"}),
            '{"name": "write", "arguments": {"content": "hello\\n", "filePath": "/C:/Code/SimpleTester/todo.md"}}',
            [("write", {"content": "hello\n", "filePath": "/C:/Code/SimpleTester/todo.md"})]),
    Written("anomalyco/opencode#590", "qwen2.5-coder:7b", tools(write={"filePath": "string", "content": "string"}),
            '{\n\t"name": "write",\n\t"arguments": {\n\t\t"filename": "README.md",\n\t\t"content": "<fileContent>"'
            '\n\t}\n}',
            [("write", {"filename": "README.md", "content": "<fileContent>"})]),
    Written("NousResearch/hermes-agent#5867", "qwen2.5-coder:14b", tools(search={"query": "string"}),
            '{"name": "search", "arguments": {"query": "北京今天的天气"}}',
            [("search", {"query": "北京今天的天气"})]),
    Written("NousResearch/hermes-agent#107125", "qwen2.5:32b-instruct", tools(terminal={"command": "string"}),
            '{"name": "terminal", "arguments": {"command": "echo ..."}}',
            [("terminal", {"command": "echo ..."})]),
    Written("jundot/omlx#1153", "Llama-4-Scout-17B-16E-Instruct", WEATHER,
            '{"name": "get_weather", "parameters": {"location": "Paris"}}',
            [("get_weather", {"location": "Paris"})]),
    Written("raullenchai/Rapid-MLX#700", "Meta-Llama-3.1-8B-Instruct", tools(web_search={"query": "string"}),
            '{"name": "web_search", "parameters": {"query": "你好"}}',
            [("web_search", {"query": "你好"})]),
    Written("vllm-project/vllm#46863 (closing braces restored)", "Llama-4-Scout-17B-16E-Instruct-FP8",
            tools(Bash={"command": "string", "timeout": "number"}),
            '{"type": "function", "name": "Bash", "parameters": {"command": "echo hello", "timeout": 12000}}',
            [("Bash", {"command": "echo hello", "timeout": 12000})]),
    Written("vllm-project/vllm#11786", "llama-3.2-11b-vision-instruct", tools(get_current_traffic={"location": "string"}),
            '{"type": "function", "function": {"name": "get_current_traffic", "parameters": {"location": "Sydney"}}}',
            [("get_current_traffic", {"location": "Sydney"})]),
    Written("ggml-org/llama.cpp#14697", "devstral", tools(file_view={"path": "string", "view_range": "array"}),
            '{\n  "tool_calls": [\n    {\n      "name": "file_view",\n      "arguments": {\n        "path": '
            '"src/util.rs",\n        "view_range": [\n          20,\n          40\n        ]\n      },\n      '
            '"id": "162875335"\n    }\n  ]\n}',
            [("file_view", {"path": "src/util.rs", "view_range": [20, 40]})]),
    Written("mistralai/mistral-common#73", "mistral-large-latest",
            tools(add_layer_to_map={"map_id": "string", "parameter": "string", "source": "string", "level": "string"}),
            '[{"name": "add_layer_to_map", "arguments": {"map_id": "map_0", "parameter": "WIND", "source": '
            '"AROME0.25", "level": "1000Hpa"}}, {"name": "add_layer_to_map", "arguments": {"map_id": "map_0", '
            '"parameter": "T", "source": "AROME0.25", "level": "1000Hpa"}}]',
            [("add_layer_to_map", {"map_id": "map_0", "parameter": "WIND", "source": "AROME0.25", "level": "1000Hpa"}),
             ("add_layer_to_map", {"map_id": "map_0", "parameter": "T", "source": "AROME0.25", "level": "1000Hpa"})]),
    Written("nicoalbanese/ai-sdk-fundamentals#4", "deepseek-coder-v2", tools(tellAJoke={"location": "string"}),
            '```json {"name":"tellAJoke","arguments":{"location":"San Francisco"}} ```',
            [("tellAJoke", {"location": "San Francisco"})]),
    Written("gpustack/llama-box#61", "qwen3-30b-a3b-instruct-2507", WEATHER,
            '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>',
            [("get_weather", {"location": "Paris"})]),
    Written("NousResearch/hermes-agent#107080", "gemma3nTools:e4b",
            tools(ha_call_service={"action": "string", "device_id": "string"}),
            '<tool_call>\n{"name": "ha_call_service", "args": {"action": "turn_off", "device_id": "light.salon"}}'
            '\n</tool_call>',
            [("ha_call_service", {"action": "turn_off", "device_id": "light.salon"})]),
    Written("webbrain-one/webbrain#2682", "not named (a browser agent's model)", tools(click={"text": "string"}),
            '{"name":"click","arguments":{"text":"Save"}}',
            [("click", {"text": "Save"})]),
    Written("webbrain-one/webbrain#2682", "not named (a browser agent's model)", tools(click={"text": "string"}),
            '{"name":"click","arguments":{"meta":{"source":"dialog"},"text":"Save {draft}"}}',
            [("click", {"meta": {"source": "dialog"}, "text": "Save {draft}"})]),
    # Llama's python markers, Gemma 4, Mistral, Anthropic-style XML
    Written("vllm-project/vllm#16214", "Llama 4", tools(brave_web_search={"query": "string"}),
            '<|python_start|>{"name": "brave_web_search", "parameters": {"query": "latest news"}}<|python_end|>',
            [("brave_web_search", {"query": "latest news"})]),
    Written("ggml-org/llama.cpp#22786", "gemma-4", tools(CommitMemoryTool={"memory": "string"}),
            "<|tool_call>call:CommitMemoryTool{memory:\"The user's name is John.\"}",
            [("CommitMemoryTool", {"memory": "The user's name is John."})]),
    Written("ml-explore/mlx-lm#1374", "Ministral-8B-Instruct-2410", tools(calculator={"expression": "string"}),
            '[TOOL_CALLS] [{"name": "calculator", "arguments": {"expression": "2+3"}}]',
            [("calculator", {"expression": "2+3"})]),
    Written("ml-explore/mlx-lm#1374", "Devstral-Small-2", tools(calculator={"expression": "string"}),
            '[TOOL_CALLS]calculator[ARGS]{"expression": "2+3"}',
            [("calculator", {"expression": "2+3"})]),
    Written("issue 12 of this project (thread not located)", "qwen3.5", tools(cronjob={"action": "string"}),
            '<function_calls><invoke name="cronjob"><parameter name="action">list</parameter></invoke>'
            '</function_calls>',
            [("cronjob", {"action": "list"})]),
    # Near misses and malformed calls: they stay text
    Written("ollama/ollama#11381", "qwen3:14b", tools(getApiFunctions={}, selectFunctions={"names": "array"}),
            '<tool_call>\n{"name": "create", "arguments": {"title": "test1", "content": "hello world!"}}\n</tool_call>',
            TEXT),  # names a tool the request did not offer
    Written("ggml-org/llama.cpp#15012", "Qwen3-Coder-30B-A3B", tools(get_current_weather={"location": "string"}),
            '{\n  "tool_calls": []\n}',
            TEXT),  # a wrapper with no call in it
    Written("ggml-org/llama.cpp#16710", "Qwen3-30B-A3B-Thinking", tools(read_file={"path": "string"}),
            '{\n    "name": "Bingo",\n    "age": 30\n}',
            TEXT),
    Written("ahwurm/localharness#105", "not named (local model)", tools(read_file={"path": "string"}),
            '```json\n{"name": "my-app", "version": "1.0.0"}\n```',
            TEXT),
    Written("ahwurm/localharness#105", "not named (local model)", tools(read_file={"path": "string"}),
            '```json\n[{"name": "alice", "age": 30}]\n```',
            TEXT),
    Written("ahwurm/localharness#105", "not named (local model)", tools(read_file={"path": "string"}),
            '```json\n{"expr": "sum(a, b)"}\n```',
            TEXT),
    Written("webbrain-one/webbrain#2682", "not named (a browser agent's model)", tools(click={"text": "string"}),
            'I will save it now.\n{"name":"click","arguments":{"text":"Save","meta":{"source":"dialog"}}}',
            TEXT),  # prose, then bare JSON
    Written("dnakov/anon-kode#23 (abridged)", "qwen2.5-coder:32b",
            tools(ReadNotebook={"notebook_path": "string"}, Edit={"file_path": "string"}),
            "To review the code in the specified file, you need to first read its contents.\n\nGiven your request, "
            "here is how you can call the ReadFile function to accomplish this:\n\n<function-name>ReadNotebook"
            "</function-name>\n<arguments>{\"notebook_path\": \"/src/Novaleaf.GodotDev/Game3d/Sprite3d/"
            "_sprite3d_scratch.cs\"}</arguments>\n\nHowever, note that ReadNotebook is meant for Jupyter notebook "
            "(.ipynb) files.",
            TEXT),
    Written("lmstudio-ai/lmstudio-bug-tracker#1592", "qwen3.5-35b-a3b", tools(web_search={"query": "string"}),
            "some models use `<function=...>`, others use `<tool_call>`",
            TEXT),
    Written("TheR1D/shell_gpt#509", "mistral:7b-instruct", tools(Bash={"command": "string"}),
            "```bash\nbrew update && brew cleanup\n```",
            TEXT),
    Written("dheerajcl/Shellsage#2", "deepseek-r1-abliterated:14b", tools(Bash={"command": "string"}),
            "To update all installed packages on Arch Linux, you can use the following command: \n\n**Command:**\n"
            "```bash\npacman -Syu\n```\n\nThis command updates the package list and upgrades any outdated packages. "
            "\n\n**Note:**  Make sure to run this command in your terminal to apply the updates. ",
            TEXT),
    Written("EKKOLearnAI/hermes-studio#942", "MiniMax-M2.7", tools(terminal={"command": "string"}),
            "[Calling tool: terminal with arguments: {“command”: “free -h && df -h / && nvidia-smi "
            "--query-gpu=utilization.gpu,utilization.memory,memory.used,memory.total --format=csv,noheader "
            "2>/dev/null || echo ‘no nvidia’”}]",
            TEXT),
    Written("EKKOLearnAI/hermes-studio#942", "MiniMax-M2.7",
            tools(search_files={"file_glob": "string", "path": "string", "pattern": "string"}),
            "[Calling tool: search_files]\n<parameter name=“file_glob”>*.tsx</parameter>\n<parameter name=“path”>"
            "/home/caoya/hermes-web-ui</parameter>\n<parameter name=“pattern”>tool_call|ToolCall|tool-call"
            "</parameter>\n</invoke>\n</minimax:tool_call>",
            TEXT),
    Written("matlab-deep-learning/llms-with-matlab#94", "mistral-nemo", tools(move={"target": "string"}),
            '[TOOL_CALLS]{"content": Movement complete}',
            TEXT),  # not JSON, and no call in it
]


def corpus_result(message):
    """A finished message as the corpus states outcomes: its calls, or TEXT."""
    calls = [(block["name"], block["input"]) for block in message["content"] if block["type"] == "tool_use"]
    return calls or TEXT


def chunkings(text):
    """The ways a model may stream text: by 1, 2, 3, 5 and 8 characters, word by word, all at once."""
    for size in (1, 2, 3, 5, 8):
        yield [text[i:i + size] for i in range(0, len(text), size)]
    yield re.findall(r"\s*\S+|\s+", text)
    yield [text]


@pytest.mark.parametrize("written", CORPUS, ids=repr)
def test_corpus_replies_become_what_they_are(written):
    parsed = text_calls(written.text, written.tools)
    assert ([(call["name"], call["input"]) for call in parsed[1]] if parsed else TEXT) == written.expected
    for pieces in chunkings(written.text):
        events, translator = translate([chunk(content=piece) for piece in pieces] + [final_chunk()],
                                       tool_names=written.tools)
        assert_valid_stream(events)
        message = translator.message
        assert corpus_result(message) == written.expected, pieces
        text = "".join(block["text"] for block in message["content"] if block["type"] == "text")
        if parsed:
            assert text.strip() == parsed[0] and message["stop_reason"] == "tool_use"
        else:
            assert text == written.text and message["stop_reason"] == "end_turn"


@pytest.mark.parametrize("text", [
    '{\n    "name": "Bingo",\n    "age": 30\n}',
    '```json\n{"name": "my-app", "version": "1.0.0", "private": true, "scripts": {"dev": "vite"}}\n```',
    '{"city": "Paris", "temperature": 21, "conditions": "sunny"}',
    '{"id": "chatcmpl-123", "object": "chat.completion", "choices": [{"message": {"content": "hi"}}]}',
    "```bash\nbrew update && brew cleanup\n```",
    "[1, 2, 3] are the first three numbers.",
    "I would call Bash to list the files, but I cannot run commands here.",
    '<tool_call>\n{"name": "create", "arguments": {"title": "test1"}}\n</tool_call>',
    '{\n  "tool_calls": []\n}',
    '{"tool_calls": [{"name": "Deploy", "arguments": {"env": "prod"}}]}',
])
def test_near_misses_stream_before_the_reply_ends(text):
    """Text is held only while it can still become a call: these show themselves early."""
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
    translator = proxy.StreamTranslator("claude-x", 5, tool_names=TOOLS + ["read_file"])
    translator.start()
    early = [event for piece in pieces for event in translator.feed(chunk(content=piece))]
    streamed = "".join(data["delta"]["text"] for name, data in early if name == "content_block_delta")
    assert len(streamed) >= len(text) // 2
    translator.feed(final_chunk())
    assert translator.message["content"] == [{"type": "text", "text": text}]


def test_parameters_written_as_xml_are_typed_by_the_tools_schema():
    schema = {"type": "object", "properties": {"count": {"type": "integer"}, "ratio": {"type": "number"},
                                               "force": {"type": "boolean"}, "tags": {"type": "array"},
                                               "spec": {"type": "object"}, "note": {"type": "string"}}}
    text = ("<function=Tune>\n<parameter=count>\n3\n</parameter>\n<parameter=ratio>\n0.5\n</parameter>\n"
            "<parameter=force>\nTrue\n</parameter>\n<parameter=tags>\n[\"a\", \"b\"]\n</parameter>\n"
            "<parameter=spec>\n{\"k\": 1}\n</parameter>\n<parameter=note>\n42\n</parameter>\n"
            "<parameter=other>\n7\n</parameter>\n<parameter=count2>\nnot a number\n</parameter>\n</function>")
    _, [call] = text_calls(text, {"Tune": schema})
    assert call["input"] == {"count": 3, "ratio": 0.5, "force": True, "tags": ["a", "b"], "spec": {"k": 1},
                             "note": "42", "other": "7", "count2": "not a number"}
    bad = text.replace("\n3\n", "\nthree\n")
    assert text_calls(bad, {"Tune": schema})[1][0]["input"]["count"] == "three"


@pytest.mark.parametrize("text", [
    "Here is an example:\n<tool_call>\n" + BASH_CALL + "\n</tool_call>",
    "I can't run that for you, but it would be:\n<function=Bash>\n<parameter=command>\nrm -rf /\n</parameter>\n</function>",
    "```\n<tool_call>\n" + BASH_CALL + "\n</tool_call>\n```",
    "Sure.\n<tool_call>\n" + BASH_CALL + "\n</tool_call>\nAnd then I will summarise the output for you.",
    "word " * 300 + "\n<tool_call>\n" + BASH_CALL + "\n</tool_call>",
    "Run it like <tool_call>" + BASH_CALL + "</tool_call> in your reply.",
    "Do not run this:\n<function=Bash>\n<parameter=command>\nrm -rf /\n</parameter>\n</function>",
    "You should never run:\n<tool_call>\n" + BASH_CALL + "\n</tool_call>",
    "A call looks like this:\n<tool_call>\n" + BASH_CALL + "\n</tool_call>",
    "Instead of running it, type:\n<tool_call>\n" + BASH_CALL + "\n</tool_call>",
    "Here is how to list the files:\n<tool_call>\n" + BASH_CALL + "\n</tool_call>",
    "You can call it like so:\n<function=Bash>\n<parameter=command>\nls\n</parameter>\n</function>",
])
def test_examples_refusals_and_calls_inside_prose_never_run(text):
    for pieces in ([text], [text[i:i + 4] for i in range(0, len(text), 4)]):
        events, translator = translate([chunk(content=piece) for piece in pieces] + [final_chunk()],
                                       tool_names=TOOLS)
        assert translator.message["content"] == [{"type": "text", "text": text}]


def test_a_call_cut_short_by_max_tokens_or_a_stop_sequence_never_runs():
    cut = "<function=Bash>\n<parameter=command>\nrm -rf /"  # "rm -rf /tmp/build", cut by max_tokens
    for pieces in ([cut], [cut[i:i + 3] for i in range(0, len(cut), 3)]):
        _, translator = translate([chunk(content=piece) for piece in pieces] + [final_chunk(done_reason="length")],
                                  tool_names=TOOLS)
        assert translator.message["content"] == [{"type": "text", "text": cut}]
        assert translator.message["stop_reason"] == "max_tokens"
    call = "<function=Bash>\n<parameter=command>\nls -la\n</parameter>\n</function>"
    _, translator = translate([chunk(content=call), final_chunk()], tool_names=TOOLS, stop_sequences=["-la"])
    assert translator.message["content"] == [{"type": "text", "text": "<function=Bash>\n<parameter=command>\nls "}]
    # A call that was complete when a stop sequence after it ended the reply still runs.
    _, translator = translate([chunk(content=call + "\nObservation:"), final_chunk()], tool_names=TOOLS,
                              stop_sequences=["Observation:"])
    assert [(b["type"], b.get("input")) for b in translator.message["content"]] == [("tool_use", {"command": "ls -la"})]


def test_a_preamble_may_mention_examples_without_being_one():
    text = "Let me look in the examples folder.\n<tool_call>\n" + BASH_CALL + "\n</tool_call>"
    assert text_calls(text, TOOLS) == ("Let me look in the examples folder.",
                                                        [{"name": "Bash", "input": {"command": "ls -la"}}])
    text = "It looks like the build failed; I do not know why yet, so:\n<tool_call>\n" + BASH_CALL + "\n</tool_call>"
    assert text_calls(text, TOOLS)[1] == [{"name": "Bash", "input": {"command": "ls -la"}}]


def test_mistral_calls_keep_the_calls_and_drop_the_answer_made_up_after_them():
    text = '[TOOL_CALLS] [{"name": "Bash", "arguments": {"command": "date"}}]\nIt is 10:42 on Monday.'
    events, translator = stream_text(text)
    assert [(b["type"], b.get("input")) for b in translator.message["content"]] == [("tool_use", {"command": "date"})]
    literal = "[TOOL_CALLS] [{'name': 'Bash', 'arguments': {'command': 'date', 'quiet': True}}]"
    assert text_calls(literal, TOOLS)[1] == [{"name": "Bash", "input": {"command": "date", "quiet": True}}]


def test_gemma_call_syntax_with_its_string_delimiter_and_nesting():
    text = '<|tool_call>call:Write{file_path:<|"|>/tmp/a, b.txt<|"|>,content:<|"|>x: {1}<|"|>,opts:{n:2,on:true,' \
           'tags:[<|"|>a<|"|>,null]}}<tool_call|>'
    _, [call] = text_calls(text, TOOLS)
    assert call == {"name": "Write", "input": {"file_path": "/tmp/a, b.txt", "content": "x: {1}",
                                               "opts": {"n": 2, "on": True, "tags": ["a", None]}}}


def test_qwen_xml_call_through_the_proxy_streaming_and_not(gateway, ollama):
    tools = [{"name": "Bash", "input_schema": {"type": "object", "properties": {
        "command": {"type": "string"}, "timeout": {"type": "number"}}}}]
    text = ("I'll run it.\n<tool_call>\n<function=Bash>\n<parameter=command>\necho 'a < b'\n</parameter>\n"
            "<parameter=timeout>\n5000\n</parameter>\n</function>\n</tool_call>")
    for stream in (False, True):
        ollama.script(Reply([chunk(content=text[i:i + 6]) for i in range(0, len(text), 6)] + [final_chunk()]))
        status, _, raw = gateway.call("POST", "/v1/messages", request_body(tools=tools, stream=stream))
        assert status == 200
        if stream:
            events = parse_sse(raw)
            assert_valid_stream(events)
            blocks = [data["content_block"] for name, data in events if name == "content_block_start"]
            deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
            assert [b["type"] for b in blocks] == ["text", "tool_use"] and blocks[1]["name"] == "Bash"
            assert "".join(d.get("text", "") for d in deltas).strip() == "I'll run it."
            assert json.loads(deltas[-1]["partial_json"]) == {"command": "echo 'a < b'", "timeout": 5000}
            assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
        else:
            message = json.loads(raw)
            assert message["stop_reason"] == "tool_use"
            assert message["content"][1]["input"] == {"command": "echo 'a < b'", "timeout": 5000}


###############################################################################
# The real Claude Code CLI through the proxy
###############################################################################

CLAUDE_CODE_VERSION = "2.1.332"


def claude_code_binary():
    cached = Path.home() / f".cache/simple_api_proxy/claude-code-{CLAUDE_CODE_VERSION}/node_modules/.bin/claude"
    for candidate in (os.environ.get("CLAUDE_CODE_BIN"), str(cached), shutil.which("claude")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    need(False, f"Claude Code CLI not found: set CLAUDE_CODE_BIN, or run "
                f"npm install @anthropic-ai/claude-code@{CLAUDE_CODE_VERSION} (.ci/run does)")


class ClaudeCodeScript:
    """The stand-in's answers for a Claude Code conversation: `first` for the prompt, then
    `after_tool(tool_output)` once Claude Code sends a tool result back."""

    def __init__(self, first, after_tool=None):
        self.first = first
        self.after_tool = after_tool

    def __call__(self, request):
        results = latest_tool_results(request)
        if results and self.after_tool:
            return self.after_tool(results[-1]["content"])
        return self.first()


def latest_tool_results(request):
    """The tool messages after the model's latest turn (reminders may follow them as user text)."""
    results = []
    for message in reversed(request["messages"]):
        if message["role"] == "assistant":
            break
        if message["role"] == "tool":
            results.insert(0, message)
    return results


class ClaudeCodeSteps:
    """The stand-in's answers for a longer Claude Code session: reply N answers the request that
    holds N model turns, so a request Claude Code repeats gets the same answer."""

    def __init__(self, *replies, last=lambda: text_reply("done")):
        self.replies = replies
        self.last = last

    def __call__(self, request):
        turns = sum(1 for message in request["messages"] if message["role"] == "assistant")
        return self.replies[turns]() if turns < len(self.replies) else self.last()


@pytest.fixture
def claude_code(ollama, tmp_path, caplog):
    binary = claude_code_binary()
    caplog.set_level("INFO", logger="simple_api_proxy")
    workdir, home = tmp_path / "work", tmp_path / "home"
    workdir.mkdir()
    home.mkdir()

    def run(*args, settings=None, timeout=120, env_extra=None):
        with running_proxy(ollama.url, **(settings or {})) as gateway:
            env = {"PATH": os.environ["PATH"], "HOME": str(home), "TERM": "dumb",
                   "ANTHROPIC_BASE_URL": gateway.url, "ANTHROPIC_AUTH_TOKEN": "dummy",
                   "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1", **(env_extra or {})}
            result = subprocess.run([binary, "-p", *args], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                    capture_output=True, text=True, timeout=timeout)
        result.workdir = workdir
        return result

    return run


def test_claude_code_prints_the_models_answer(claude_code, ollama, caplog):
    ollama.responder = ClaudeCodeScript(lambda: text_reply("Hello from the model behind the proxy."))
    result = claude_code("say hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Hello from the model behind the proxy."
    request = ollama.chats()[0]
    assert request["model"] == MODEL and len(request["tools"]) >= 5
    assert "x-anthropic-billing-header" not in json.dumps(request["messages"])
    assert "claude-opus-5-5->qwen2.5-coder:7b 200 stream" in caplog.text


def test_claude_code_runs_a_bash_tool_loop(claude_code, ollama):
    ollama.responder = ClaudeCodeScript(
        lambda: tool_reply(("Bash", {"command": "echo proxy-$((6*7))", "description": "Print a number"})),
        lambda output: text_reply(f"The command printed: {output.strip()}"))
    result = claude_code("run the command", "--allowedTools", "Bash")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The command printed: proxy-42"
    tool_message = ollama.chats()[-1]["messages"][-1]
    assert tool_message["role"] == "tool" and tool_message["tool_name"] == "Bash"
    assert tool_message["tool_call_id"].startswith("toolu_")


def test_claude_code_write_tool_creates_the_file(claude_code, ollama, tmp_path):
    target = tmp_path / "work" / "hello.txt"
    ollama.responder = ClaudeCodeScript(
        lambda: tool_reply(("Write", {"file_path": str(target), "content": "written through the proxy\n"})),
        lambda output: text_reply("File written."))
    result = claude_code("write the file", "--allowedTools", "Write")
    assert result.returncode == 0, result.stderr
    assert target.read_text() == "written through the proxy\n" and "File written." in result.stdout


def test_claude_code_tool_call_written_as_text(claude_code, ollama):
    call = '{"name": "Bash", "arguments": {"command": "echo text-call-$((2+3))", "description": "Echo"}}'
    ollama.responder = ClaudeCodeScript(
        lambda: Reply([chunk(content=call[i:i + 7]) for i in range(0, len(call), 7)] + [final_chunk()]),
        lambda output: text_reply(f"Output was {output.strip()}"))
    result = claude_code("run it", "--allowedTools", "Bash")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Output was text-call-5"


def test_claude_code_runs_a_call_written_as_qwen_xml(claude_code, ollama):
    """qwen3-coder's own format, after a preamble, streamed in small pieces."""
    call = ("Let me run that.\n<tool_call>\n<function=Bash>\n<parameter=command>\necho xml-call-$((3+4))\n"
            "</parameter>\n<parameter=timeout>\n60000\n</parameter>\n<parameter=description>\nEcho a number\n"
            "</parameter>\n</function>\n</tool_call>")
    ollama.responder = ClaudeCodeScript(
        lambda: Reply([chunk(content=call[i:i + 5]) for i in range(0, len(call), 5)] + [final_chunk()]),
        lambda output: text_reply(f"Output was {output.strip()}"))
    result = claude_code("run it", "--allowedTools", "Bash")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Output was xml-call-7"
    assert ollama.chats()[-1]["messages"][-1]["content"].strip() == "xml-call-7"


def test_claude_code_model_names_reach_the_configured_models(claude_code, ollama, caplog):
    ollama.responder = ClaudeCodeScript(lambda: text_reply("ok"))
    settings = {"MODEL_MAP": "haiku=llama3.2:3b"}
    assert claude_code("hi", settings=settings).returncode == 0
    assert claude_code("hi", "--model", "claude-haiku-4-5", settings=settings).returncode == 0
    assert [request["model"] for request in ollama.chats()] == [MODEL, "llama3.2:3b"]
    assert "claude-opus-5-5->qwen2.5-coder:7b" in caplog.text
    assert "claude-haiku-4-5->llama3.2:3b" in caplog.text


def text_call(name, arguments):
    """A reply that writes the call as text, the way small models often do."""
    return Reply([chunk(content=f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'),
                  final_chunk()])


def test_claude_code_loads_a_deferred_tool_then_calls_it_as_text_and_structured(claude_code, ollama, tmp_path):
    notebook = tmp_path / "work" / "nb.ipynb"
    cells = [{"cell_type": "code", "id": cell_id, "metadata": {}, "execution_count": None, "outputs": [],
              "source": [source]} for cell_id, source in (("c1", "x = 1\n"), ("c2", "y = 2\n"))]
    notebook.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    ollama.responder = ClaudeCodeSteps(
        lambda: tool_reply(("ToolSearch", {"query": "select:NotebookEdit"})),
        lambda: tool_reply(("Read", {"file_path": str(notebook)})),
        lambda: text_call("NotebookEdit", {"notebook_path": str(notebook), "cell_id": "c1", "new_source": "x = 10"}),
        lambda: tool_reply(("NotebookEdit", {"notebook_path": str(notebook), "cell_id": "c2", "new_source": "y = 20"})))
    result = claude_code("edit the notebook", "--allowedTools", "ToolSearch,Read,NotebookEdit")
    assert result.returncode == 0, result.stderr
    assert [cell["source"] for cell in json.loads(notebook.read_text())["cells"]] == ["x = 10", "y = 20"]
    offered = [[tool["function"]["name"] for tool in chat["tools"]] for chat in ollama.chats()]
    assert "NotebookEdit" not in offered[0] and all(names[-1] == "NotebookEdit" for names in offered[1:])
    assert "DeferredToolPlaceholder" not in offered[-1] and len(ollama.chats()) == 5
    assert "$schema" not in json.dumps(ollama.chats()[-1]["tools"])


def write_pdf(path, text):
    """A one-page PDF with a line of text."""
    stream = f"BT /F1 12 Tf 20 100 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    data, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(data))
        data += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(data)
    data += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    data += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    data += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(data))


def test_claude_code_reads_a_pdf_and_a_240kb_file_at_the_default_window(claude_code, ollama, tmp_path, caplog):
    work = tmp_path / "work"
    write_pdf(work / "invoice.pdf", "Invoice total 42")
    big = work / "big.txt"
    big.write_text("".join(f"line {n:05d}: " + "abcdefghij" * 7 + "\n" for n in range(3000)))
    assert big.stat().st_size > 240_000
    ollama.responder = ClaudeCodeSteps(
        lambda: tool_reply(("Read", {"file_path": str(work / "invoice.pdf")})),
        lambda: tool_reply(("Read", {"file_path": str(big)})),
        lambda: tool_reply(("Edit", {"file_path": str(big), "old_string": "line 00005: abc",
                                     "new_string": "line 00005: EDITED abc"})),
        lambda: tool_reply(("Write", {"file_path": str(work / "summary.txt"), "content": "read both\n"})))
    result = claude_code("read the files", "--allowedTools", "Read,Edit,Write")
    assert result.returncode == 0, result.stderr
    assert (work / "summary.txt").read_text() == "read both\n"
    assert big.read_text().splitlines()[5].startswith("line 00005: EDITED abc")
    chats = ollama.chats()
    assert len(chats) == 5  # no request refused, none repeated
    pdf_result = latest_tool_results(chats[1])[0]["content"]
    assert "[PDF document (application/pdf, " in pdf_result and "this model can't read PDF documents" in pdf_result
    read_result = latest_tool_results(chats[2])[0]["content"]
    assert "characters cut from the middle of this tool result to fit the model's 32768-token window" in read_result
    assert read_result.startswith("1\tline 00000") and "line 00895" in read_result
    assert all(proxy.estimate_tokens(chat) <= 32768 for chat in chats)
    assert "changed for the model: [PDF document" in caplog.text


def test_claude_code_session_with_nudges_and_parallel_calls_keeps_the_prompt_prefix(claude_code, ollama, tmp_path,
                                                                                   caplog):
    work = tmp_path / "work"
    (work / "notes.txt").write_text("note\n")
    ollama.responder = ClaudeCodeSteps(
        # Read answers at once, the sleep a second later: Claude Code sends the results in that order.
        lambda: tool_reply(("Bash", {"command": "sleep 1", "description": "Wait"}),
                           ("Read", {"file_path": str(work / "notes.txt")})),
        lambda: tool_reply(("Bash", {"command": "echo one > one.txt", "description": "Write one"})),
        lambda: tool_reply(("Write", {"file_path": str(work / "two.txt"), "content": "two\n"})),
        lambda: tool_reply(("Bash", {"command": "cat one.txt two.txt > both.txt", "description": "Join"})))
    result = claude_code("do the steps", "--allowedTools", "Bash,Read,Write", settings={"LOG_BODIES": "1"},
                         env_extra={"CLAUDE_CODE_SILENT_TURN_REMINDER": "1",
                                    "CLAUDE_CODE_SILENT_TURN_REMINDER_TURNS": "1"})
    assert result.returncode == 0, result.stderr
    assert (work / "both.txt").read_text() == "one\ntwo\n"
    bodies = [json.loads(r.getMessage().split(" body: ", 1)[1]) for r in caplog.records if " body: " in r.getMessage()]
    sent = bodies[1]["messages"]
    assert [b["tool_use_id"] for b in sent[-2]["content"] if b["type"] == "tool_result"] == \
        [b["id"] for b in sent[-3]["content"]][::-1], "Claude Code sent the results in completion order"
    assert sum(1 for body in bodies for m in body["messages"] if m["role"] == "system") > len(bodies)
    chats = ollama.chats()
    calls = [call["id"] for call in [m for m in chats[1]["messages"] if m["role"] == "assistant"][-1]["tool_calls"]]
    assert [m["tool_call_id"] for m in latest_tool_results(chats[1])] == calls
    assert [m["role"] for m in chats[-1]["messages"]].count("system") == 1
    assert any(m["role"] == "user" and m["content"].startswith("<system-reminder>\nThe user hasn't heard from you")
               for m in chats[-1]["messages"])
    prompts = [ollama_prompt(chat) for chat in chats]
    for earlier, later in zip(prompts, prompts[1:]):
        assert later.startswith(earlier)


def ollama_prompt(chat):
    """An Ollama chat request laid out the way Ollama's template layer renders it: every system
    message joined at the head (collate in template/template.go), then the tools, then the rest."""
    head = "\n\n".join(m["content"] for m in chat["messages"] if m["role"] == "system")
    rest = "".join(json.dumps(m, sort_keys=True) for m in chat["messages"] if m["role"] != "system")
    return head + json.dumps(chat.get("tools"), sort_keys=True) + rest


###############################################################################
# Hardening: access, limits, faults, shutdown, secrets
###############################################################################

def test_api_key_guards_v1_but_not_liveness(ollama):
    with running_proxy(ollama.url, PROXY_API_KEY="k-123") as gateway:
        status, _, body = gateway.messages(request_body())
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert gateway.messages(request_body(), {"x-api-key": "wrong"})[0] == 401
        assert gateway.messages(request_body(), {"Authorization": "Bearer k-1234"})[0] == 401
        assert gateway.messages(request_body(), {"x-api-key": "k-123"})[0] == 200
        assert gateway.messages(request_body(), {"Authorization": "Bearer k-123"})[0] == 200
        assert gateway.json("GET", "/v1/models")[0] == 401
        assert gateway.json("GET", "/")[0] == 200
        status, _, open_health = gateway.json("GET", "/health")
        assert status == 200 and set(open_health) == {"status", "service", "version", "instance_id"}
        status, _, full_health = gateway.json("GET", "/health", headers={"x-api-key": "k-123"})
        assert "ollama" in full_health and "cache" in full_health
        anthropic = anthropic_module()
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=gateway.url, api_key="nope", max_retries=0).messages.create(
                model="claude-opus-5-5", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        reply = anthropic.Anthropic(base_url=gateway.url, auth_token="k-123", max_retries=0).messages.create(
            model="claude-opus-5-5", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        assert reply.content[0].text


def read_until_closed(connection):
    """Every byte the proxy sends until it closes the connection."""
    received = b""
    while True:
        part = connection.recv(65536)
        if not part:
            return received
        received += part


def raw_exchange(port, data, read_timeout=5):
    """Send raw bytes; return the proxy's first response (b"" if it closed without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as connection:
        connection.sendall(data)
        received = b""
        with contextlib.suppress(OSError):
            while True:
                head, _, body = received.partition(b"\r\n\r\n")
                if _:
                    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), None)
                    if length is not None and len(body) >= length:
                        break
                part = connection.recv(65536)
                if not part:
                    break
                received += part
        return received


def test_body_limits_and_framing(gateway):
    big = raw_exchange(gateway.port, b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 40000000\r\n\r\n")
    assert big.startswith(b"HTTP/1.1 413") and b"request_too_large" in big
    missing = raw_exchange(gateway.port, b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert missing.startswith(b"HTTP/1.1 411") and b"Content-Length" in missing
    malformed = raw_exchange(gateway.port, b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n")
    assert malformed.startswith(b"HTTP/1.1 400")
    body = json.dumps(request_body()).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 50]), body[i:i + 50]) for i in range(0, len(body), 50))
    answer = raw_exchange(gateway.port, b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                                        b"Connection: close\r\n\r\n" + chunked + b"0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and b"stand-in model" in answer
    assert gateway.json("GET", "/")[0] == 200


def test_slow_and_idle_clients_are_cut_off(ollama):
    with running_proxy(ollama.url, CLIENT_TIMEOUT=1) as gateway:
        trickle = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
        started = time.monotonic()
        trickle.sendall(b"POST /v1/messages HTTP/1.1\r\n")
        with contextlib.suppress(OSError):
            for _ in range(40):
                trickle.sendall(b"X")
                time.sleep(0.1)
        assert time.monotonic() - started < 3, "a client trickling its headers kept the connection"
        trickle.close()
        idle = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
        started = time.monotonic()
        assert idle.recv(100) == b"" and time.monotonic() - started < 2.5
        idle.close()
        body = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
        body.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 500\r\n\r\n{")
        started = time.monotonic()
        answer = body.recv(1000)
        assert time.monotonic() - started < 2.5 and (answer == b"" or answer.startswith(b"HTTP/1.1 4"))
        body.close()
        assert gateway.json("GET", "/")[0] == 200


def test_generations_past_max_concurrent_get_529(ollama):
    ollama.script(text_reply(delay_before=2))
    with running_proxy(ollama.url, MAX_CONCURRENT=1) as gateway:
        slow = threading.Thread(target=gateway.messages, args=(request_body(),))
        slow.start()
        assert ollama.chat_started.wait(5)
        status, headers, body = gateway.messages(request_body("second"))
        assert status == 529 and body["error"]["type"] == "overloaded_error" and headers["retry-after"]
        assert gateway.json("GET", "/health")[2]["in_flight"] == 1
        slow.join()
        assert gateway.messages(request_body("third"))[0] == 200


def test_connections_past_max_connections_get_529_without_a_thread(ollama):
    with running_proxy(ollama.url, MAX_CONNECTIONS=2) as gateway:
        held = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(2)]
        time.sleep(0.2)
        answer = raw_exchange(gateway.port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 529") and b"MAX_CONNECTIONS" in answer
        for connection in held:
            connection.close()
        deadline = time.monotonic() + 3
        while gateway.server.connections:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert gateway.json("GET", "/")[0] == 200


def test_reset_before_the_stream_is_502_and_nothing_is_cached(ollama):
    with running_proxy(ollama.url, CACHE="on") as gateway:
        for stream in (False, True):
            ollama.script(Reply([("reset",)]))
            status, _, raw = gateway.call("POST", "/v1/messages", request_body(stream=stream))
            assert status in (200, 502)
            if status == 200:
                assert parse_sse(raw)[-1][0] == "error"
        assert gateway.server.cache.memory.entries == {}
        assert_threads_freed(gateway)


class ProxyProcess:
    """simple_api_proxy.py as users run it: a process, signals and all."""

    def __init__(self, tmp_path, **settings):
        self.port = free_port()
        self.log_file = tmp_path / "proxy.log"
        env = dict(os.environ, API_PORT=str(self.port), LOG_FILE=str(self.log_file))
        env.update({k: str(v) for k, v in settings.items()})
        self.process = subprocess.Popen([sys.executable, str(HERE / "simple_api_proxy.py")], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.gateway = Proxy.__new__(Proxy)
        self.gateway.port, self.gateway.url = self.port, f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                if self.gateway.call("GET", "/")[0] == 200:
                    return
            assert time.monotonic() < deadline and self.process.poll() is None, self.process.stdout.read()
            time.sleep(0.05)

    def finish(self, timeout=15):
        self.output = self.process.communicate(timeout=timeout)[0]
        return self.process.returncode

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=10)


def test_sigterm_lets_requests_in_flight_finish(ollama, tmp_path):
    ollama.script(text_reply("one two three four five six", per_token_delay=0.25))
    running = ProxyProcess(tmp_path, OLLAMA_HOST=ollama.url)
    try:
        result = {}
        client = threading.Thread(target=lambda: result.update(answer=running.gateway.stream(request_body())))
        client.start()
        assert ollama.chat_started.wait(5)
        running.process.send_signal(15)
        time.sleep(0.3)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", running.port), timeout=1).close()
        client.join(10)
        status, _, raw = result["answer"]
        events = parse_sse(raw)
        assert status == 200 and events[-1][0] == "message_stop"
        assert running.finish() == 0
        assert "SIGTERM received" in running.output and "stopped" in running.output
    finally:
        running.kill()


def send_in_background(gateway, body):
    def send():
        with contextlib.suppress(OSError, http.client.HTTPException):
            gateway.messages(body)
    threading.Thread(target=send, daemon=True).start()


def test_grace_runs_out_and_a_second_signal_exits_at_once(ollama, tmp_path):
    ollama.script(text_reply(delay_before=30), text_reply(delay_before=30))
    running = ProxyProcess(tmp_path, OLLAMA_HOST=ollama.url, SHUTDOWN_GRACE=0.5)
    try:
        send_in_background(running.gateway, request_body())
        assert ollama.chat_started.wait(5)
        started = time.monotonic()
        running.process.send_signal(15)
        assert running.finish() == 0 and time.monotonic() - started < 3
        assert "grace over with 1 request(s) still in flight" in running.output
    finally:
        running.kill()
    ollama.chat_started.clear()
    running = ProxyProcess(tmp_path, OLLAMA_HOST=ollama.url)
    try:
        send_in_background(running.gateway, request_body())
        assert ollama.chat_started.wait(5)
        started = time.monotonic()
        running.process.send_signal(15)
        time.sleep(0.3)
        running.process.send_signal(2)
        assert running.finish() == 1 and time.monotonic() - started < 3
        assert "second signal" in running.output
    finally:
        running.kill()


def test_public_bind_without_a_key_warns_loudly(ollama, tmp_path):
    running = ProxyProcess(tmp_path, OLLAMA_HOST=ollama.url, API_HOST="0.0.0.0")
    try:
        running.process.send_signal(15)
        assert running.finish() == 0
        assert "WITHOUT an API key" in running.output
    finally:
        running.kill()


def test_secrets_and_prompts_stay_out_of_logs_errors_and_health(ollama, tmp_path):
    key, password, prompt = "key-AAA-secret", "pw-BBB-secret", "PROMPT-CCC-MARKER"
    running = ProxyProcess(tmp_path, OLLAMA_HOST=ollama.url, PROXY_API_KEY=key, LOG_LEVEL="DEBUG",
                           REDIS_URL=f"redis://:{password}@127.0.0.1:{free_port()}/0")
    try:
        seen = []
        gateway = running.gateway
        for headers in ({}, {"x-api-key": "wrong"}, {"x-api-key": key}):
            seen.append(gateway.call("POST", "/v1/messages", request_body(prompt), headers)[2])
            seen.append(gateway.call("POST", "/v1/messages", request_body(prompt, stream=True), headers)[2])
            seen.append(gateway.call("GET", "/health", headers=headers)[2])
        seen.append(gateway.call("POST", "/v1/messages", b'{"model": "PROMPT-CCC-MARKER"', {"x-api-key": key})[2])
        ollama.script(Reply(status=500, error="boom"))
        seen.append(gateway.call("POST", "/v1/messages", request_body(prompt), {"x-api-key": key})[2])
        running.process.send_signal(15)
        running.finish()
    finally:
        running.kill()
    everything = b"".join(seen).decode() + running.output + running.log_file.read_text()
    assert "stand-in model" in everything and "***" in everything
    for secret in (key, password, prompt):
        assert secret not in everything


###############################################################################
# Fuzzing: bad input never gets a 5xx, a traceback, or a dead server
###############################################################################

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # the fuzz tests below skip (fail under CI) without it
    given = None

FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(HealthCheck) if given else ())


class FuzzClient:
    """One keep-alive connection to the proxy, reopened whenever the proxy closes it."""

    def __init__(self, port):
        self.port = port
        self.connection = None
        self.answers = 0

    def send(self, method, path, body, headers):
        for attempt in range(2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                self.connection.request(method, path, body=body, headers=headers)
                response = self.connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException):
                self.connection.close()
                self.connection = None
                if attempt:
                    raise
                continue
            if response.will_close:
                self.connection.close()
                self.connection = None
            self.answers += 1
            return response.status, data
        raise AssertionError("unreachable")


def check_answer(status, data, method="POST"):
    assert status < 500, data[:300]
    assert b"Traceback" not in data and b'File "' not in data
    if status >= 400 and method != "HEAD":
        body = json.loads(data)
        assert body["type"] == "error" and body["error"]["type"] and body["request_id"].startswith("req_")


@pytest.fixture(scope="module")
def fuzz_target():
    if given is None:
        need(False, "hypothesis is not installed (pip install hypothesis)")
    stand_in = StandInOllama()
    with running_proxy(stand_in.url, OLLAMA_NUM_CTX=4000, CLIENT_TIMEOUT=5) as gateway:
        yield gateway, FuzzClient(gateway.port)
    stand_in.stop()


if given:
    json_leaf = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                 | st.text(max_size=30))
    json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                              | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=10)
    any_or = lambda strategy: strategy | json_value  # noqa: E731 - a sometimes-wrong value of any type
    block = st.fixed_dictionaries(
        {"type": any_or(st.sampled_from(["text", "image", "tool_use", "tool_result", "document", "thinking",
                                         "redacted_thinking", "server_tool_use", "search_result", "tool_reference"]))},
        optional={"text": any_or(st.text(max_size=40)), "id": any_or(st.text(max_size=10)),
                  "name": any_or(st.sampled_from(["Bash", "Read"])), "input": json_value,
                  "tool_use_id": any_or(st.text(max_size=10)), "content": json_value | st.text(max_size=20),
                  "is_error": json_value, "thinking": json_value, "title": json_value,
                  "source": any_or(st.fixed_dictionaries({"type": any_or(st.sampled_from(
                      ["base64", "text", "content", "url", "file"])), "data": any_or(st.text(max_size=20)),
                      "media_type": json_value, "content": json_value})),
                  "cache_control": json_value})
    message = st.fixed_dictionaries({"role": any_or(st.sampled_from(["user", "assistant", "system"])),
                                     "content": any_or(st.text(max_size=40) | st.lists(block, max_size=4))})
    tool = st.fixed_dictionaries({"name": any_or(st.sampled_from(["Bash", "Read"]))},
                                 optional={"input_schema": any_or(st.just({"type": "object"})),
                                           "type": any_or(st.sampled_from(["custom", "bash_20250124"])),
                                           "description": json_value, "defer_loading": json_value})
    request = st.fixed_dictionaries(
        {"model": any_or(st.sampled_from(["claude-opus-5-5", MODEL, "qwen3:8b", "absent:1b"])),
         "max_tokens": any_or(st.integers(0, 5000)), "messages": any_or(st.lists(message, max_size=4))},
        optional={"system": any_or(st.text(max_size=30) | st.lists(block, max_size=3)),
                  "stream": any_or(st.booleans()), "tools": any_or(st.lists(tool, max_size=3)),
                  "tool_choice": any_or(st.fixed_dictionaries({"type": any_or(st.sampled_from(
                      ["auto", "any", "tool", "none"]))}, optional={"name": json_value})),
                  "temperature": any_or(st.floats(0, 1)), "top_p": json_value, "top_k": json_value,
                  "stop_sequences": any_or(st.lists(st.text(max_size=5), max_size=3)),
                  "thinking": any_or(st.fixed_dictionaries({"type": any_or(st.sampled_from(
                      ["enabled", "adaptive", "disabled"]))}, optional={"budget_tokens": json_value,
                                                                         "display": json_value})),
                  "output_config": any_or(st.fixed_dictionaries({}, optional={"effort": json_value,
                                                                              "format": json_value})),
                  "metadata": json_value, "context_management": json_value, "unknown": json_value})
    nested = st.integers(1, 3000).map(lambda depth: '{"model":' + "[" * depth + "]" * depth + "}")

    @settings(max_examples=1500, **FUZZ_SETTINGS)
    @given(body=request, path=st.sampled_from(["/v1/messages", "/v1/messages?beta=true",
                                                "/v1/messages/count_tokens"]))
    def test_fuzz_request_fields(fuzz_target, body, path):
        gateway, client = fuzz_target
        check_answer(*client.send("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"}))

    @settings(max_examples=300, **FUZZ_SETTINGS)
    @given(raw=st.binary(max_size=300) | nested.map(str.encode)
           | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
    def test_fuzz_raw_bodies(fuzz_target, raw):
        gateway, client = fuzz_target
        check_answer(*client.send("POST", "/v1/messages", raw, {"Content-Type": "application/json"}))

    header_value = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)

    @settings(max_examples=300, **FUZZ_SETTINGS)
    @given(method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "BREW"])
           | st.text(st.characters(min_codepoint=65, max_codepoint=90), min_size=1, max_size=8),
           path=st.sampled_from(["/", "/health", "/v1/models", "/v1/models/x%2Fy", "/v1/messages", "/%00",
                                 "/v1/models?limit=abc", "/v1/models?limit=0", "/" + "a" * 3000]),
           headers=st.dictionaries(st.sampled_from(["Cache-Control", "x-api-key", "Authorization", "Accept",
                                                    "anthropic-beta", "X-Odd"]), header_value, max_size=4))
    def test_fuzz_methods_paths_and_headers(fuzz_target, method, path, headers):
        gateway, client = fuzz_target
        body = json.dumps(request_body()).encode() if method == "POST" else None
        check_answer(*client.send(method, path, body, dict(headers, **{"Content-Type": "application/json"})), method)

    @settings(max_examples=100, **FUZZ_SETTINGS)
    @given(line=st.binary(min_size=1, max_size=200))
    def test_fuzz_raw_request_lines(fuzz_target, line):
        gateway, client = fuzz_target
        answer = raw_exchange(gateway.port, line.replace(b"\n", b" ") + b"\r\nHost: 127.0.0.1\r\n\r\n", read_timeout=10)
        if answer:
            assert answer.startswith(b"HTTP/1.1 "), answer[:100]
            head, _, body = answer.partition(b"\r\n\r\n")
            check_answer(int(head.split(b" ", 2)[1]), body, "HEAD" if not body else "POST")

    written_fragment = st.sampled_from(
        list(proxy.TAGGED_OPENERS) + ["```", "```json", "```bash", "\n", " ", "\t", "{", "}", "[", "]", ":", ",",
                                      '"name"', '"arguments"', '"args"', '"type"', '"function"', '"id"',
                                      '"tool_calls"', '"object"', '"Bash"', '"Other"', "'name'", "'Bash'", "Bash",
                                      "Other", "<parameter=command>", "</parameter>", "</function>", "</tool_call>",
                                      '<invoke name="Bash">', '<parameter name="command">', "</invoke>",
                                      "</function_calls>", "call:Bash{", 'command:<|"|>ls<|"|>', "[ARGS]", "<",
                                      "<|", "[TOOL", "<func", "<|python_end|>", "<|eot_id|>", "<tool_call|>",
                                      "ls -la", "Sure, I will", "for example", "\\", '{"command": "ls"}',
                                      BASH_CALL, "<function=Bash>\n<parameter=command>\nls\n</parameter>\n</function>"])

    @settings(max_examples=400, **FUZZ_SETTINGS)
    @given(parts=st.lists(written_fragment, max_size=14), cuts=st.lists(st.integers(1, 9), min_size=1, max_size=5))
    def test_fuzz_text_written_calls_stream_as_they_parse(parts, cuts):
        """Whatever a model writes and however it arrives, the stream ends as the parser decides."""
        text = "".join(parts)
        parsed = text_calls(text, TOOLS)
        pieces, at = [], 0
        while at < len(text):
            size = cuts[len(pieces) % len(cuts)]
            pieces.append(text[at:at + size])
            at += size
        events, translator = translate([chunk(content=piece) for piece in pieces] + [final_chunk()],
                                       tool_names=TOOLS)
        assert_valid_stream(events)
        message = translator.message
        written = "".join(block["text"] for block in message["content"] if block["type"] == "text")
        calls = [{"name": block["name"], "input": block["input"]} for block in message["content"]
                 if block["type"] == "tool_use"]
        if parsed:
            assert (written.strip(), calls) == parsed
        else:
            assert (written, calls) == (text, [])

    def responses_in(data):
        """The responses in what the proxy sent, interim 100s left out: [(status, body)]."""
        found = []
        while data.startswith(b"HTTP/1.1 "):
            head, sep, rest = data.partition(b"\r\n\r\n")
            assert sep, data[:200]
            status = int(head.split(b" ", 2)[1])
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if status != 100:
                found.append((status, rest[:length]))
            data = rest[length:]
        assert data == b"", data[:200]
        return found

    size_forms = {"hex": b"%x", "upper": b"%X", "leading zeros": b"000%x", "minus": b"-%x", "plus": b"+%x",
                  "0x": b"0x%x", "underscore": b"%x_", "space before": b" %x", "too big": b"%x0",
                  "empty": b""}
    framing_headers = [b"Transfer-Encoding: chunked", b"Transfer-Encoding: Chunked", b"Transfer-Encoding: xchunkedx",
                       b"Transfer-Encoding: gzip, chunked", b"Transfer-Encoding: chunked, chunked",
                       b"Transfer-Encoding: chunked,", b"Transfer-Encoding :chunked", b"Content-Length: @",
                       b"Content-Length: @+1", b"Content-Length: @, @", b"Content-Length: -1", b"Content-Length: 1e3",
                       b"Content-Length:  @ ", b"Expect: 100-continue", b"Host: evil.example", b"Host: localhost",
                       b"Connection: close", b" folded", b"X-A: a\x00b", b"Origin: null", b"Origin: http://localhost:3"]

    @settings(max_examples=120, **FUZZ_SETTINGS)
    @given(method=st.sampled_from([b"POST", b"GET"]), chunked=st.booleans(),
           cuts=st.lists(st.integers(1, 120), max_size=3), data=st.data(),
           headers=st.lists(st.sampled_from(framing_headers), max_size=4))
    def test_fuzz_raw_request_framing(fuzz_target, method, chunked, cuts, data, headers):
        gateway, client = fuzz_target
        body = json.dumps(request_body()).encode()
        if chunked:
            pieces, start = [], 0
            for cut in sorted(set(cuts)) + [len(body)]:
                if cut > start:
                    pieces.append(body[start:cut])
                    start = cut
            framed = b""
            for piece in pieces:
                form = data.draw(st.sampled_from(sorted(size_forms)))
                extension = data.draw(st.sampled_from([b"", b";a=b", b';n="q \\" v"', b";x=" + b"v" * 2000,
                                                       b"; bad ext", b";=", b";\x00"]))
                ending = data.draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"", b"XX"]))
                size = size_forms[form] % len(piece) if b"%" in size_forms[form] else b""
                framed += size + extension + b"\r\n" + piece + ending
            body = framed + data.draw(st.sampled_from([b"0\r\n\r\n", b"0\r\nTrailer: x\r\n\r\n", b"0\r\n", b"",
                                                       b"0;e=1\r\n\r\n"]))
        lines = [line.replace(b"@+1", b"%d" % (len(body) + 1)).replace(b"@", b"%d" % len(body)) for line in headers]
        if not any(line.lower().startswith((b"content-length", b"transfer-encoding")) for line in lines):
            body = b""  # unframed, it would only be a malformed next request
        head = b"%s /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % (method, b"".join(l + b"\r\n" for l in lines))
        follow = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as connection:
            connection.sendall(head + body + follow)
            connection.shutdown(socket.SHUT_WR)
            received = b""
            while True:
                part = connection.recv(65536)
                if not part:
                    break
                received += part
        answers = responses_in(received)
        # One answer, or two when the request after it was still found; a framing fault ends the connection.
        assert 1 <= len(answers) <= 2, received[:500]
        for status, answer in answers:
            assert status < 500 or status == 501, answer[:300]
            check_answer(min(status, 499), answer, method.decode())

    def test_fuzzed_server_still_serves(fuzz_target):
        gateway, client = fuzz_target
        assert gateway.json("GET", "/")[0] == 200
        status, _, message = gateway.messages(request_body())
        assert status == 200 and message["content"][0]["text"] == "Hello! I am the stand-in model."
        assert_threads_freed(gateway)


###############################################################################
# Hardening, round two: value rules, stop sequences, failures, cache, logs, shutdown
###############################################################################

def wait_until(predicate, timeout=10, what="a condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("extra, field", [
    ({"temperature": 1.5}, "temperature: Input should be between 0 and 1"),
    ({"temperature": -0.1}, "temperature: Input should be between 0 and 1"),
    ({"top_p": 2}, "top_p: Input should be between 0 and 1"),
    ({"top_k": -1}, "top_k: Input should be greater than or equal to 0"),
    ({"top_k": 2.5}, "top_k: Input should be a valid integer"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1000}}, "thinking.budget_tokens: Input should be greater"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking.budget_tokens: `max_tokens` must be"),
    ({"thinking": {"type": "enabled"}}, "thinking.enabled.budget_tokens: Field required"),
    ({"stop_sequences": ["x"] * (proxy.MAX_STOP_SEQUENCES + 1)}, "stop_sequences: at most"),
    ({"stop_sequences": ["ok", "y" * (proxy.MAX_STOP_SEQUENCE_CHARS + 1)]}, "stop_sequences.1: a stop sequence"),
])
def test_anthropic_value_rules_are_400s_naming_the_field(extra, field):
    body = request_body(**extra)
    body["max_tokens"] = 2048
    with pytest.raises(proxy.ProxyError) as caught:
        proxy.validate_messages_request(body, default_max_tokens=4096)
    assert caught.value.status == 400 and caught.value.error_type == "invalid_request_error"
    assert field in caught.value.message
    fine = request_body(temperature=1, top_p=0, top_k=0, stop_sequences=["s"] * proxy.MAX_STOP_SEQUENCES,
                        max_tokens=1025, thinking={"type": "enabled", "budget_tokens": 1024})
    assert proxy.validate_messages_request(fine, default_max_tokens=4096) is fine


def test_non_finite_numbers_and_missing_models_are_refused_through_the_proxy(gateway, ollama):
    body = json.dumps(request_body()).encode()
    for field, raw in (("temperature", body[:-1] + b', "temperature": 1e400}'),
                       ("tools.0.input_schema.maximum", body[:-1] + b', "tools": [{"name": "t", "input_schema": '
                                                                         b'{"type": "object", "maximum": -2E999}}]}')):
        status, _, answer = gateway.call("POST", "/v1/messages", raw)
        error = json.loads(answer)["error"]
        assert status == 400 and error["type"] == "invalid_request_error"
        assert error["message"].startswith(f"{field}: Input should be a finite number")
    assert ollama.chats() == []
    counted = dict(request_body(), model="no-such-model:1b")
    status, _, answer = gateway.json("POST", "/v1/messages/count_tokens", counted)
    assert status == 404 and answer["error"]["type"] == "not_found_error"
    assert gateway.json("POST", "/v1/messages", counted)[0] == 404


def test_seed_guides_own_checks_answer_without_max_tokens(gateway, ollama):
    """SEED_GUIDE.md's bodies, copied literally: its curl check and its "Custom Applications" example."""
    curl_check = '{"messages":[{"role":"user","content":"Hello"}],"model":"qwen2.5-coder:7b"}'
    custom_application = {"model": "qwen2.5-coder:7b", "messages": [{"role": "user", "content": "Hello"}]}
    for raw in (curl_check.encode(), json.dumps(custom_application).encode()):
        status, _, answer = gateway.json("POST", "/v1/messages", raw)
        assert status == 200 and answer["content"][0]["text"] == "Hello! I am the stand-in model."
    assert [chat["options"]["num_predict"] for chat in ollama.chats()] == [4096, 4096]
    with running_proxy(ollama.url, DEFAULT_MAX_TOKENS=77) as small:
        assert small.json("POST", "/v1/messages", curl_check.encode())[0] == 200
    assert ollama.chats()[-1]["options"]["num_predict"] == 77
    status, _, answer = gateway.json("POST", "/v1/messages", dict(custom_application, max_tokens="200"))
    assert status == 400 and "max_tokens: Input should be a valid integer" in answer["error"]["message"]


def test_many_stop_sequences_match_in_one_pass_earliest_first():
    stops = [f"STOP{n:02d}" for n in range(proxy.MAX_STOP_SEQUENCES - 2)] + ["bc", "abcd"]
    events, translator = translate([chunk(content="xx a"), chunk(content="b"), chunk(content="cd tail"),
                                    final_chunk()], stop_sequences=stops)
    assert_valid_stream(events)
    # "bc" completes before "abcd" does, as a model emitting tokens would stop at it.
    assert translator.message["stop_sequence"] == "bc"
    assert translator.message["content"] == [{"type": "text", "text": "xx a"}]
    events, translator = translate([chunk(content="ST"), chunk(content="OP0"), chunk(content="x STOP4"),
                                    chunk(content="1!"), final_chunk()], stop_sequences=stops)
    assert translator.message["stop_sequence"] == "STOP41"
    assert translator.message["content"] == [{"type": "text", "text": "STOP0x "}]
    text_deltas = [d["delta"]["text"] for n, d in events if n == "content_block_delta"]
    assert text_deltas == ["STOP0x "]


def inject_failure(monkeypatch, owner, name):
    original = getattr(owner, name)

    def broken(*args, **kwargs):
        if name == "open" and "/api/chat" not in args:  # the generation's request, no other
            return original(*args, **kwargs)
        raise RuntimeError("injected failure\nsecond line")
    monkeypatch.setattr(owner, name, broken)


@pytest.mark.parametrize("stage", ["open", "decode", "feed", "cache", "release"])
def test_any_failure_frees_the_slot_and_the_upstream_connection(ollama, monkeypatch, caplog, stage):
    caplog.set_level("INFO", logger="simple_api_proxy")
    with running_proxy(ollama.url, MAX_CONCURRENT=1, CACHE="on") as gateway:
        owner, name = {"open": (proxy.OllamaClient, "open"), "decode": (proxy, "decode_ndjson"),
                       "feed": (proxy.StreamTranslator, "translate"), "cache": (proxy.ResponseCache, "put"),
                       "release": (proxy.UpstreamExchange, "release")}[stage]
        assert gateway.messages(request_body("warm-up"))[0] == 200  # the model's capabilities are known
        wait_until(lambda: gateway.server.active_requests == 0, what="the warm-up to end")
        for stream in (False, True):
            with monkeypatch.context() as patch:
                inject_failure(patch, owner, name)
                status, headers, raw = gateway.call("POST", "/v1/messages",
                                                    request_body(f"{stage} {stream}", stream=stream))
                wait_until(lambda: gateway.server.active_requests == 0, what="the failed request to end")
            assert gateway.server.in_flight == 0
            assert gateway.server.slots._value == gateway.server.config.max_concurrent
            if stage == "release" or (stage == "cache" and stream):
                assert status == 200  # the answer had left before the failure
            elif status == 200:
                assert parse_sse(raw)[-1][1]["error"]["type"] == "api_error"
            else:
                assert status == 500 and json.loads(raw)["error"]["type"] == "api_error"
            failures = [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()
                        and headers["request-id"] in r.getMessage()]
            assert len(failures) == 1 and "RuntimeError: injected failure" in failures[0]
            caplog.clear()
            status, _, raw = gateway.call("POST", "/v1/messages", request_body(f"after {stage}", stream=stream),
                                          headers={"Cache-Control": "no-cache"})
            assert status == 200 and b"stand-in" in raw
            wait_until(lambda: gateway.server.active_requests == 0, what="the next request to end")


TAMPERED_CACHE_VALUES = [b"garbage{{", b"[1,2,3]", b'{"id":"x"}', b"\xff\xfe",
                         json.dumps({"v": proxy.CACHE_ENTRY_VERSION, "message": {"type": "message"}}).encode(),
                         None]  # None: an answer in the format before entries were versioned


def tampered_values(valid_entry):
    message = json.loads(valid_entry)["message"]
    values = [value if value is not None else json.dumps(message).encode() for value in TAMPERED_CACHE_VALUES]
    bad_usage = json.loads(valid_entry)
    bad_usage["message"]["usage"]["output_tokens"] = "7"
    bad_block = json.loads(valid_entry)
    bad_block["message"]["content"] = [{"type": "tool_use", "name": "Bash"}]
    return values + [json.dumps(bad_usage).encode(), json.dumps(bad_block).encode(),
                     valid_entry.replace(b'"v":2', b'"v":2,"x":1e400')]


def assert_tampered_entries_are_misses(gateway, tamper, read, caplog):
    caplog.set_level("WARNING", logger="simple_api_proxy")
    assert gateway.messages(request_body("cached"))[1]["x-cache"] == "MISS"
    (key,) = gateway.server.cache.memory.entries
    valid = read(key)
    for number, value in enumerate(tampered_values(valid)):
        stream = bool(number % 2)
        caplog.clear()
        tamper(key, value)
        status, headers, raw = gateway.call("POST", "/v1/messages", request_body("cached", stream=stream))
        wait_until(lambda: gateway.server.active_requests == 0, what="the answer to be stored")
        assert status == 200 and headers["x-cache"] == "MISS", (value, raw)
        assert b"stand-in" in raw
        if stream:
            assert_valid_stream(parse_sse(raw))
        warned = [r for r in caplog.records if key in r.getMessage() and "redis" in r.getMessage()]
        assert len(warned) == 1, value
        assert proxy.decode_cache_entry(read(key)) is not None  # replaced by the fresh answer
        assert gateway.messages(request_body("cached"))[1]["x-cache"] == "HIT"


def test_tampered_redis_entries_are_misses_never_copied_to_memory(ollama, shared_redis, caplog):
    client, url = shared_redis
    with running_proxy(ollama.url, CACHE="on", REDIS_URL=url) as gateway:
        memory = gateway.server.cache.memory

        def tamper(key, value):
            memory.entries.clear()
            memory.bytes = 0
            client.set(key, value)

        assert_tampered_entries_are_misses(gateway, tamper, client.get, caplog)


def test_logs_cannot_be_forged_and_odd_model_names_still_reach_the_log_file(ollama, tmp_path):
    ollama.script(Reply(status=500, error="boom\r\n2026-01-01 00:00:00,000 INFO forged by ollama"))
    running = ProxyProcess(tmp_path, OLLAMA_HOST=ollama.url)
    try:
        model = "evil\r\n2026-01-01 00:00:00,000 INFO forged by model\x1b[2J\u2028\ud800"
        body = json.dumps(request_body(model=model)).encode()  # json.dumps writes the surrogate as \ud800
        assert running.gateway.call("POST", "/v1/messages", body)[0] == 404
        assert running.gateway.call("POST", "/v1/messages", request_body())[0] == 500
        running.process.send_signal(15)
        assert running.finish() == 0
    finally:
        running.kill()
    logged = running.log_file.read_text(encoding="utf-8")
    assert "Logging error" not in running.output and "UnicodeEncodeError" not in running.output
    lines = logged.splitlines()
    assert all(line[:4].isdigit() and line[4] == "-" for line in lines), logged
    assert not any("\x1b" in line or "\x7f" in line for line in lines)
    assert "evil\\x0d\\x0a2026-01-01 00:00:00,000 INFO forged by model\\x1b[2J\\u2028\\ud800" in logged
    assert "boom\\x0d\\x0a2026-01-01" in logged
    assert "\\x0a" in running.output  # stderr is escaped the same way


def logged_request(caplog, request_id, timeout=10):
    wait_until(lambda: any(r.getMessage().startswith(request_id + " ") for r in caplog.records),
               timeout, f"the log line of {request_id}")
    return next(r.getMessage() for r in caplog.records if r.getMessage().startswith(request_id + " "))


def test_access_log_times_one_request_and_carries_its_id_and_499(gateway, ollama, caplog):
    caplog.set_level("INFO", logger="simple_api_proxy")
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    connection.request("GET", "/")
    connection.getresponse().read()
    idle_over = threading.Event()
    threading.Timer(1.0, idle_over.set).start()
    idle_over.wait()  # the connection sits idle: that time is no part of the next request
    connection.request("GET", "/missing")
    response = connection.getresponse()
    response.read()
    line = logged_request(caplog, response.getheader("request-id"))
    # The second of idleness before the request is not counted (the window itself is not a bound:
    # under load the proxy's clock may read its last byte after the client already has it).
    assert " GET /missing 404 " in line and float(line.rsplit(" ", 1)[1].rstrip("ms")) < 1000
    connection.close()
    status, headers, raw = gateway.stream(request_body())
    assert "claude-sonnet-4-5->qwen2.5-coder:7b 200 stream" in logged_request(caplog, headers["request-id"])
    ollama.script(Reply([chunk(content="one"), chunk(content=" two")] + [("sleep", 0.05), chunk(content=" more")] * 200
                        + [final_chunk()]))
    client = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    body = json.dumps(request_body(stream=True)).encode()
    client.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    received = b""
    while received.count(b"text_delta") < 3:
        received += client.recv(65536)
    request_id = received.split(b"request-id: ", 1)[1].split(b"\r\n", 1)[0].decode()
    client.close()
    line = logged_request(caplog, request_id)
    assert " 499 stream" in line
    sent_so_far = int(line.split(" tokens=", 1)[1].split("/", 1)[1].split(" ", 1)[0])
    assert sent_so_far >= 3


def test_the_generation_slot_is_free_once_the_client_has_the_whole_answer(ollama):
    # A client's next request may follow its answer at once; with MAX_CONCURRENT=1 it got a 529
    # when the slot was given back only after the last bytes had left.
    with running_proxy(ollama.url, MAX_CONCURRENT=1) as gateway:
        for n in range(20):
            status, _, raw = gateway.call("POST", "/v1/messages", request_body(f"question {n}", stream=n % 2 == 0))
            assert status == 200 and (b"message_stop" if n % 2 == 0 else b'"end_turn"') in raw
            assert gateway.server.in_flight == 0 and gateway.server.ollama.hosts[0].in_flight == 0, n


def test_a_request_refused_for_its_framing_is_logged_and_counted(gateway, caplog):
    caplog.set_level("INFO", logger="simple_api_proxy")
    answer = raw_exchange(gateway.port, b"GET /health HTTP/1.1\r\nHost : localhost\r\n\r\n")
    assert status_of(answer) == 400
    request_id = re.search(rb"request-id: (req_\w+)", answer).group(1).decode()
    assert " 400 " in logged_request(caplog, request_id)
    metrics = gateway.call("GET", "/metrics")[2].decode()
    assert 'simple_api_proxy_requests_total{route="unknown",status="400",model="none"} 1' in metrics


def test_a_client_that_pipelined_bytes_and_left_is_still_noticed(gateway, ollama):
    ollama.script(Reply([chunk(content="a"), ("sleep", 20), final_chunk()]))
    connection = socket.create_connection(("127.0.0.1", gateway.port))
    body = json.dumps(request_body()).encode()
    connection.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert ollama.chat_started.wait(5)
    connection.sendall(b"GET / HTTP/1.1\r\n")  # the start of the next request, sent early
    connection.close()
    wait_until(lambda: ollama.disconnects == 1, timeout=10, what="the proxy to close Ollama's request")
    wait_until(lambda: gateway.server.in_flight == 0, what="the generation slot to be freed")


def test_shutdown_ends_streams_and_requests_still_running_with_an_error(ollama, tmp_path):
    def slow(request):
        if request.get("stream") is not None and request["messages"][-1]["content"] == "stream me":
            return Reply([chunk(content="Hello")] + [("sleep", 0.05), chunk(content=" and")] * 600 + [final_chunk()])
        return text_reply(delay_before=30)

    ollama.responder = slow
    running = ProxyProcess(tmp_path, OLLAMA_HOST=ollama.url, SHUTDOWN_GRACE=0.5)
    try:
        answers = {}
        streaming = threading.Thread(target=lambda: answers.update(
            stream=running.gateway.stream(request_body("stream me"))))
        waiting = threading.Thread(target=lambda: answers.update(plain=running.gateway.messages(request_body())))
        streaming.start()
        waiting.start()
        wait_until(lambda: len(ollama.chats()) == 2, what="both requests to reach Ollama")
        running.process.send_signal(15)
        streaming.join(15)
        waiting.join(15)
        assert running.finish() == 0
    finally:
        running.kill()
    status, _, raw = answers["stream"]  # http.client read it to the terminating chunk
    events = parse_sse(raw)
    assert status == 200 and events[0][0] == "message_start" and events[-1][0] == "error"
    assert events[-1][1]["error"] == {"type": "overloaded_error", "message": "the proxy is shutting down"}
    status, _, error = answers["plain"]
    assert status == 529 and error["error"]["message"] == "the proxy is shutting down"
    assert "grace over with 2 request(s) still in flight" in running.output


###############################################################################
# Upstream replies: the chunk parser, and broken answers from Ollama
###############################################################################

def ollama_wire(steps, status=200):
    """A streamed /api/chat answer as Ollama puts it on the wire: every NDJSON line its own chunk,
    the last line and the closing chunk in one write."""
    head = b"HTTP/1.1 %d OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n" % status
    lines = [json.dumps(step).encode() + b"\n" for step in steps]
    return head + b"".join(b"%x\r\n%s\r\n" % (len(line), line) for line in lines) + b"0\r\n\r\n"


def dechunked_lines(wire):
    """The oracle: the body de-chunked in one go by RFC 9112's rules, split into its non-blank lines."""
    body, rest = b"", wire.split(b"\r\n\r\n", 1)[1]
    while True:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0].strip(), 16)
        if not size:
            break
        body, rest = body + rest[:size], rest[size + 2:]
    return [line for line in body.split(b"\n") if line.strip()]


class ScriptedSocket:
    """What UpstreamExchange reads from, in pieces chosen by the test; fileno() is a real socket's for poll()."""

    def __init__(self, pieces, fd):
        self.pieces = list(pieces)
        self.fd = fd

    def fileno(self):
        return self.fd

    def recv(self, size):
        return self.pieces.pop(0) if self.pieces else b""

    def close(self):
        pass


def read_in_pieces(wire, cuts, fd):
    exchange = proxy.UpstreamExchange(ScriptedSocket([wire[a:b] for a, b in zip([0] + cuts, cuts + [len(wire)])],
                                                     fd), "test")
    lines = []
    while not exchange.finished:
        exchange.receive()
        lines += exchange.pop_lines()
    return lines, exchange


def real_streams():
    text = text_reply("Hello! Ünïcode ✓ \"quoted\" \\ back\\slash and a long tail " * 3)
    thinking = Reply([chunk(thinking="let me think"), chunk(content="Answer")] + [final_chunk()])
    tools = tool_reply(("get_weather", {"city": "Paris", "nested": {"list": [1, 2, {"deep": True}]}}),
                       ("Bash", {"command": "ls -la\n"}), text="Checking.")
    streams = [ollama_wire([dict(step, model=MODEL) for step in reply.steps]) for reply in (text, thinking, tools)]
    # Legal shapes Ollama itself does not send: a chunk extension, lines split across chunks, several
    # lines in one chunk, a blank line, and a trailer field.
    lines = b"".join(json.dumps(chunk(content=str(n))).encode() + b"\n" for n in range(5)) + b"\n  \n"
    odd = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"7;name=value\r\n" + lines[:7] + b"\r\n"
           + b"%x\r\n" % (len(lines) - 7) + lines[7:] + b"\r\n" + b"0\r\nX-Trailer: 1\r\n\r\n")
    return streams + [odd]


def test_chunk_parser_matches_the_whole_body_on_random_splits_of_real_streams():
    """2,400 random splits of real streams, each read piece by piece, give the lines the whole body has."""
    import random
    rng = random.Random(14)
    streams = real_streams()
    expected = [dechunked_lines(wire) for wire in streams]
    assert all(expected)
    with socket.socket() as fd_holder:
        for _, wire in zip(range(4), streams):
            assert read_in_pieces(wire, [], fd_holder.fileno())[0] == dechunked_lines(wire)
        splits = 0
        deadline = time.monotonic() + 8  # a bound on a machine under load; 2,400 take well under a second alone
        while splits < 2400 and time.monotonic() < deadline:
            number = splits % len(streams)
            wire = streams[number]
            cuts = sorted(rng.sample(range(1, len(wire)), rng.choice([1, 2, 5, 20, min(200, len(wire) - 1)])))
            lines, exchange = read_in_pieces(wire, cuts, fd_holder.fileno())
            assert lines == expected[number], cuts
            assert exchange.finished and not exchange.unusable
            splits += 1
    assert splits >= 600


def test_an_answer_of_many_odd_chunks_is_split_once_not_once_per_chunk():
    """Chunks that are not one whole line each (here a blank start) leave the fast path for good:
    splitting the rest of the buffer again after each would take quadratic time."""
    body = b"".join(b"%x\r\n %s\n\r\n" % (len(json.dumps(chunk(content=str(n)))) + 2, json.dumps(chunk(content=str(n))).encode())
                    for n in range(2000))
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"
    with socket.socket() as fd_holder:
        exchange = proxy.UpstreamExchange(ScriptedSocket([wire], fd_holder.fileno()), "test")
        calls = []
        fast = exchange._whole_line_chunks
        exchange._whole_line_chunks = lambda *args: calls.append(args[1]) or fast(*args)
        lines = []
        while not exchange.finished:
            exchange.receive()
            lines += exchange.pop_lines()
    assert [json.loads(line)["message"]["content"] for line in lines] == [str(n) for n in range(2000)]
    assert len(calls) == 1


def test_a_burst_of_lines_reaches_the_client_whole_once_and_in_order(raw_ollama):
    """300 lines in one write, as after a stall: the stream's writes grow through the burst and a
    non-streamed reply takes the lines in runs; every piece arrives once, in order, either way."""
    pieces = [f" w{n}" for n in range(300)] + ["\u00e9 <b>&"]
    wire = ollama_wire(text_reply(pieces=pieces).steps)
    raw_ollama.script(wire, wire)
    with running_proxy(raw_ollama.url, CACHE="off") as gateway:
        status, _, raw = gateway.stream(request_body("burst"))
        events = parse_sse(raw)
        assert status == 200
        assert_valid_stream(events)
        assert [data["delta"]["text"] for name, data in events if name == "content_block_delta"] == pieces
        assert events[-2][1]["usage"]["output_tokens"] == len(pieces)
        status, _, body = gateway.messages(request_body("burst"))
        assert status == 200 and body["content"] == [{"type": "text", "text": "".join(pieces)}]


class RawOllama:
    """An Ollama whose /api/chat answers are raw bytes chosen by the test, to break HTTP on purpose.

    Each scripted answer is (bytes, then): then is None (keep the connection), "close", or a pair
    (seconds, more bytes) written after a pause. /api/show, /api/tags and /api/version answer as
    Ollama does."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.answers = queue.Queue()
        self.connections = 0
        self.written = threading.Event()  # a delayed write has left
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def script(self, *answers):
        for answer in answers:
            self.answers.put(answer if isinstance(answer, tuple) else (answer, None))

    def stop(self):
        self.stopped = True
        self.listener.close()

    def _accept(self):
        while not self.stopped:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    @staticmethod
    def _json(value):
        body = json.dumps(value).encode()
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    def _serve(self, connection):
        connection.settimeout(20)
        buffer = b""
        with connection:
            try:
                while True:
                    while b"\r\n\r\n" not in buffer:
                        data = connection.recv(65536)
                        if not data:
                            return
                        buffer += data
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), 0)
                    while len(buffer) < length:
                        buffer += connection.recv(65536)
                    buffer = buffer[length:]
                    path = head.split(b" ")[1]
                    if path == b"/api/show":
                        connection.sendall(self._json({"capabilities": ["completion", "tools"]}))
                    elif path == b"/api/tags":
                        connection.sendall(self._json({"models": [{"name": MODEL}]}))
                    elif path == b"/api/chat":
                        answer, then = self.answers.get_nowait() if not self.answers.empty() else (
                            ollama_wire(text_reply().steps), None)
                        connection.sendall(answer)
                        if then == "close":
                            return
                        if then is not None:
                            time.sleep(then[0])
                            connection.sendall(then[1])
                            self.written.set()
                    else:
                        connection.sendall(self._json({"version": "0.33.0"}))
            except OSError:
                return


@pytest.fixture
def raw_ollama():
    stand_in = RawOllama()
    yield stand_in
    stand_in.stop()


def assert_upstream_failure(status, body, *, stream_raw=None):
    """A 502 api_error envelope (or, for a stream, an api_error event), never 500, never the client's fault."""
    if stream_raw is not None and status == 200:
        events = parse_sse(stream_raw)
        assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "api_error", events[-1]
        return events[-1][1]["error"]["message"]
    assert status == 502, (status, body)
    assert body["error"]["type"] == "api_error"
    return body["error"]["message"]


@pytest.mark.parametrize("answer, wording", [
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12abc\r\n\r\n{}", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n{}", "Content-Length"),
    (b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere/\r\nContent-Length: 0\r\n\r\n", "HTTP 302"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", "malformed chunked"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{}\nXX", "CRLF"),
])
def test_broken_upstream_framing_is_a_502(raw_ollama, answer, wording):
    raw_ollama.script(answer, answer)
    with running_proxy(raw_ollama.url, OLLAMA_TIMEOUT=5, OLLAMA_FIRST_TOKEN_TIMEOUT=5) as gateway:
        status, _, body = gateway.messages(request_body())
        assert wording in assert_upstream_failure(status, body)
        status, _, raw = gateway.stream(request_body())
        assert wording in assert_upstream_failure(status, json.loads(raw) if status != 200 else None,
                                                  stream_raw=raw)
        assert gateway.messages(request_body())[0] == 200  # the proxy keeps serving, on a fresh connection


def test_an_upstream_line_over_the_bound_is_a_502_not_a_buffer(raw_ollama):
    size = (16 << 20) + (1 << 20)
    endless = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (size, b"x" * size)
    raw_ollama.script(endless)  # and then nothing: the line never ends
    with running_proxy(raw_ollama.url, OLLAMA_TIMEOUT=5, OLLAMA_FIRST_TOKEN_TIMEOUT=5) as gateway:
        status, _, body = gateway.messages(request_body())
        assert "longer than" in assert_upstream_failure(status, body)


def bash_call_answer(arguments):
    """Ollama's answer calling Bash with arguments written as given (raw JSON text)."""
    line = ('{"model":"%s","message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"Bash",'
            '"arguments":%s}}]},"done":false}\n' % (MODEL, arguments)).encode()
    final = json.dumps(final_chunk()).encode() + b"\n"
    return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
            % (len(line), line, len(final), final))


def test_tool_arguments_as_deep_as_allowed_come_back_in_the_next_request(raw_ollama):
    depth = proxy.MAX_UPSTREAM_NESTING
    arguments = '{"a":' * (depth - 1) + '{"b":1}' + "}" * (depth - 1)
    raw_ollama.script(bash_call_answer(arguments))
    tools = [{"name": "Bash", "input_schema": {"type": "object"}}]
    with running_proxy(raw_ollama.url) as gateway:
        status, _, body = gateway.messages(request_body(tools=tools))
        assert status == 200 and body["content"][0]["type"] == "tool_use", body
        call = body["content"][0]
        history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": [call]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "ok"}]}]
        status, _, body = gateway.messages(dict(request_body(tools=tools), messages=history))
        assert status == 200, body


@pytest.mark.parametrize("depth", [300, 5000])  # past MAX_UPSTREAM_NESTING; past Python's recursion limit
@pytest.mark.parametrize("stream", [False, True])
def test_tool_arguments_nested_too_deep_from_ollama_are_its_failure(raw_ollama, depth, stream):
    arguments = '{"a":' * depth + "1" + "}" * depth
    raw_ollama.script(bash_call_answer(arguments))
    tools = [{"name": "Bash", "input_schema": {"type": "object"}}]
    with running_proxy(raw_ollama.url) as gateway:
        if stream:
            status, _, raw = gateway.stream(request_body(tools=tools))
            message = assert_upstream_failure(status, json.loads(raw) if status != 200 else None, stream_raw=raw)
        else:
            status, _, body = gateway.messages(request_body(tools=tools))
            message = assert_upstream_failure(status, body)
        assert "nested" in message and "request body" not in message
        assert gateway.messages(request_body())[0] == 200


@pytest.mark.parametrize("extra", [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", b"\r\n", b""])
def test_an_upstream_connection_with_bytes_after_its_answer_is_not_reused(extra):
    settings = config(OLLAMA_HOST="127.0.0.1:9")
    pool = proxy.OllamaClient(settings, settings.ollama_hosts[0])
    ours, ollama = socket.socketpair()
    ours.setblocking(False)
    with ours, ollama:
        exchange = proxy.UpstreamExchange(ours, "test", pool)
        ollama.sendall(ollama_wire(text_reply("done").steps))
        lines = []
        while not exchange.finished:
            exchange.poller.poll(5000)
            exchange.receive()
            lines += exchange.pop_lines()
        assert json.loads(lines[-1])["done"]
        exchange.release()
        assert pool._idle == [ours]
        if extra:
            ollama.sendall(extra)  # arrives after the answer was complete, while the connection is kept
            select.select([ours], [], [], 5)
        assert pool._idle_connection() is (None if extra else ours)
        assert ours.fileno() == (-1 if extra else exchange.fd)


def test_bytes_after_a_complete_upstream_answer_close_that_connection(raw_ollama):
    stray = ollama_wire(text_reply("STRAY answer for nobody").steps)
    # The stray answer: in the same write as a complete one, then a moment after one.
    raw_ollama.script(ollama_wire(text_reply("first").steps) + stray,
                      (ollama_wire(text_reply("second").steps), (0.3, stray)))
    with running_proxy(raw_ollama.url, CACHE="on") as gateway:
        for expected in ("first", "second"):
            status, _, body = gateway.messages(request_body(expected))
            assert status == 200 and body["content"][0]["text"] == expected
        assert raw_ollama.written.wait(10)
        for attempt in range(3):
            # A connection goes back to the pool just after the client has its answer.
            wait_until(lambda: gateway.server.active_requests == 0, what="the connection to be kept")
            status, _, body = gateway.messages(request_body(f"next {attempt}"))
            assert status == 200 and body["content"][0]["text"] == "Hello! I am the stand-in model."
    assert raw_ollama.connections == 3  # the first two were closed, the third kept


WEATHER_TOOLS = [
    {"name": "get_weather", "description": "Weather in a city",
     "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    {"name": "get_time", "description": "Time in a zone",
     "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}},
]


def forced_reply(name, arguments):
    """What Ollama answers under a forced-call `format`: the JSON object as content, token by token."""
    text = json.dumps({"name": name, "arguments": arguments})
    return text_reply(text, pieces=[text[i:i + 5] for i in range(0, len(text), 5)])


def test_forced_tool_use_constrains_ollama_and_answers_with_tool_use(gateway, ollama):
    one = ollama_body(request_body(tools=WEATHER_TOOLS, tool_choice={"type": "tool", "name": "get_time"}),
                                    MODEL, config())
    assert one["format"] == {"type": "object", "required": ["name", "arguments"], "properties": {
        "name": {"type": "string", "enum": ["get_time"]}, "arguments": WEATHER_TOOLS[1]["input_schema"]}}
    assert [t["function"]["name"] for t in one["tools"]] == ["get_time"]
    both = ollama_body(request_body(tools=WEATHER_TOOLS, tool_choice={"type": "any"}), MODEL, config())
    assert both["format"]["properties"]["arguments"] == {"anyOf": [t["input_schema"] for t in WEATHER_TOOLS]}
    assert "format" not in ollama_body(request_body(tools=WEATHER_TOOLS), MODEL, config())
    for stream in (False, True):
        ollama.script(forced_reply("get_weather", {"city": "Paris"}))
        body = request_body(f"weather {stream}", tools=WEATHER_TOOLS, tool_choice={"type": "any"}, stream=stream)
        status, _, raw = gateway.call("POST", "/v1/messages", body)
        assert status == 200
        if stream:
            events = parse_sse(raw)
            assert_valid_stream(events)
            assert not [d for n, d in events if n == "content_block_delta" and d["delta"]["type"] == "text_delta"]
            starts = [d["content_block"] for n, d in events if n == "content_block_start"]
            assert [b["type"] for b in starts] == ["tool_use"] and starts[0]["name"] == "get_weather"
            assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
        else:
            message = json.loads(raw)
            assert message["stop_reason"] == "tool_use"
            assert [(b["type"], b["name"], b["input"]) for b in message["content"]] == \
                [("tool_use", "get_weather", {"city": "Paris"})]
        assert ollama.chats()[-1]["format"]["properties"]["name"]["enum"] == ["get_weather", "get_time"]
    status, _, error = gateway.messages(request_body(tools=WEATHER_TOOLS, tool_choice={"type": "tool", "name": "nope"}))
    assert status == 400 and "tool_choice.name" in error["error"]["message"]


def test_sdk_tool_choice_any_gets_a_tool_use(sdk, ollama):
    _, client = sdk
    ollama.script(forced_reply("get_time", {"zone": "UTC"}))
    reply = client.messages.create(model="claude-opus-5-5", max_tokens=200, tools=WEATHER_TOOLS,
                                tool_choice={"type": "any"}, messages=[{"role": "user", "content": "What time?"}])
    assert reply.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in reply.content] == [("tool_use", "get_time", {"zone": "UTC"})]


def test_calls_to_tools_not_offered_are_dropped_not_returned(gateway, ollama, caplog):
    caplog.set_level("WARNING", logger="simple_api_proxy")
    cases = [(dict(tools=WEATHER_TOOLS[:1]), ("Bash", {"command": "rm -rf /"})),
             (dict(tools=WEATHER_TOOLS, tool_choice={"type": "none"}), ("get_weather", {"city": "Oslo"}))]
    for stream in (False, True):
        for options, call in cases:
            ollama.script(tool_reply(call, text="Here you go."))
            status, headers, raw = gateway.call("POST", "/v1/messages", request_body(stream=stream, **options))
            message = proxy_message(raw, stream)
            assert status == 200 and message["stop_reason"] == "end_turn"
            assert message["content"] == [{"type": "text", "text": "Here you go."}]
            wait_until(lambda: any(headers["request-id"] in r.getMessage() and call[0] in r.getMessage()
                                   for r in caplog.records), what="the dropped call to be logged")


def proxy_message(raw, stream):
    """The message a response carries, rebuilt from its events for a stream."""
    if not stream:
        return json.loads(raw)
    events = parse_sse(raw)
    assert_valid_stream(events)
    content = []
    for name, data in events:
        if name == "content_block_start":
            content.append(dict(data["content_block"]))
        elif name == "content_block_delta" and data["delta"]["type"] == "text_delta":
            content[-1]["text"] += data["delta"]["text"]
    return {"stop_reason": events[-2][1]["delta"]["stop_reason"], "content": content}


def fault_wire(status, framing, fault, lines, stray):
    """A reply to /api/chat broken on purpose in one way (or none)."""
    body = b"".join(lines)
    head = b"HTTP/1.1 %d X\r\nContent-Type: application/x-ndjson\r\n" % status
    if framing == "chunked":
        chunks = [b"%x\r\n%s\r\n" % (len(line), line) for line in lines]
        if chunks and fault == "size off by one":
            chunks[0] = b"%x\r\n%s\r\n" % (len(lines[0]) + 1, lines[0])
        elif chunks and fault == "size as -1, +5 or 0x5":
            chunks[0] = b"-1\r\n" + chunks[0].split(b"\r\n", 1)[1]
        elif chunks and fault == "chunk extension":
            chunks[0] = chunks[0].replace(b"\r\n", b";ext=1\r\n", 1)
        elif chunks and fault == "no CRLF after the data":
            chunks[0] = chunks[0][:-2] + b"XX"
        end = b"" if fault == "no last chunk" else b"0\r\n\r\n"
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(chunks) + end + stray
    if framing == "length":
        length = {"length too long": b"%d" % (len(body) + 5), "length too short": b"%d" % max(0, len(body) - 5),
                  "length not a number": b"12abc"}.get(fault, b"%d" % len(body))
        return head + b"Content-Length: " + length + b"\r\n\r\n" + body + stray
    return head + b"\r\n" + body  # framed by the close


@pytest.fixture(scope="module")
def upstream_fuzz_target():
    if given is None:
        need(False, "hypothesis is not installed (pip install hypothesis)")
    stand_in = RawOllama()
    with running_proxy(stand_in.url, OLLAMA_TIMEOUT=2, OLLAMA_FIRST_TOKEN_TIMEOUT=2) as gateway:
        yield gateway, stand_in
    stand_in.stop()


if given:
    token_line = st.text(max_size=8).map(lambda text: json.dumps(chunk(content=text)).encode() + b"\n")
    deep_line = st.integers(150, 3000).map(lambda depth: (
        '{"message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"Bash","arguments":'
        + '{"a":' * depth + "1" + "}" * depth + "}}]},\"done\":false}\n").encode())
    garbage_line = st.binary(max_size=30).map(lambda raw: raw.replace(b"\n", b"") + b"\n")
    final_line = json.dumps(final_chunk()).encode() + b"\n"
    reply_lines = st.tuples(st.lists(st.one_of(token_line, token_line, deep_line, garbage_line), max_size=4),
                            st.booleans()).map(lambda drawn: drawn[0] + [final_line] * drawn[1])
    framing_fault = st.sampled_from([None, None, "size off by one", "size as -1, +5 or 0x5", "chunk extension",
                                     "no CRLF after the data", "no last chunk", "length too long",
                                     "length too short", "length not a number"])
    stray_bytes = st.sampled_from([b"", b"", b"\r\n", b"HTTP/1.1 200 OK\r\n",
                                   ollama_wire([chunk(content="STRAY"), final_chunk()])])

    @settings(max_examples=40, **FUZZ_SETTINGS)
    @given(status=st.sampled_from([200, 200, 200, 200, 301, 302, 307]),
           framing=st.sampled_from(["chunked", "chunked", "length", "close"]), fault=framing_fault,
           lines=reply_lines, stray=stray_bytes, stream=st.booleans(), keep=st.booleans())
    def test_fuzz_upstream_replies(upstream_fuzz_target, status, framing, fault, lines, stray, stream, keep):
        """Whatever Ollama sends, the client gets a 200 message, a 502/504 or an error event: never a
        500, never a 4xx blaming its request; and the next request is answered right, on a clean connection."""
        gateway, ollama = upstream_fuzz_target
        ollama.script((fault_wire(status, framing, fault, lines, stray), None if keep else "close"))
        tools = [{"name": "Bash", "input_schema": {"type": "object"}}]
        answer, _, raw = gateway.call("POST", "/v1/messages", request_body(tools=tools, stream=stream))
        assert b"Traceback" not in raw
        if answer == 200 and stream:
            events = parse_sse(raw)
            assert events[-1][0] in ("message_stop", "error"), events[-1]
            if events[-1][0] == "error":
                assert events[-1][1]["error"]["type"] in ("api_error", "timeout_error"), events[-1]
        elif answer == 200:
            assert json.loads(raw)["type"] == "message"
        else:
            assert answer in (502, 504), raw[:300]
            assert json.loads(raw)["error"]["type"] in ("api_error", "timeout_error")
        status, _, message = gateway.messages(request_body())
        assert status == 200 and message["content"][0]["text"] == "Hello! I am the stand-in model.", message


###############################################################################
# claude_start.sh, the laptop-side launcher
#
# The real script runs under bash. Stand-in `ssh` and `claude` executables sit
# first on PATH; the "remote" proxy is a stdlib HTTP server on a loopback port that
# the stand-in ssh reaches by running the remote command locally, and whose tunnel
# (`ssh -N -L L:127.0.0.1:R`) is a real TCP forwarder.
###############################################################################

LAUNCHER_SCRIPT = Path(__file__).resolve().parent / "claude_start.sh"
LAUNCHER_RUN_TIMEOUT = 20
LAUNCHER_MODEL_DEFAULT = "qwen2.5-coder:7b"

# Stand-in for Claude Code: records argv, the variables the launcher exports, and
# what /health answers through ANTHROPIC_BASE_URL while it runs.
_LAUNCHER_STUB_CLAUDE = r'''#!/usr/bin/env python3
import json, os, sys, time, urllib.error, urllib.request
names = sorted(k for k in os.environ
               if k.startswith(("ANTHROPIC_", "CLAUDE_CODE_"))
               or k in ("API_TIMEOUT_MS", "DISABLE_TELEMETRY", "BASH_MAX_OUTPUT_LENGTH", "MAX_MCP_OUTPUT_TOKENS"))
record = {"argv": sys.argv[1:], "env": {k: os.environ[k] for k in names}}
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    record["health"] = opener.open(os.environ["ANTHROPIC_BASE_URL"] + "/health", timeout=5).getcode()
except urllib.error.HTTPError as e:
    record["health"] = e.code
except Exception as e:
    record["health"] = repr(e)
with open(os.environ["STUB_CLAUDE_OUT"], "w") as f:
    json.dump(record, f)
time.sleep(float(os.environ.get("STUB_CLAUDE_SLEEP", "0")))
sys.exit(int(os.environ.get("STUB_CLAUDE_EXIT", "0")))
'''

# Stand-in for ssh. With a remote command it runs it here with `sh -c`; with
# -N -L L:127.0.0.1:R it forwards 127.0.0.1:L to 127.0.0.1:R until SIGTERM. A
# master connection (-M) and its control commands (-O) just succeed.
# Knobs: STUB_SSH_UNREACHABLE (exit 255 like a refused connection),
# STUB_SSH_TUNNEL_FAIL (tunnel exits 255), STUB_SSH_TUNNEL_BLACKHOLE (tunnel
# accepts and drops connections, so /health never answers).
_LAUNCHER_STUB_SSH = r'''#!/usr/bin/env python3
import json, os, signal, socket, subprocess, sys, threading
WITH_ARG = set("BbcDEeFIiJLlmOopQRSWw")
args = sys.argv[1:]
i, forward, no_command, kind = 0, None, False, "command"
while i < len(args):
    a = args[i]
    if a == "--":
        i += 1
        break
    if not a.startswith("-") or a == "-":
        break
    if a[1] in WITH_ARG:
        value = a[2:] if len(a) > 2 else args[i + 1]
        i += 1 if len(a) > 2 else 2
        if a[1] == "L":
            forward = value
        if a[1] == "O":
            kind = "control"
    else:
        no_command = no_command or "N" in a[1:]
        if "M" in a[1:]:
            kind = "master"
        i += 1
if kind == "command" and no_command:
    kind = "tunnel"
dest, command = args[i], " ".join(args[i + 1:])
record_dir = os.environ.get("STUB_SSH_RECORD_DIR")
if record_dir:
    with open(os.path.join(record_dir, "ssh-%d.json" % os.getpid()), "w") as f:
        json.dump({"pid": os.getpid(), "argv": sys.argv[1:], "dest": dest,
                   "command": command, "tunnel": kind == "tunnel", "kind": kind}, f)
if os.environ.get("STUB_SSH_UNREACHABLE"):
    sys.stderr.write("ssh: connect to host %s port 22: Connection refused\n" % dest)
    sys.exit(255)
if kind in ("master", "control"):
    sys.exit(0)
if not no_command:
    sys.exit(subprocess.call(["sh", "-c", command]))
lport, _, rport = forward.split(":")
if os.environ.get("STUB_SSH_TUNNEL_FAIL"):
    sys.stderr.write("channel_setup_fwd_listener_tcpip: cannot listen to port: %s\n"
                     "Could not request local forwarding.\n" % lport)
    sys.exit(255)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    listener.bind(("127.0.0.1", int(lport)))
except OSError as e:
    sys.stderr.write("bind [127.0.0.1]:%s: %s\n" % (lport, e))
    sys.exit(255)
listener.listen(16)

def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

while True:
    conn, _ = listener.accept()
    if os.environ.get("STUB_SSH_TUNNEL_BLACKHOLE"):
        conn.close()
        continue
    try:
        upstream = socket.create_connection(("127.0.0.1", int(rport)), timeout=5)
        upstream.settimeout(None)
    except OSError:
        conn.close()
        continue
    for a, b in ((conn, upstream), (upstream, conn)):
        threading.Thread(target=pump, args=(a, b), daemon=True).start()
'''

# Stand-in for simple_api_proxy.py: serves /health on $API_HOST:$API_PORT.
# STUB_PROXY_RECORD: file to write pid and environment to; STUB_PROXY_STATUS:
# status of /health; STUB_PROXY_SILENT: never listen (health never answers).
_LAUNCHER_STUB_PROXY = r'''#!/usr/bin/env python3
import http.server, json, os, time
if os.environ.get("STUB_PROXY_RECORD"):
    with open(os.environ["STUB_PROXY_RECORD"], "w") as f:
        json.dump({"pid": os.getpid(), "API_PORT": os.environ.get("API_PORT"),
                   "API_HOST": os.environ.get("API_HOST"),
                   "PROXY_API_KEY": os.environ.get("PROXY_API_KEY"), "env": dict(os.environ)}, f)
if os.environ.get("STUB_PROXY_SILENT"):
    while True:
        time.sleep(60)
status = int(os.environ.get("STUB_PROXY_STATUS", "200"))

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"status": "ok" if status == 200 else "degraded"}).encode()
        self.send_response(status if self.path == "/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(
    (os.environ.get("API_HOST", "127.0.0.1"), int(os.environ["API_PORT"])), Handler
).serve_forever()
'''


def _launcher_free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher_pid_alive(pid):
    """True while pid runs (a zombie counts as gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _launcher_wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _launcher_http_status(port):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        return opener.open("http://127.0.0.1:%d/health" % port, timeout=2).getcode()
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def _launcher_error_line(result):
    """The launcher failed with exactly one `claude_start: ` line on stderr."""
    assert result.returncode != 0, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("claude_start: "), result.stderr
    assert result.stdout == ""
    return lines[0]


def _launcher_all_prefixed(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert all(line.startswith("claude_start: ") for line in lines), result.stderr
    return lines


class _LauncherHealthHandler(http.server.BaseHTTPRequestHandler):
    """/health as the proxy answers it: 200, or 503 when Ollama is not reachable."""
    status = 200
    instance_id = "5eed1d0000000001"

    def do_GET(self):
        ollama = {"url": "http://localhost:11434", "reachable": self.status == 200, "version": "0.33.0",
                  "models": [LAUNCHER_MODEL_DEFAULT, "qwen3:32b"]}
        if self.status != 200:
            ollama = {"url": "http://localhost:11434", "reachable": False,
                      "error": "cannot reach Ollama at http://localhost:11434"}
        body = json.dumps({"status": "ok" if self.status == 200 else "degraded", "service": "simple_api_proxy",
                           "instance_id": self.instance_id, "ollama": ollama}).encode()
        self.send_response(self.status if self.path == "/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _LauncherSandbox:
    """Stub binaries, a hermetic PATH and environment, and cleanup of all processes."""

    def __init__(self, tmp_path):
        self.root = tmp_path
        self.home = tmp_path / "home"
        self.tmp = tmp_path / "tmp"
        self.records = tmp_path / "ssh-records"
        self.sysbin = tmp_path / "sysbin"
        self.sysbin_nocurl = tmp_path / "sysbin-nocurl"
        self.ssh_dir = tmp_path / "stub-ssh"
        self.claude_dir = tmp_path / "stub-claude"
        for d in (self.home, self.tmp, self.records, self.sysbin, self.sysbin_nocurl,
                  self.ssh_dir, self.claude_dir):
            d.mkdir()
        self.claude_out = tmp_path / "claude.json"
        self.stub_ssh = self._write(self.ssh_dir / "ssh", _LAUNCHER_STUB_SSH)
        self._write(self.claude_dir / "claude", _LAUNCHER_STUB_CLAUDE)
        self.stub_proxy = self._write(tmp_path / "stub_proxy.py", _LAUNCHER_STUB_PROXY)
        # Only the system binaries the launcher and the stubs need, so nothing
        # from the real machine (a real ssh or claude) can leak in.
        tools = {"python3": sys.executable}
        for name in ("bash", "sh", "env", "cat", "sleep", "readlink", "curl", "mktemp", "rm", "find", "wc",
                     "tr", "sha256sum"):
            found = shutil.which(name)
            if found:
                tools[name] = found
        for name, target in tools.items():
            (self.sysbin / name).symlink_to(target)
            if name != "curl":
                (self.sysbin_nocurl / name).symlink_to(target)
        self.procs = []
        self.servers = []

    @staticmethod
    def _write(path, text):
        path.write_text(text)
        path.chmod(0o755)
        return path

    def path(self, ssh=True, claude=True, curl=True):
        dirs = [self.ssh_dir] if ssh else []
        dirs += [self.claude_dir] if claude else []
        dirs.append(self.sysbin if curl else self.sysbin_nocurl)
        return os.pathsep.join(str(d) for d in dirs)

    def env(self, ssh=True, claude=True, curl=True, **extra):
        env = {
            "PATH": self.path(ssh, claude, curl),
            "HOME": str(self.home),
            "TMPDIR": str(self.tmp),
            "LANG": "C.UTF-8",
            "STUB_CLAUDE_OUT": str(self.claude_out),
            "STUB_SSH_RECORD_DIR": str(self.records),
        }
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, args, env):
        proc = subprocess.Popen(
            [str(LAUNCHER_SCRIPT), *args], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        self.procs.append(proc)
        try:
            out, err = proc.communicate(timeout=LAUNCHER_RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail("claude_start.sh timed out\nstdout:\n%s\nstderr:\n%s" % (out, err))
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def spawn(self, args, env=None):
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def remote_proxy(self, status=200):
        """The 'remote' proxy: an in-process /health server; returns its port."""
        handler = type("_LauncherHandler", (_LauncherHealthHandler,), {"status": status})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.servers.append(server)
        return server.server_address[1]

    def local_proxy(self, port, **extra):
        """A stand-in proxy already running on this machine (separate process)."""
        proc = self.spawn([sys.executable, str(self.stub_proxy)],
                          env=dict(os.environ, API_PORT=str(port), API_HOST="127.0.0.1", **extra))
        assert _launcher_wait_until(lambda: _launcher_http_status(port) is not None)
        return proc

    def claude_record(self):
        return json.loads(self.claude_out.read_text())

    def ssh_records(self, tunnel=None, kind=None):
        """What ssh ran: tunnel=True the tunnels, tunnel=False the box calls; kind picks any."""
        recs = [json.loads(p.read_text()) for p in sorted(self.records.glob("ssh-*.json"))]
        if tunnel is not None:
            kind = "tunnel" if tunnel else "command"
        return [r for r in recs if kind is None or r["kind"] == kind]

    def assert_no_tunnel_left(self):
        for rec in self.ssh_records(tunnel=True):
            assert _launcher_wait_until(lambda pid=rec["pid"]: not _launcher_pid_alive(pid), 3), rec

    def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        pids = [r["pid"] for r in self.ssh_records()]
        for record in self.root.glob("proxy-*.json"):
            with contextlib.suppress(ValueError, KeyError):
                pids.append(json.loads(record.read_text())["pid"])
        for pid in pids:
            if _launcher_pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def launcher_sandbox(tmp_path):
    sandbox = _LauncherSandbox(tmp_path)
    try:
        yield sandbox
    finally:
        sandbox.cleanup()


def _launcher_expected_env(port, model=LAUNCHER_MODEL_DEFAULT, context="32768",
                           output="8192", timeout="600000"):
    return {
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:%d" % port,
        "ANTHROPIC_MODEL": model,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
        "ANTHROPIC_DEFAULT_SONNET_MODEL": model,
        "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
        "ANTHROPIC_SMALL_FAST_MODEL": model,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_ATTRIBUTION_HEADER": "0",
        "DISABLE_TELEMETRY": "1",
        "API_TIMEOUT_MS": timeout,
        "CLAUDE_CODE_MAX_CONTEXT_TOKENS": context,
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": output,
        "CLAUDE_CODE_FILE_READ_MAX_OUTPUT_TOKENS": str(int(context) // 4),
        "MAX_MCP_OUTPUT_TOKENS": str(int(context) // 4),
        "BASH_MAX_OUTPUT_LENGTH": str(int(context) * 3 // 4),
    }


def test_launcher_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is not installed (required under CI=true)")
        pytest.skip("shellcheck is not installed")
    result = subprocess.run([shellcheck, LAUNCHER_SCRIPT.name], cwd=LAUNCHER_SCRIPT.parent,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_launcher_is_executable_bash_script():
    assert os.access(LAUNCHER_SCRIPT, os.X_OK)
    first = LAUNCHER_SCRIPT.read_text().splitlines()[0]
    assert first == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in LAUNCHER_SCRIPT.read_text()


def test_launcher_help_lists_every_flag_and_variable(launcher_sandbox):
    for flag in ("-h", "--help"):
        result = launcher_sandbox.run([flag], launcher_sandbox.env())
        assert result.returncode == 0, result.stderr
        for word in ("--ssh", "--ssh-port", "--remote-port", "--local-port", "--local",
                     "--check", "--model", "--config", "--help", "--", "--lean",
                     "CLAUDE_START_SSH", "CLAUDE_START_SSH_PORT", "CLAUDE_START_REMOTE_PORT",
                     "CLAUDE_START_LOCAL_PORT", "CLAUDE_START_MODEL",
                     "CLAUDE_START_CONTEXT_TOKENS", "CLAUDE_START_MAX_OUTPUT_TOKENS",
                     "API_TIMEOUT_MS", "PROXY_API_KEY", "CLAUDE_START_PROXY_SCRIPT",
                     "CLAUDE_START_HEALTH_WAIT", "CLAUDE_START_CONFIG",
                     "claude_start.env", LAUNCHER_MODEL_DEFAULT, "--deploy", "--stop", "--all",
                     "CLAUDE_START_OLLAMA_INSTALL", "CLAUDE_START_INSTALL_TIMEOUT", "CLAUDE_START_OLLAMA_WAIT",
                     "CLAUDE_START_PULL_TIMEOUT", "REDIS_URL", "OLLAMA_NUM_CTX", "MODEL_MAP"):
            assert word in result.stdout, word
        assert "three quarters of it\nin characters for command output (BASH_MAX_OUTPUT_LENGTH)" in result.stdout
    assert not launcher_sandbox.ssh_records()


def test_launcher_passes_on_every_proxy_setting_but_the_ones_it_decides(launcher_sandbox):
    text = LAUNCHER_SCRIPT.read_text()
    found = re.search(r'^readonly PROXY_SETTINGS="([^"]*)"', text, re.M)
    launcher_settings = found.group(1).replace("\\\n", " ").split()
    owned = {"API_HOST", "API_PORT", "LOG_FILE"}
    assert launcher_settings == [name for name, *_ in proxy.SETTINGS if name not in owned]
    for name in owned:
        assert re.search(r"(?<![A-Z_])%s=" % name, text), "the launcher no longer sets %s itself" % name
    result = launcher_sandbox.run(["--help"], launcher_sandbox.env())
    assert all(name in result.stdout for name in launcher_settings)


_BOX_RULES_CHECK = r'''
import json, re, sys
source = re.search(r"^BOX_PY=\$\(cat <<'PY'\n(.*?)^PY\n", open(sys.argv[1]).read(), re.S | re.M).group(1)
box = {"__name__": "box", "BOX_SOURCE": source}
exec(compile(source, "box.py", "exec"), box)
urls = [box["ollama_url"]({"OLLAMA_HOST": value}) for value in json.loads(sys.argv[2])]
print(json.dumps({"from_proxy": box["proxy_rules"]() is not None, "urls": urls,
                  "installed": [box["installed"]("llama3.2", ["llama3.2:latest"]),
                                box["installed"]("llama3.2", ["llama3.2:3b"])]}))
'''


@pytest.mark.parametrize("with_proxy_copy", [True, False])
def test_box_program_reads_ollama_host_by_the_proxys_rules(tmp_path, with_proxy_copy):
    hosts = {"gpu": "http://gpu:11434", "http://gpu": "http://gpu:80", "https://gpu": "https://gpu:443",
             "0.0.0.0": "http://127.0.0.1:11434", "[::1]:11500": "http://[::1]:11500",
             "http://127.0.0.1:11500/,http://other:11434": "http://127.0.0.1:11500"}
    folder = tmp_path / ".simple_api_proxy"
    folder.mkdir()
    if with_proxy_copy:
        shutil.copy(HERE / "simple_api_proxy.py", folder)
    result = subprocess.run([sys.executable, "-c", _BOX_RULES_CHECK, str(LAUNCHER_SCRIPT), json.dumps(list(hosts))],
                            capture_output=True, text=True, timeout=60, env=dict(os.environ, HOME=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer == {"from_proxy": with_proxy_copy, "urls": list(hosts.values()), "installed": [True, False]}
    for value in hosts:
        assert proxy.parse_ollama_hosts(value)[0].url == hosts[value]


def test_readme_lists_what_the_launcher_sets_for_claude_code():
    run_claude = re.search(r"^run_claude\(\) \{\n(.*?)^\}", LAUNCHER_SCRIPT.read_text(), re.S | re.M).group(1)
    exported = set(re.findall(r"^\s*export (\w+)=", run_claude, re.M))
    unset = set(re.findall(r"^\s*unset (\w+)", run_claude, re.M))
    readme = (HERE / "README.md").read_text()
    by_hand = readme.split("**Set it up by hand** instead:", 1)[1].split("```", 2)[1]
    assert exported and unset
    assert exported == set(re.findall(r"\b([A-Z][A-Z0-9_]+)=", by_hand))
    assert unset == set(re.findall(r"^unset (\w+)", by_hand, re.M))
    listed = readme.split("Before starting Claude Code it exports", 1)[1].split("\n\n", 1)[0]
    listed += readme.split("**Output limits and `--lean`.**", 1)[1].split("\n\n", 1)[0]
    families = {"ANTHROPIC_DEFAULT_%s_MODEL" % family for family in ("HAIKU", "SONNET", "OPUS")}
    assert {name for name in exported | unset if name not in listed} == families
    assert "ANTHROPIC_DEFAULT_{HAIKU,SONNET,OPUS}_MODEL" in listed


def test_launcher_remote_happy_path(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    local = _launcher_free_port()
    # Unrelated processes that look like ssh tunnels must survive the run.
    other_port = _launcher_free_port()
    other_tunnel = sb.spawn([str(sb.stub_ssh), "-N", "-L", "%d:127.0.0.1:%d" % (other_port, remote),
                             "other@host"], env=dict(os.environ, PATH=sb.path()))
    lookalike = sb.spawn(["bash", "-c", "exec -a ssh sleep 60"])
    assert _launcher_wait_until(lambda: _launcher_http_status(other_port) == 200)

    result = sb.run(["--ssh", "me@gpu-box", "--remote-port", str(remote), "--local-port", str(local),
                     "--", "-p", "hello world", "--verbose"],
                    sb.env(STUB_CLAUDE_EXIT=7))

    assert result.returncode == 7, result.stderr
    _launcher_all_prefixed(result)
    rec = sb.claude_record()
    assert rec["argv"] == ["--model", LAUNCHER_MODEL_DEFAULT, "-p", "hello world", "--verbose"]
    assert rec["health"] == 200  # the tunnel worked while claude ran
    env = dict(rec["env"])
    token = env.pop("ANTHROPIC_AUTH_TOKEN")
    assert token
    assert env == _launcher_expected_env(local)

    box_calls = sb.ssh_records(tunnel=False)
    assert len(box_calls) == 1
    assert box_calls[0]["dest"] == "me@gpu-box"
    assert "python3" in box_calls[0]["command"]
    # Box calls share one connection (ControlMaster), closed at the end; the tunnel has its own.
    master, = sb.ssh_records(kind="master")
    control = master["argv"][master["argv"].index("-S") + 1]
    assert box_calls[0]["argv"][box_calls[0]["argv"].index("-S") + 1] == control
    assert [r["argv"][r["argv"].index("-O") + 1] for r in sb.ssh_records(kind="control")] == ["exit"]
    assert "keeps running (and billing)" in result.stderr and "--stop --all" in result.stderr
    tunnels = sb.ssh_records(tunnel=True)
    assert len(tunnels) == 1
    argv = tunnels[0]["argv"]
    assert "-N" in argv
    assert argv[argv.index("-L") + 1] == "%d:127.0.0.1:%d" % (local, remote)
    options = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    assert "ExitOnForwardFailure=yes" in options
    assert "StrictHostKeyChecking=accept-new" in options
    assert any(o.startswith("ServerAliveInterval=") for o in options)
    assert tunnels[0]["dest"] == "me@gpu-box"
    assert "-p" not in argv  # no --ssh-port: ~/.ssh/config decides

    sb.assert_no_tunnel_left()
    assert other_tunnel.poll() is None and lookalike.poll() is None
    assert _launcher_http_status(other_port) == 200


def test_launcher_ssh_port_and_model_flags(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    local = _launcher_free_port()
    result = sb.run(["--ssh=me@gpu-box", "--ssh-port", "2222", "--model", "qwen3:32b",
                     "--remote-port", str(remote), "--local-port", str(local)], sb.env())
    assert result.returncode == 0, result.stderr
    assert sb.claude_record()["argv"] == ["--model", "qwen3:32b"]
    assert sb.claude_record()["env"]["ANTHROPIC_DEFAULT_OPUS_MODEL"] == "qwen3:32b"
    for rec in sb.ssh_records():
        argv = rec["argv"]
        assert argv[argv.index("-p") + 1] == "2222"
    sb.assert_no_tunnel_left()


def test_launcher_picks_next_free_local_port(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        asked = held.getsockname()[1]
        result = sb.run(["--ssh", "me@gpu-box", "--remote-port", str(remote),
                         "--local-port", str(asked)], sb.env())
    assert result.returncode == 0, result.stderr
    used = int(sb.claude_record()["env"]["ANTHROPIC_BASE_URL"].rsplit(":", 1)[1])
    assert asked < used <= asked + 20
    assert "local port %d is in use; using %d" % (asked, used) in result.stderr
    argv = sb.ssh_records(tunnel=True)[0]["argv"]
    assert argv[argv.index("-L") + 1] == "%d:127.0.0.1:%d" % (used, remote)
    assert sb.claude_record()["health"] == 200
    sb.assert_no_tunnel_left()


def test_launcher_remote_503_warns_and_continues(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy(status=503)
    local = _launcher_free_port()
    result = sb.run(["--ssh", "me@gpu-box", "--remote-port", str(remote), "--local-port", str(local)],
                    sb.env())
    assert result.returncode == 0, result.stderr
    warnings = [line for line in _launcher_all_prefixed(result) if "Ollama" in line]
    assert len(warnings) == 1 and "not reachable from the proxy" in warnings[0], result.stderr
    assert sb.claude_record()["health"] == 503
    sb.assert_no_tunnel_left()


def test_launcher_health_checks_fall_back_to_python_without_curl(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    local = _launcher_free_port()
    result = sb.run(["--ssh", "me@gpu-box", "--remote-port", str(remote), "--local-port", str(local)],
                    sb.env(curl=False))
    assert result.returncode == 0, result.stderr
    assert sb.claude_record()["health"] == 200
    sb.assert_no_tunnel_left()


def test_launcher_signal_while_claude_runs_still_closes_tunnel(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    local = _launcher_free_port()
    env = sb.env(STUB_CLAUDE_SLEEP=1)
    proc = subprocess.Popen([str(LAUNCHER_SCRIPT), "--ssh", "me@gpu-box", "--remote-port", str(remote),
                             "--local-port", str(local)], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    sb.procs.append(proc)
    assert _launcher_wait_until(sb.claude_out.exists, 15)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=LAUNCHER_RUN_TIMEOUT)
    assert proc.returncode == 143, err
    sb.assert_no_tunnel_left()


def test_launcher_local_uses_running_proxy_and_leaves_it(launcher_sandbox):
    sb = launcher_sandbox
    port = _launcher_free_port()
    running = sb.local_proxy(port)
    result = sb.run(["--local", "--local-port", str(port), "--", "--continue"],
                    sb.env(ssh=False, CLAUDE_START_PROXY_SCRIPT=sb.root / "missing.py"))
    assert result.returncode == 0, result.stderr
    assert "already running" in result.stderr
    rec = sb.claude_record()
    assert rec["argv"] == ["--model", LAUNCHER_MODEL_DEFAULT, "--continue"]
    assert rec["env"]["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:%d" % port
    assert rec["health"] == 200
    time.sleep(0.2)
    assert running.poll() is None
    assert _launcher_http_status(port) == 200
    assert not sb.ssh_records()


def test_launcher_lean_leaves_out_tools_and_user_output_limits_win(launcher_sandbox):
    sb = launcher_sandbox
    port = _launcher_free_port()
    running = sb.local_proxy(port)
    result = sb.run(["--local", "--local-port", str(port), "--lean", "--", "-p", "hi"],
                    sb.env(ssh=False, CLAUDE_START_PROXY_SCRIPT=sb.root / "missing.py",
                           CLAUDE_CODE_FILE_READ_MAX_OUTPUT_TOKENS="5000"))
    assert result.returncode == 0, result.stderr
    rec = sb.claude_record()
    argv = rec["argv"]
    assert argv[:3] == ["--model", LAUNCHER_MODEL_DEFAULT, "--disallowedTools"] and argv[4:] == ["-p", "hi"]
    left_out = argv[3].split(",")
    assert {"Agent", "Workflow", "ToolSearch", "WebFetch", "NotebookEdit"} <= set(left_out)
    assert not {"Bash", "Read", "Edit", "Write"} & set(left_out)
    assert rec["env"]["CLAUDE_CODE_FILE_READ_MAX_OUTPUT_TOKENS"] == "5000"
    assert rec["env"]["MAX_MCP_OUTPUT_TOKENS"] == "8192"
    assert running.poll() is None


def test_launcher_local_starts_proxy_and_stops_it(launcher_sandbox):
    sb = launcher_sandbox
    port = _launcher_free_port()
    record = sb.root / "proxy-started.json"
    result = sb.run(["--local", "--local-port", str(port)],
                    sb.env(ssh=False, CLAUDE_START_PROXY_SCRIPT=sb.stub_proxy,
                           STUB_PROXY_RECORD=record, PROXY_API_KEY="sekrit"))
    assert result.returncode == 0, result.stderr
    started = json.loads(record.read_text())
    assert started["API_PORT"] == str(port)
    assert started["API_HOST"] == "127.0.0.1"
    assert started["PROXY_API_KEY"] == "sekrit"
    rec = sb.claude_record()
    assert rec["health"] == 200
    env = dict(rec["env"])
    assert env.pop("ANTHROPIC_AUTH_TOKEN") == "sekrit"
    assert env == _launcher_expected_env(port)
    assert (sb.tmp / ("simple_api_proxy.%d.log" % port)).exists()
    assert _launcher_wait_until(lambda: not _launcher_pid_alive(started["pid"]), 5)
    assert _launcher_http_status(port) is None


def test_launcher_local_proxy_gets_the_proxy_settings_of_the_config_file(launcher_sandbox):
    sb = launcher_sandbox
    port = _launcher_free_port()
    record = sb.root / "proxy-started.json"
    config = sb.home / ".config" / "simple_api_proxy" / "claude_start.env"
    config.parent.mkdir(parents=True)
    config.write_text("DEFAULT_MAX_TOKENS=2048\nOLLAMA_WARMUP=off\nALLOWED_ORIGINS=https://app.example\n")
    result = sb.run(["--local", "--local-port", str(port)],
                    sb.env(ssh=False, CLAUDE_START_PROXY_SCRIPT=sb.stub_proxy, STUB_PROXY_RECORD=record))
    assert result.returncode == 0, result.stderr
    assert "unknown setting" not in result.stderr
    started = json.loads(record.read_text())
    env = started["env"]
    assert (env.get("DEFAULT_MAX_TOKENS"), env.get("OLLAMA_WARMUP"), env.get("ALLOWED_ORIGINS")) == \
        ("2048", "off", "https://app.example")


def test_launcher_local_proxy_that_never_answers(launcher_sandbox):
    sb = launcher_sandbox
    port = _launcher_free_port()
    record = sb.root / "proxy-silent.json"
    result = sb.run(["--local", "--local-port", str(port)],
                    sb.env(ssh=False, CLAUDE_START_PROXY_SCRIPT=sb.stub_proxy,
                           STUB_PROXY_RECORD=record, STUB_PROXY_SILENT=1,
                           CLAUDE_START_HEALTH_WAIT=1))
    assert result.returncode != 0
    line = _launcher_all_prefixed(result)[-1]
    assert "did not answer" in line and "simple_api_proxy.%d.log" % port in line
    assert not sb.claude_out.exists()
    pid = json.loads(record.read_text())["pid"]
    assert _launcher_wait_until(lambda: not _launcher_pid_alive(pid), 5)


def test_launcher_local_missing_proxy_script(launcher_sandbox):
    sb = launcher_sandbox
    missing = sb.root / "nope" / "simple_api_proxy.py"
    result = sb.run(["--local", "--local-port", str(_launcher_free_port())],
                    sb.env(ssh=False, CLAUDE_START_PROXY_SCRIPT=missing))
    line = _launcher_error_line(result)
    assert str(missing) in line and "CLAUDE_START_PROXY_SCRIPT" in line


def test_launcher_check_all_ok(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    local = _launcher_free_port()
    result = sb.run(["--check", "--ssh", "me@gpu-box", "--remote-port", str(remote),
                     "--local-port", str(local)], sb.env())
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    names = ["ssh reachable", "remote proxy health", "ollama from proxy", "model", "tunnel", "local health",
             "claude on PATH"]
    assert [line.split(":")[0] for line in lines] == names
    assert all(line.split(":", 1)[1].split()[0] == "ok" for line in lines), result.stdout
    assert not sb.claude_out.exists()
    assert len(sb.ssh_records(tunnel=True)) == 1
    sb.assert_no_tunnel_left()


def test_launcher_check_reports_failed_hops(launcher_sandbox):
    sb = launcher_sandbox
    down = _launcher_free_port()  # nothing listens there
    result = sb.run(["--check", "--ssh", "me@gpu-box", "--remote-port", str(down)],
                    sb.env(claude=False))
    assert result.returncode == 1
    status = {line.split(":")[0]: line.split(":", 1)[1].split()[0]
              for line in result.stdout.splitlines()}
    assert status == {"ssh reachable": "ok", "remote proxy health": "failed",
                      "tunnel": "failed", "local health": "failed", "claude on PATH": "failed"}
    assert "python3 simple_api_proxy.py" in result.stdout
    assert not sb.ssh_records(tunnel=True)


def test_launcher_check_tunnel_refused(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    result = sb.run(["--check", "--ssh", "me@gpu-box", "--remote-port", str(remote),
                     "--local-port", str(_launcher_free_port())],
                    sb.env(STUB_SSH_TUNNEL_FAIL=1))
    assert result.returncode == 1
    assert "tunnel:" in result.stdout
    status = {line.split(":")[0]: line.split(":", 1)[1].split()[0]
              for line in result.stdout.splitlines()}
    assert status["remote proxy health"] == "ok"
    assert status["tunnel"] == "failed"
    assert status["claude on PATH"] == "ok"
    sb.assert_no_tunnel_left()


def test_launcher_check_local(launcher_sandbox):
    sb = launcher_sandbox
    port = _launcher_free_port()
    running = sb.local_proxy(port)
    result = sb.run(["--check", "--local", "--local-port", str(port)], sb.env(ssh=False))
    assert result.returncode == 0, result.stdout + result.stderr
    status = {line.split(":")[0]: line.split(":", 1)[1].split()[0]
              for line in result.stdout.splitlines()}
    assert status == {"ssh reachable": "skipped", "remote proxy health": "skipped",
                      "tunnel": "skipped", "local health": "ok", "claude on PATH": "ok"}
    assert running.poll() is None


def test_launcher_config_precedence(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    file_port, env_port, flag_port = (_launcher_free_port() for _ in range(3))
    config = sb.home / ".config" / "simple_api_proxy" / "claude_start.env"
    config.parent.mkdir(parents=True)
    config.write_text(
        "# settings for claude_start.sh\n"
        "\n"
        "CLAUDE_START_SSH=file@gpu-box\n"
        "CLAUDE_START_REMOTE_PORT=%d\n"
        "CLAUDE_START_LOCAL_PORT=%d\n"
        'export CLAUDE_START_MODEL="file-model"\n'
        "CLAUDE_START_CONTEXT_TOKENS = 1111\n"
        "CLAUDE_START_MAX_OUTPUT_TOKENS='3333'\n"
        "API_TIMEOUT_MS=1234\n" % (remote, file_port)
    )
    result = sb.run(["--model", "flag-model", "--local-port", str(flag_port)],
                    sb.env(CLAUDE_START_MODEL="env-model", CLAUDE_START_CONTEXT_TOKENS=2222,
                           CLAUDE_START_LOCAL_PORT=env_port, API_TIMEOUT_MS=5678))
    assert result.returncode == 0, result.stderr
    rec = sb.claude_record()
    assert rec["argv"] == ["--model", "flag-model"]
    env = dict(rec["env"])
    env.pop("ANTHROPIC_AUTH_TOKEN")
    assert env == _launcher_expected_env(flag_port, model="flag-model", context="2222",
                                         output="3333", timeout="5678")
    assert {r["dest"] for r in sb.ssh_records()} == {"file@gpu-box"}

    # Without the flag the environment's port wins over the file's.
    sb.claude_out.unlink()
    result = sb.run([], sb.env(CLAUDE_START_LOCAL_PORT=env_port))
    assert result.returncode == 0, result.stderr
    assert sb.claude_record()["env"]["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:%d" % env_port
    assert sb.claude_record()["argv"] == ["--model", "file-model"]
    sb.assert_no_tunnel_left()


def test_launcher_config_flag_beats_config_variable(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    from_env = sb.root / "env.env"
    from_flag = sb.root / "flag.env"
    from_env.write_text("CLAUDE_START_MODEL=env-file-model\n")
    from_flag.write_text("CLAUDE_START_MODEL=flag-file-model\nNOT_A_SETTING=1\n")
    result = sb.run(["--config", str(from_flag), "--ssh", "me@gpu-box", "--remote-port", str(remote),
                     "--local-port", str(_launcher_free_port())],
                    sb.env(CLAUDE_START_CONFIG=from_env))
    assert result.returncode == 0, result.stderr
    assert sb.claude_record()["argv"] == ["--model", "flag-file-model"]
    assert "unknown setting 'NOT_A_SETTING'" in result.stderr
    sb.assert_no_tunnel_left()


def test_launcher_proxy_api_key_becomes_auth_token(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    result = sb.run(["--ssh", "me@gpu-box", "--remote-port", str(remote),
                     "--local-port", str(_launcher_free_port())],
                    sb.env(PROXY_API_KEY="key-123", ANTHROPIC_API_KEY="sk-real-anthropic-key"))
    assert result.returncode == 0, result.stderr
    env = sb.claude_record()["env"]
    assert env["ANTHROPIC_AUTH_TOKEN"] == "key-123"
    assert "ANTHROPIC_API_KEY" not in env
    sb.assert_no_tunnel_left()


@pytest.mark.parametrize(
    "case",
    ["no_ssh", "no_claude", "no_host", "ssh_unreachable", "remote_down", "tunnel_refused",
     "health_never"],
)
def test_launcher_failure_modes(launcher_sandbox, case):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    args = ["--ssh", "me@gpu-box", "--remote-port", str(remote),
            "--local-port", str(_launcher_free_port())]
    env = sb.env()
    expected = {
        "no_ssh": ["ssh not found", "--local"],
        "no_claude": ["claude not found", "install Claude Code"],
        "no_host": ["no ssh host", "--ssh", "CLAUDE_START_SSH"],
        "ssh_unreachable": ["cannot reach me@gpu-box", "Connection refused"],
        "remote_down": ["remote proxy down", "python3 simple_api_proxy.py"],
        "tunnel_refused": ["ssh tunnel", "exited (code 255)", "Could not request local forwarding"],
        "health_never": ["did not answer", "CLAUDE_START_HEALTH_WAIT"],
    }[case]
    if case == "no_ssh":
        env = sb.env(ssh=False)
    elif case == "no_claude":
        env = sb.env(claude=False)
    elif case == "no_host":
        args = args[2:]
    elif case == "ssh_unreachable":
        env = sb.env(STUB_SSH_UNREACHABLE=1)
    elif case == "remote_down":
        args[3] = str(_launcher_free_port())
    elif case == "tunnel_refused":
        env = sb.env(STUB_SSH_TUNNEL_FAIL=1)
    elif case == "health_never":
        env = sb.env(STUB_SSH_TUNNEL_BLACKHOLE=1, CLAUDE_START_HEALTH_WAIT=1)
    started = time.monotonic()
    result = sb.run(args, env)
    line = _launcher_error_line(result)
    for word in expected:
        assert word in line, line
    assert not sb.claude_out.exists()
    sb.assert_no_tunnel_left()
    assert time.monotonic() - started < 15
    if case in ("no_ssh", "no_claude", "no_host"):
        assert not sb.ssh_records()


@pytest.mark.parametrize(
    "args,word",
    [(["--bogus"], "unknown option"), (["--local-port", "http"], "local port"),
     (["--remote-port", "70000"], "remote port"), (["--ssh"], "needs a value"),
     (["claude-arg"], "after --")],
)
def test_launcher_usage_errors(launcher_sandbox, args, word):
    sb = launcher_sandbox
    result = sb.run(args, sb.env(CLAUDE_START_SSH="me@gpu-box"))
    assert result.returncode == 2
    assert word in _launcher_error_line(result)
    assert not sb.ssh_records()


def test_launcher_missing_explicit_config_fails(launcher_sandbox):
    sb = launcher_sandbox
    result = sb.run(["--local"], sb.env(CLAUDE_START_CONFIG=sb.root / "missing.env"))
    line = _launcher_error_line(result)
    assert "missing.env" in line and "not found" in line


###############################################################################
# claude_start.sh --deploy against a real OpenSSH server
#
# Each "box" is a real sshd on a free loopback port, in a private mount namespace
# where /root is a temporary folder (the real home is never touched), with its own
# host key and an authorized key. The box's PATH (from ~/.ssh/environment) holds a
# stand-in `ollama` command that serves Ollama's API on the box's own port. The
# laptop side is the launcher with the real ssh client (through `-F` and a private
# config) and, where an answer matters, the real Claude Code CLI.
###############################################################################

_BOX_OLLAMA_COMMAND = r'''#!/usr/bin/env python3
"""Stand-in `ollama` command: `serve` answers Ollama's HTTP API on $OLLAMA_HOST with one text reply;
`list`, `pull`, `ps` and `-v` talk to it as the real CLI does. State in ~/.standin-ollama: models (one
name a line), reply (the answer's text), delay_once (seconds the next chat waits), chats (one line
per chat)."""
import http.server, json, os, sys, time, urllib.request

STATE = os.path.expanduser("~/.standin-ollama")
HOST = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434").replace("http://", "")


def state(name, default=""):
    try:
        with open(os.path.join(STATE, name)) as f:
            return f.read()
    except OSError:
        return default


def models():
    return state("models").split()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_json(self, status, value):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def start_stream(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def chunk(self, value):
        line = json.dumps(value).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.wfile.flush()

    def do_GET(self):
        if self.path == "/api/version":
            return self.send_json(200, {"version": "0.33.0"})
        if self.path == "/api/tags":
            return self.send_json(200, {"models": [{"name": m, "model": m, "size": 4683087332} for m in models()]})
        if self.path == "/api/ps":
            return self.send_json(200, {"models": []})
        self.send_json(404, {"error": "404 page not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        model = body.get("model") or body.get("name")
        if self.path == "/api/show":
            if model not in models():
                return self.send_json(404, {"error": "model '%s' not found" % model})
            return self.send_json(200, {"capabilities": ["completion", "tools"], "details": {"family": "qwen2"},
                                        "model_info": {}})
        if self.path == "/api/pull":
            self.start_stream()
            self.chunk({"status": "pulling manifest"})
            for done in (0, 2341543666, 4683087332):
                self.chunk({"status": "pulling 6a0746a1ec1a", "digest": "sha256:6a07", "total": 4683087332,
                            "completed": done})
            with open(os.path.join(STATE, "models"), "a") as f:
                f.write(model + "\n")
            self.chunk({"status": "success"})
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path != "/api/chat" or model not in models():
            return self.send_json(404, {"error": "model '%s' not found" % model})
        with open(os.path.join(STATE, "chats"), "a") as f:
            f.write(model + "\n")
        delay = state("delay_once").strip()
        if delay:
            os.remove(os.path.join(STATE, "delay_once"))
            time.sleep(float(delay))
        self.start_stream()
        base = {"model": model, "created_at": "2026-05-10T08:06:48.123456789Z"}
        self.chunk(dict(base, message={"role": "assistant", "content": state("reply", "Hello from the box.")},
                        done=False))
        self.chunk(dict(base, message={"role": "assistant", "content": ""}, done=True, done_reason="stop",
                        prompt_eval_count=26, eval_count=7))
        self.wfile.write(b"0\r\n\r\n")


def call(path, body=None):
    request = urllib.request.Request("http://" + HOST + path, data=json.dumps(body).encode() if body else None)
    try:
        return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10)
    except OSError:
        sys.exit("Error: could not connect to ollama app, is it running?")


args = sys.argv[1:]
if args[:1] == ["serve"]:
    host, _, port = HOST.rpartition(":")
    server = http.server.ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
    server.daemon_threads = True
    sys.stderr.write("Listening on %s (version 0.33.0)\n" % HOST)
    sys.stderr.flush()
    server.serve_forever()
elif args[:1] == ["-v"]:
    print("ollama version is 0.33.0")
elif args[:1] == ["list"]:
    print("NAME                ID              SIZE      MODIFIED")
    for m in json.load(call("/api/tags"))["models"]:
        print("%-20sdae161e27b0e    4.7 GB    2 days ago" % m["name"])
elif args[:1] == ["ps"]:
    call("/api/ps")
    print("NAME    ID    SIZE    PROCESSOR    UNTIL")
elif args[:1] == ["pull"] and len(args) == 2:
    for line in call("/api/pull", {"model": args[1]}):
        print(json.loads(line).get("status"))
else:
    sys.exit("Error: unknown command %r" % " ".join(args))
'''

# Claude Code stand-in for the runs where only the launcher matters: records its pid, then waits.
_BOX_STUB_CLAUDE = '''#!/bin/sh
echo $$ > "$STUB_CLAUDE_PIDFILE"
exec sleep "${STUB_CLAUDE_SLEEP:-0}"
'''


def _pids_in_namespace(namespace):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink("/proc/%s/ns/mnt" % entry) == namespace:
                    pids.append(int(entry))
    return pids


class SshBox:
    """A GPU box stand-in: sshd (root login by key) whose /root is `home`; or, given `user`, an existing
    normal user's login to `root`/home, with the real /root hidden (as on a box where we are not root)."""

    def __init__(self, lab, name, shell, python_prefix=None, ollama_installed=True, user=None, root=None):
        self.lab, self.name, self.user = lab, name, user
        self.root = Path(root) if root else lab.root / name
        self.home = self.root / "home"
        self.folder = self.home / ".simple_api_proxy"
        self.state = self.home / ".standin-ollama"
        self.install_bin = self.root / "install-bin"  # where the "installer" puts ollama
        self.python_prefix = python_prefix
        self.ssh_port, self.ollama_port, self.proxy_port = free_port(), free_port(), free_port()
        (self.home / ".ssh").mkdir(parents=True)
        self.install_bin.mkdir()
        shutil.copy(lab.key.with_suffix(".pub"), self.home / ".ssh" / "authorized_keys")
        ollama_bin = lab.ollama_bin
        if user:  # the lab's folders are root's own: the user gets its copies in its home
            ollama_bin = self.home / "ollama-bin"
            ollama_bin.mkdir()
            shutil.copy(lab.ollama_bin / "ollama", ollama_bin / "ollama")
        path = [str(self.install_bin)] + ([str(ollama_bin)] if ollama_installed else [])
        path += ([python_prefix + "/bin"] if python_prefix else []) + ["/usr/local/bin", "/usr/bin", "/bin"]
        (self.home / ".ssh" / "environment").write_text(
            "PATH=%s\nOLLAMA_HOST=127.0.0.1:%d\n" % (":".join(path), self.ollama_port))
        if user:
            subprocess.run(["chown", "-R", "%s:" % user, str(self.home), str(self.install_bin)], check=True)
        else:
            passwd = "".join(re.sub(r"^(root:[^:]*:0:0:[^:]*:/root):[^:\n]*$", r"\1:" + shell, line)
                             for line in Path("/etc/passwd").read_text().splitlines(True))
            (self.root / "passwd").write_text(passwd)
        host_key = self.root / "host_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
        (self.root / "sshd_config").write_text(
            "Port %d\nListenAddress 127.0.0.1\nHostKey %s\nPidFile none\nAuthorizedKeysFile .ssh/authorized_keys\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            "PermitUserEnvironment yes\nStrictModes no\nUsePAM no\nLogLevel ERROR\nMaxSessions 50\n"
            "MaxStartups 50\n" % (self.ssh_port, host_key))
        # sshd wants /run/sshd, which only its system service creates: a private /run if it is missing.
        # A python3 under the real /root (pyenv) stays visible: for root it is mounted at the same place in
        # the box's home.
        keep = ""
        if user:
            # /root becomes an empty, readable tmpfs; a python3 kept from it stays at its own path
            # (its libpython is found there).
            if python_prefix and python_prefix.startswith("/root/"):
                staged = self.root / "python"
                staged.mkdir()
                keep = ("mount --bind {p} {s} && mount -t tmpfs -o mode=755 tmpfs /root && mkdir -p {p} && "
                        "mount --move {s} {p} && ").format(p=python_prefix, s=staged)
            setup = ("[ -d /run/sshd ] || { mount -t tmpfs tmpfs /run && mkdir /run/sshd; } && %s"
                     "exec %s -D -e -f %s" % (keep, lab.sshd, self.root / "sshd_config"))
        else:
            if python_prefix and python_prefix.startswith("/root/"):
                inside = self.home / python_prefix[len("/root/"):]
                inside.mkdir(parents=True)
                keep = "mount --bind %s %s && " % (python_prefix, inside)
            setup = ("[ -d /run/sshd ] || { mount -t tmpfs tmpfs /run && mkdir /run/sshd; } && %s"
                     "mount --rbind %s /root && mount --bind %s /etc/passwd && exec %s -D -e -f %s"
                     % (keep, self.home, self.root / "passwd", lab.sshd, self.root / "sshd_config"))
        self.sshd = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", setup],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.root / "sshd.log", "w"))
        deadline = time.monotonic() + 20
        while not self._listening():
            assert self.sshd.poll() is None and time.monotonic() < deadline, (self.root / "sshd.log").read_text()
            time.sleep(0.05)
        self.namespace = os.readlink("/proc/%d/ns/mnt" % self.sshd.pid)
        self.reset()

    def _listening(self):
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.ssh_port)) == 0

    def reset(self, models=(MODEL,)):
        """A bare box: Ollama installed (or not) but stopped, no proxy, nothing deployed."""
        self.kill_processes()
        shutil.rmtree(self.folder, ignore_errors=True)
        shutil.rmtree(self.state, ignore_errors=True)
        for item in self.install_bin.iterdir():
            item.unlink()
        self.state.mkdir()
        (self.state / "models").write_text("".join(m + "\n" for m in models))
        (self.state / "reply").write_text("Answer from box %s." % self.name)
        if self.user:
            subprocess.run(["chown", "-R", "%s:" % self.user, str(self.state)], check=True)

    def kill_processes(self):
        """Everything the box runs (proxy, ollama serve, sessions) but its sshd."""
        for pid in _pids_in_namespace(self.namespace):
            if pid != self.sshd.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def pid(self, name):
        path = self.folder / name
        return int(path.read_text()) if path.exists() else None

    def stop(self):
        self.kill_processes()
        self.sshd.kill()
        self.sshd.wait(timeout=10)


class SshLab:
    """The laptop: an ssh config naming the boxes, a key, and the launcher's environment."""


    def __init__(self, root):
        self.root = root
        self.sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self.laptop = root / "laptop"
        for d in ("bin", "stub-bin", "home", "tmp", "ollama-bin"):
            (self.laptop / d).mkdir(parents=True, exist_ok=True)
        self.key = self.laptop / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        self.ollama_bin = self.laptop / "ollama-bin"
        ollama = self.ollama_bin / "ollama"
        ollama.write_text(_BOX_OLLAMA_COMMAND)
        ollama.chmod(0o755)
        self.boxes = {"a": SshBox(self, "a", "/bin/sh"),
                      "b": SshBox(self, "b", "/bin/bash", python_prefix=sys.prefix,
                                  ollama_installed=False)}
        config = ""
        for box in self.boxes.values():
            config += ("Host box-{n}\n  HostName 127.0.0.1\n  Port {p}\n  User root\n  IdentityFile {k}\n"
                       "  UserKnownHostsFile {kh}\n  BatchMode yes\n\n").format(
                           n=box.name, p=box.ssh_port, k=self.key, kh=self.laptop / "known_hosts")
        (self.laptop / "ssh_config").write_text(config)
        wrapper = "#!/bin/sh\nexec %s -F %s \"$@\"\n" % (shutil.which("ssh"), self.laptop / "ssh_config")
        for d in ("bin", "stub-bin"):
            (self.laptop / d / "ssh").write_text(wrapper)
            (self.laptop / d / "ssh").chmod(0o755)
        (self.laptop / "stub-bin" / "claude").write_text(_BOX_STUB_CLAUDE)
        (self.laptop / "stub-bin" / "claude").chmod(0o755)
        # What --deploy runs on a box without ollama: never the real installer in a test.
        self.installer = self.laptop / "install-ollama.sh"
        self.installer.write_text('echo ">>> Installing ollama to ${PATH%%%%:*}"\ncp %s "${PATH%%%%:*}/"\n'
                                  % (self.ollama_bin / "ollama"))
        self.procs = []

    def env(self, real_claude=False, **extra):
        bin_dir = self.laptop / ("bin" if real_claude else "stub-bin")
        if real_claude:
            target = self.laptop / "bin" / "claude"
            if not target.exists():
                target.symlink_to(claude_code_binary())
        env = {"PATH": "%s:%s" % (bin_dir, os.environ["PATH"]), "HOME": str(self.laptop / "home"),
               "TMPDIR": str(self.laptop / "tmp"), "LANG": "C.UTF-8", "TERM": "dumb",
               "STUB_CLAUDE_PIDFILE": str(self.laptop / "claude.pid"),
               "CLAUDE_START_OLLAMA_INSTALL": "sh %s" % self.installer}
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def start(self, box, *args, env=None):
        """The launcher for one box (its proxy on box.proxy_port), or for a list of boxes."""
        boxes = box if isinstance(box, list) else [box]
        where = [word for each in boxes for word in ("--ssh", "box-" + each.name)]
        if len(boxes) == 1:
            where += ["--remote-port", str(box.proxy_port)]
        if "--local-port" not in args:
            where += ["--local-port", str(free_port())]  # not 8001, which this machine may be using
        proc = subprocess.Popen([str(LAUNCHER_SCRIPT), *where, *args],
                                env=env or self.env(), cwd=self.laptop, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, box, *args, env=None, timeout=90):
        proc = self.start(box, *args, env=env)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail("claude_start.sh timed out\nstdout:\n%s\nstderr:\n%s" % (out, err))
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        self.procs = []


def _mount_namespaces_work():
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_box_tests_probe_mount_namespaces_not_just_unshare(tmp_path, monkeypatch):
    need(shutil.which("unshare"), "unshare is not installed (util-linux)")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        need(_mount_namespaces_work(), "`unshare -m true` fails here")
    refusing = tmp_path / "unshare"
    refusing.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    refusing.chmod(0o755)
    monkeypatch.setenv("PATH", "%s%s%s" % (tmp_path, os.pathsep, os.environ["PATH"]))
    assert not _mount_namespaces_work()


@pytest.fixture(scope="module")
def ssh_lab(tmp_path_factory):
    need(hasattr(os, "geteuid") and os.geteuid() == 0, "the box tests run sshd in a mount namespace (need root)")
    for tool in ("unshare", "ssh", "ssh-keygen"):
        need(shutil.which(tool), "%s is not installed (openssh-client, util-linux)" % tool)
    need(shutil.which("sshd") or os.access("/usr/sbin/sshd", os.X_OK), "sshd is not installed (openssh-server)")
    need(_mount_namespaces_work(), "`unshare -m true` fails: the box tests need mount namespaces (a container "
                                   "may forbid them; run it with --privileged or CAP_SYS_ADMIN)")
    lab = SshLab(tmp_path_factory.mktemp("ssh-lab"))
    try:
        yield lab
    finally:
        lab.cleanup()
        for box in lab.boxes.values():
            box.stop()


@pytest.fixture
def lab(ssh_lab):
    """The boxes as the last test left them: each test begins with --deploy (or reset() for a bare box)."""
    yield ssh_lab
    ssh_lab.cleanup()


def _box_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("claude_start: ")]


def _process_alive(pid):
    return pid is not None and _launcher_pid_alive(pid)


def test_deploy_bare_box_to_an_answer_then_keep_or_restart_the_proxy(lab, tmp_path):
    box = lab.boxes["a"]
    box.reset()
    settings = dict(OLLAMA_NUM_CTX="16384", PROXY_API_KEY="box-key-123", REDIS_URL="redis://127.0.0.1:1/0")
    result = lab.run(box, "--deploy", "--", "-p", "say hello", env=lab.env(real_claude=True, **settings))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Answer from box a."
    assert "started ollama serve" in result.stderr and "started the proxy" in result.stderr
    assert "keeps running (and billing)" in result.stderr
    # Claude Code's own `claude --resume` would bypass the proxy: the launcher's line instead.
    resume = re.search(r"resume this conversation with: (.*)", result.stderr)
    assert resume and re.fullmatch(r"\S*claude_start\.sh --ssh box-a --remote-port \d+ --local-port \d+ "
                                   r"-- --resume [0-9a-f-]{36}", resume.group(1)), result.stderr
    # What it leaves on the box: the file, a private env file, logs, pidfiles, the instance id.
    assert (box.folder / "simple_api_proxy.py").read_bytes() == (HERE / "simple_api_proxy.py").read_bytes()
    env_file = box.folder / "proxy.env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert {"OLLAMA_NUM_CTX=16384", "PROXY_API_KEY=box-key-123", "API_PORT=%d" % box.proxy_port,
            "OLLAMA_MODEL=%s" % MODEL} <= set(env_file.read_text().splitlines())
    pid = box.pid("proxy.pid")
    assert _process_alive(pid) and _process_alive(box.pid("ollama.pid"))
    assert "box-key-123" not in Path("/proc/%d/cmdline" % pid).read_text()
    assert (box.folder / "proxy.log").exists() and (box.folder / "ollama.log").exists()
    assert len((box.folder / "proxy.instance").read_text().strip()) == 16
    # Box a runs the system's python3; on Debian (PEP 668) it has no redis-py: say how to get it.
    advice = [line for line in _box_lines(result) if "redis-py is missing" in line]
    box_python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if subprocess.run([box_python, "-c", "import redis"], capture_output=True).returncode == 0:
        assert not advice, advice
    else:
        assert advice and all(w in advice[0] for w in ("pip install --user redis", "python3-redis",
                                                       "--break-system-packages", "memory cache"))

    # The same file and settings again: the running proxy is left alone.
    again = lab.run(box, "--deploy", env=lab.env(**settings))
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stderr and box.pid("proxy.pid") == pid and _process_alive(pid)
    assert "copying" not in again.stderr

    # A changed file: copied and the proxy restarted gracefully.
    changed = tmp_path / "simple_api_proxy.py"
    changed.write_text((HERE / "simple_api_proxy.py").read_text() + "\n# a newer version\n")
    third = lab.run(box, "--deploy", env=lab.env(CLAUDE_START_PROXY_SCRIPT=changed, **settings))
    assert third.returncode == 0, third.stderr
    assert "copying simple_api_proxy.py" in third.stderr and "restarting the proxy" in third.stderr
    assert box.pid("proxy.pid") != pid and not _process_alive(pid) and _process_alive(box.pid("proxy.pid"))
    assert (box.folder / "simple_api_proxy.py").read_text() == changed.read_text()


def test_deploy_installs_ollama_pulls_the_model_and_names_a_port_holder(lab, tmp_path):
    box = lab.boxes["b"]  # bash login shell, no ollama on PATH, no model
    box.reset(models=())
    env = lab.env(MODEL_MAP="haiku=llama3.2:3b", REDIS_URL="redis://127.0.0.1:%d/0" % free_port())
    result = lab.run(box, "--deploy", env=env)
    assert result.returncode == 0, result.stderr
    assert "installing it: sh %s" % lab.installer in result.stderr and "Installing ollama" in result.stderr
    for model in (MODEL, "llama3.2:3b"):
        assert "pulling %s" % model in result.stderr and "%s: success" % model in result.stderr
    assert "pulling 6a0746a1ec1a 0% of 4.7 GB" in result.stderr
    assert set((box.state / "models").read_text().split()) == {MODEL, "llama3.2:3b"}

    # --check: all good but Redis, which is a warning, not a failure.
    check = lab.run(box, "--check", env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    redis_hop, = [line for line in check.stdout.splitlines() if line.startswith("redis:")]
    need(redis_module(), "redis-py is not installed")
    assert redis_hop.split()[1] == "warning" and "is down" in redis_hop and "memory cache" in redis_hop, check.stdout

    # Something else on the proxy's port: a clear error naming it.
    lab.run(box, "--stop", env=env)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", box.proxy_port))
        squatter.listen(1)
        taken = lab.run(box, "--deploy", env=env)
    assert taken.returncode == 1
    assert "port %d on the box is held by pid %d" % (box.proxy_port, os.getpid()) in taken.stderr


def test_check_reports_ollama_down_and_a_missing_model(lab):
    box = lab.boxes["a"]
    assert lab.run(box, "--deploy").returncode == 0
    os.kill(box.pid("ollama.pid"), signal.SIGKILL)
    down = lab.run(box, "--check")
    assert down.returncode == 1
    assert "ollama from proxy:   failed (Ollama not reachable from the proxy" in down.stdout, down.stdout
    assert "ollama serve" in down.stdout and "--deploy" in down.stdout

    assert lab.run(box, "--deploy").returncode == 0  # Ollama started again
    missing = lab.run(box, "--check", "--model", "qwen3-coder:30b")
    assert missing.returncode == 1
    assert ("model:               failed (model qwen3-coder:30b not installed "
            "(run: ollama pull qwen3-coder:30b, or use --deploy))") in missing.stdout, missing.stdout

    stopped = lab.run(box, "--stop")
    assert stopped.returncode == 0 and "proxy stopped" in stopped.stderr
    nothing = lab.run(box, "--check")
    assert nothing.returncode == 1 and "remote proxy health: failed (nothing answers" in nothing.stdout


def test_tunnel_killed_mid_request_is_reopened_and_the_session_answers(lab):
    box = lab.boxes["a"]
    assert lab.run(box, "--deploy").returncode == 0
    chats = box.state / "chats"
    with contextlib.suppress(FileNotFoundError):
        chats.unlink()
    (box.state / "delay_once").write_text("30")
    launcher = lab.start(box, "--", "-p", "say hello", env=lab.env(real_claude=True))
    assert _launcher_wait_until(lambda: chats.exists() and chats.read_text().count("\n") == 1, 60)
    tunnels = [pid for pid in _pids_with_parent(launcher.pid) if " -N -L " in _cmdline(pid)]
    assert len(tunnels) == 1, [_cmdline(pid) for pid in _pids_with_parent(launcher.pid)]
    os.kill(tunnels[0], signal.SIGKILL)
    out, err = launcher.communicate(timeout=90)
    assert launcher.returncode == 0 and out.strip() == "Answer from box a.", out + err
    # "reopened" follows once the launcher's own probe gets through, which Claude Code's retry may beat.
    assert "dropped" in err and "reopening 127.0.0.1:" in err, err


def _cmdline(pid):
    with contextlib.suppress(OSError):
        return Path("/proc/%d/cmdline" % pid).read_bytes().replace(b"\0", b" ").decode()
    return ""


def _pids_with_parent(parent):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int(Path("/proc/%s/stat" % entry).read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    pids.append(int(entry))
    return pids


def test_two_launchers_at_once_each_reach_their_own_box(lab):
    a, b = lab.boxes["a"], lab.boxes["b"]
    for box in (a, b):
        assert lab.run(box, "--deploy").returncode == 0
    local = free_port()
    runs = [lab.start(box, "--local-port", str(local), "--", "-p", "which box?", env=lab.env(real_claude=True))
            for box in (a, b)]
    results = [run.communicate(timeout=90) for run in runs]
    for box, run, (out, err) in zip((a, b), runs, results):
        assert run.returncode == 0, err
        assert out.strip() == "Answer from box %s." % box.name


def test_stop_all_and_sigterm_clean_up(lab):
    box = lab.boxes["a"]
    launcher = lab.start(box, "--deploy", env=lab.env(STUB_CLAUDE_SLEEP=60))
    pidfile = lab.laptop / "claude.pid"
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    assert _launcher_wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 60)
    claude = int(pidfile.read_text())
    tunnels = [pid for pid in _pids_with_parent(launcher.pid) if " -N -L " in _cmdline(pid)]
    local = int(_cmdline(tunnels[0]).split(" -L ")[1].split(":")[0])

    # The box's proxy restarts (a new instance) and the tunnel drops: the new instance is taken.
    os.kill(box.pid("proxy.pid"), signal.SIGTERM)
    restart = subprocess.run([str(lab.laptop / "bin" / "ssh"), "box-a", "python3 /root/.simple_api_proxy/box.py"],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert "@ready" in restart.stdout, restart.stdout + restart.stderr
    said = []
    reader = threading.Thread(target=lambda: said.extend(launcher.stderr), daemon=True)
    reader.start()
    os.kill(tunnels[0], signal.SIGKILL)
    instance = (box.folder / "proxy.instance").read_text().strip()
    assert _launcher_wait_until(lambda: any("reopened" in line for line in said), 30), said
    assert any("the proxy on box-a restarted (instance %s" % instance in line for line in said), said
    assert _health_instance(local) == instance
    tunnels = [pid for pid in _pids_with_parent(launcher.pid) for pid in [pid] + _pids_with_parent(pid)
               if " -N -L " in _cmdline(pid)]

    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=20)
    reader.join(timeout=10)
    assert launcher.returncode == 143
    assert tunnels and _launcher_wait_until(lambda: not any(map(_process_alive, tunnels + [claude])), 5)

    proxy, ollama = box.pid("proxy.pid"), box.pid("ollama.pid")
    assert _process_alive(proxy)  # the box keeps serving after the laptop leaves
    result = lab.run(box, "--stop", "--all")
    assert result.returncode == 0, result.stderr
    assert "proxy stopped" in result.stderr and "ollama serve stopped" in result.stderr
    assert not _process_alive(proxy) and not _process_alive(ollama)

    # README's on-start line brings both back after a container restart, and returns.
    onstart = subprocess.run([str(lab.laptop / "bin" / "ssh"), "box-a", "python3 /root/.simple_api_proxy/box.py"],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert onstart.returncode == 0 and "@ready" in onstart.stdout, onstart.stdout + onstart.stderr
    assert _process_alive(box.pid("proxy.pid")) and _process_alive(box.pid("ollama.pid"))


def test_several_boxes_each_run_ollama_behind_one_proxy_here(lab):
    a, b = lab.boxes["a"], lab.boxes["b"]
    for box in (a, b):
        box.kill_processes()  # Ollama stopped, no proxy: --deploy readies Ollama and the model only
    result = lab.run([a, b], "--deploy", "--local-port", str(free_port()), "--", "-p", "which box?",
                     env=lab.env(real_claude=True))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("Answer from box a.", "Answer from box b.")
    assert "spreads requests over 2 boxes" in result.stderr
    for box in (a, b):
        assert "tunnel 127.0.0.1:" in result.stderr and "box-%s:127.0.0.1:%d (Ollama)" % (box.name, box.ollama_port) \
            in result.stderr
        assert _process_alive(box.pid("ollama.pid")) and not _process_alive(box.pid("proxy.pid"))

    check = lab.run([a, b], "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count("ollama on box:       ok") == 2 and check.stdout.count("tunnel:              ok") == 2

    os.kill(a.pid("ollama.pid"), signal.SIGKILL)
    check = lab.run([a, b], "--check")
    assert check.returncode == 1
    assert "ollama on box:       failed (box-a: Ollama not answering at http://127.0.0.1:%d" % a.ollama_port \
        in check.stdout, check.stdout

    stop = lab.run([a, b], "--stop", "--all")
    assert stop.returncode == 0, stop.stderr
    assert not _process_alive(b.pid("ollama.pid"))


def _health_instance(port):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        return json.loads(opener.open("http://127.0.0.1:%d/health" % port, timeout=2).read()).get("instance_id")
    except (OSError, ValueError):
        return None


def test_changed_host_key_says_how_to_clear_it(lab):
    box = lab.boxes["a"]
    known = lab.laptop / "known_hosts"
    saved = known.read_text() if known.exists() else ""
    other = lab.laptop / "other_key"
    if not other.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    try:
        known.write_text("[127.0.0.1]:%d %s" % (box.ssh_port, other.with_suffix(".pub").read_text()))
        result = lab.run(box, "--check")
    finally:
        known.write_text(saved)
    assert result.returncode == 1
    assert "host key" in result.stdout and "ssh-keygen -R '[127.0.0.1]:%d'" % box.ssh_port in result.stdout


PYTHON_3_8 = "/root/.pyenv/versions/3.8.18"  # where this machine keeps the oldest python3 the box may have


@pytest.fixture
def user_box(ssh_lab):
    """A box where we log in as a normal user, created for the test and removed after it; its python3 is
    3.8 where this machine has one."""
    need(shutil.which("useradd") and shutil.which("userdel"), "useradd/userdel are not installed (passwd)")
    user = "sapbox%s" % os.urandom(4).hex()
    root = Path(tempfile.mkdtemp(prefix=user + "."))  # not under pytest's folder, which only root may enter
    root.chmod(0o755)
    # "*", not useradd's locked "!": sshd without PAM refuses a locked account even with a key.
    subprocess.run(["useradd", "-M", "-d", str(root / "home"), "-s", "/bin/sh", "-p", "*", user], check=True)
    config = ssh_lab.laptop / "ssh_config"
    saved = config.read_text()
    box = None
    try:
        box = SshBox(ssh_lab, "user", "/bin/sh", user=user, root=root,
                     python_prefix=PYTHON_3_8 if os.access(PYTHON_3_8 + "/bin/python3", os.X_OK) else None)
        config.write_text(saved + "Host box-user\n  HostName 127.0.0.1\n  Port %d\n  User %s\n  IdentityFile %s\n"
                          "  UserKnownHostsFile %s\n  BatchMode yes\n\n"
                          % (box.ssh_port, user, ssh_lab.key, ssh_lab.laptop / "known_hosts"))
        yield box
    finally:
        ssh_lab.cleanup()
        config.write_text(saved)
        if box:
            box.stop()
        subprocess.run(["userdel", user], check=True)
        shutil.rmtree(root, ignore_errors=True)


def test_deploy_as_a_normal_user_then_stop_and_say_that_installing_ollama_needs_root(user_box):
    box, lab = user_box, user_box.lab
    uid = pwd.getpwnam(box.user).pw_uid
    result = lab.run(box, "--deploy")
    assert result.returncode == 0, result.stderr
    assert "started ollama serve" in result.stderr and "started the proxy" in result.stderr
    env_file = box.folder / "proxy.env"
    assert env_file.stat().st_mode & 0o777 == 0o600 and env_file.stat().st_uid == uid
    assert all(item.stat().st_uid == uid for item in [box.folder, *box.folder.iterdir()])
    pid = box.pid("proxy.pid")
    assert _process_alive(pid) and os.stat("/proc/%d" % pid).st_uid == uid
    if box.python_prefix:  # the proxy and the box program ran on python 3.8
        assert os.readlink("/proc/%d/exe" % pid).startswith(box.python_prefix + "/bin/python3.8")
    check = lab.run(box, "--check")
    assert check.returncode == 0, check.stdout + check.stderr

    stopped = lab.run(box, "--stop", "--all")
    assert stopped.returncode == 0 and "proxy stopped" in stopped.stderr, stopped.stderr
    assert not _process_alive(pid) and not _process_alive(box.pid("ollama.pid"))

    # No ollama, not root, no sudo: the official installer would fail; say what is needed instead.
    (box.home / "ollama-bin" / "ollama").unlink()
    (box.install_bin / "curl").write_text("#!/bin/sh\necho 'no internet in tests' >&2\nexit 1\n")
    (box.install_bin / "curl").chmod(0o755)
    env = lab.env()
    del env["CLAUDE_START_OLLAMA_INSTALL"]
    missing = lab.run(box, "--deploy", env=env)
    assert missing.returncode == 1, missing.stderr
    assert "no internet in tests" not in missing.stderr
    assert "Ollama is not installed, and its official install script" in missing.stderr, missing.stderr
    assert "needs root: %s is not root and has no passwordless sudo" % box.user in missing.stderr


###############################################################################
# The proxy as the launcher meets it on a box: one instance id per run, a taken port
###############################################################################

def test_health_carries_an_instance_id_per_run(ollama):
    with running_proxy(ollama.url) as first, running_proxy(ollama.url, PROXY_API_KEY="k-1") as second:
        ids = [first.json("GET", "/health")[2]["instance_id"] for _ in range(2)]
        other = second.json("GET", "/health")[2]["instance_id"]  # without the key: still there
    assert ids[0] == ids[1] == first.server.instance_id and len(ids[0]) == 16
    assert other != ids[0]


def test_taken_port_is_a_one_line_error(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        result = subprocess.run([sys.executable, str(HERE / "simple_api_proxy.py"), "--api-port", str(port)],
                                env=dict(os.environ, LOG_FILE="", CACHE="off"), cwd=tmp_path,
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "cannot listen on 127.0.0.1:%d" % port in lines[0] and "API_PORT" in lines[0]


###############################################################################
# Regressions found in review
###############################################################################

def test_internal_failure_mid_stream_ends_the_stream_instead_of_hanging(gateway, monkeypatch):
    def broken_translate(self, chunks, events=None):
        raise RuntimeError("simulated bug")
    monkeypatch.setattr(proxy.StreamTranslator, "translate", broken_translate)
    status, _, raw = gateway.stream(request_body())
    events = parse_sse(raw)
    assert status == 200 and events[-1][0] == "error" and events[-1][1]["error"]["type"] == "api_error"
    assert "simulated bug" not in raw.decode()


def test_a_recursion_bug_in_the_proxy_is_its_own_500_not_the_clients_400(gateway, monkeypatch):
    def runaway(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")
    monkeypatch.setattr(proxy, "anthropic_to_ollama", runaway)
    status, _, error = gateway.messages(request_body())
    assert status == 500 and error["error"]["type"] == "api_error", error
    assert "request body" not in error["error"]["message"]


def test_a_get_with_a_body_does_not_poison_the_next_request(gateway):
    body = json.dumps(request_body("secret prompt")).encode()
    post = json.dumps(request_body()).encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as connection:
        connection.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s"
                           b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
                           b"Connection: close\r\n\r\n%s" % (len(body), body, len(post), post))
        answer = b""
        while part := connection.recv(65536):
            answer += part
    responses = answer.split(b"HTTP/1.1 ")[1:]
    assert [r[:3] for r in responses] == [b"200", b"200"]
    assert b"stand-in model" in responses[1] and b"secret prompt" not in answer


def test_non_ascii_digits_in_content_length_are_a_400(gateway):
    answer = raw_exchange(gateway.port, "POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: \u00b2\r\n\r\n{}"
                          .encode("latin-1"))
    assert answer.startswith(b"HTTP/1.1 400")


def test_ipv6_ollama_host_gets_a_bracketed_host_header():
    settings = config(OLLAMA_HOST="[::1]:11434")
    client = proxy.OllamaClient(settings, settings.ollama_hosts[0])
    assert client._host_header == b"[::1]:11434"


def test_each_ollama_host_uses_its_own_scheme():
    settings = config(OLLAMA_HOST="https://gpu-a,gpu-b")
    secure, plain = (proxy.OllamaClient(settings, host) for host in settings.ollama_hosts)
    assert secure._tls is not None and plain._tls is None


@pytest.mark.parametrize("name", ["PING_INTERVAL", "OLLAMA_TIMEOUT", "CLIENT_TIMEOUT", "CACHE_TTL",
                                  "OLLAMA_FIRST_TOKEN_TIMEOUT"])
def test_settings_that_must_be_positive_are_checked(name, capsys):
    with pytest.raises(SystemExit):
        proxy.load_config([], {name: "0"})
    assert f"{name} must be a number greater than 0" in capsys.readouterr().err


def test_errors_name_the_clients_own_message_index():
    body = request_body(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                  {"role": "assistant", "content": [{"type": "tool_use", "id": "t1",
                                                                     "name": "Bash", "input": "ls"}]}])
    with pytest.raises(proxy.ProxyError) as caught:
        ollama_body(body, MODEL, config())
    assert caught.value.message.startswith("messages.2.content.0.input")


def test_http_parser_errors_are_invalid_request_errors(gateway):
    answer = raw_exchange(gateway.port, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 414") and b"invalid_request_error" in answer


def test_http10_client_gets_an_unchunked_stream(gateway):
    body = json.dumps(request_body(stream=True)).encode()
    answer = raw_exchange(gateway.port, b"POST /v1/messages HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s"
                          % (len(body), body))
    head, _, events = answer.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert_valid_stream(parse_sse(events))


def test_ollama_context_length_refusal_uses_anthropics_wording(gateway, ollama):
    ollama.script(Reply(status=400, error="the prompt is longer than the context length currently available"))
    status, _, body = gateway.messages(request_body())
    assert status == 400 and body["error"]["message"].startswith("prompt is too long: 32769 tokens > 32768 maximum")


def test_a_client_resetting_an_idle_connection_is_not_an_error(ollama, tmp_path):
    running = ProxyProcess(tmp_path, OLLAMA_HOST=ollama.url)
    try:
        connection = socket.create_connection(("127.0.0.1", running.port))
        connection.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert connection.recv(1000).startswith(b"HTTP/1.1 200")
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()
        time.sleep(0.3)
        assert running.gateway.call("GET", "/")[0] == 200
        running.process.send_signal(15)
        assert running.finish() == 0
    finally:
        running.kill()
    assert "Traceback" not in running.output


###############################################################################
# bench/: the benchmark and the soak keep working (no speed is asserted)
###############################################################################

def test_benchmark_smoke_run_completes():
    result = subprocess.run([sys.executable, str(HERE / "bench" / "run.py"), "--smoke"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| cache hit, memory tier |" in result.stdout and "every scenario completed without errors" in result.stdout
    assert "| two Ollama hosts vs one" in result.stdout and "metrics: recording one request" in result.stdout


def test_hot_path_profile_prints_every_component_for_this_file_and_the_baseline():
    against = ["--against", "bcac229"] if subprocess.run(["git", "-C", str(HERE), "cat-file", "-e", "bcac229"],
                                                          capture_output=True).returncode == 0 else []
    result = subprocess.run([sys.executable, str(HERE / "bench" / "hot_path.py"), "--loops", "5", "--repeat", "1"]
                            + against, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    for component in ("request line and headers", "upstream chunked parse and line split", "NDJSON decode",
                      "StreamTranslator feeds", "SSE encode", "everything else", "**total**"):
        assert re.search(r"\d+ µs", rows[component]), result.stdout
    assert ("bcac229" in rows["component"]) == bool(against)


def test_benchmark_without_git_history_leaves_the_default_baseline_out(tmp_path):
    # A tarball or a shallow clone: bench/ without the baseline revision in reach.
    shutil.copytree(HERE / "bench", tmp_path / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(HERE / "simple_api_proxy.py", tmp_path)
    check = ("import sys, tempfile; sys.path.insert(0, sys.argv[1]); import run\n"
             "print(run.baseline_script(run.BASELINE_REVISION, False, tempfile.mkdtemp()))\n"
             "try:\n    run.baseline_script(run.BASELINE_REVISION, True, tempfile.mkdtemp())\n"
             "except run.BaselineUnavailable as exc:\n    print('asked:', exc)\n")
    result = subprocess.run([sys.executable, "-c", check, str(tmp_path / "bench")], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, GIT_CEILING_DIRECTORIES=str(tmp_path.parent)))
    assert result.returncode == 0, result.stderr
    left_out, asked = result.stdout.splitlines()
    assert left_out.startswith("(None, 'baseline left out: cannot read simple_api_proxy.py at revision")
    assert asked.startswith("asked: cannot read simple_api_proxy.py at revision") and "--no-baseline" in asked


def test_soak_short_run_passes():
    need(shutil.which("redis-server"), "redis-server is not installed")
    result = subprocess.run([sys.executable, str(HERE / "bench" / "soak.py"), "--seconds", "8"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "answers lost: 0; corrupted: 0" in result.stdout and "soak: passed" in result.stdout


###############################################################################
# Request framing, Expect: 100-continue, Host and Origin checks
###############################################################################

def post_head(body_length=None, extra=b"", path=b"/v1/messages", host=b"127.0.0.1"):
    length = b"Content-Length: %d\r\n" % body_length if body_length is not None else b""
    return b"POST %s HTTP/1.1\r\nHost: %s\r\n%s%s\r\n" % (path, host, length, extra)


def chunked_request(body, extension=b""):
    return (post_head(extra=b"Transfer-Encoding: chunked\r\nConnection: close\r\n")
            + b"%x%s\r\n%s\r\n0\r\n\r\n" % (len(body), extension, body))


def status_of(answer):
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


def test_chunked_bodies_are_parsed_strictly(ollama):
    body = json.dumps(request_body()).encode()
    with running_proxy(ollama.url, MAX_BODY_BYTES=len(body) + 100) as gateway:
        # Each refused at once: the proxy neither waits for more nor reads to the end of the stream.
        for size in (b"-1", b"+5", b"0x5", b"_5", b"", b" 5", b"5 ", b"5;", b"1_0"):
            answer = raw_exchange(gateway.port, post_head(extra=b"Transfer-Encoding: chunked\r\n")
                                  + size + b"\r\nhello\r\n")
            assert status_of(answer) == 400 and b"Connection: close" in answer, (size, answer[:200])
        legal = b';name="' + b"v" * 2000 + b'";other=token'
        assert status_of(raw_exchange(gateway.port, chunked_request(body, legal))) == 200
        too_many = post_head(extra=b"Transfer-Encoding: chunked\r\n") + b"".join(
            b"1;e=" + b"v" * 2000 + b"\r\n{\r\n" for _ in range(9))
        answer = raw_exchange(gateway.port, too_many)
        assert status_of(answer) == 400 and b"chunk extensions exceed" in answer
        answer = raw_exchange(gateway.port, post_head(extra=b"Transfer-Encoding: chunked\r\n") + b"5\r\nhelloXX")
        assert status_of(answer) == 400 and b"CRLF" in answer
        over = post_head(extra=b"Transfer-Encoding: chunked\r\n") + b"%x\r\n%s\r\n" % (len(body), body) * 2
        assert status_of(raw_exchange(gateway.port, over)) == 413
        assert gateway.messages(request_body())[0] == 200
    assert len(ollama.chats()) == 2  # the one with a long extension, and the last
    head = proxy.RequestHead()
    head.chunked = True
    many = proxy.RequestReader(io.BufferedReader(io.BytesIO(b"1\r\nx\r\n" * 65537 + b"0\r\n\r\n")))
    with pytest.raises(proxy.ProxyError, match="more than 65536 chunks"):
        many.read_body(head, 1 << 20)


def test_ambiguous_framing_is_refused_and_closes(gateway):
    body = json.dumps(request_body()).encode()
    cases = {b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(body): 400,
             b"Content-Length: %d\r\nContent-Length: %d\r\n" % (len(body), len(body) + 1): 400,
             b"Content-Length: %d, %d\r\n" % (len(body), len(body) - 1): 400,
             b"Transfer-Encoding: xchunkedx\r\n": 501, b"Transfer-Encoding: gzip, chunked\r\n": 501,
             b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n": 400,
             b"Host: 127.0.0.1\r\nContent-Length: 5\r\n": 400}
    for headers, expected in cases.items():
        answer = raw_exchange(gateway.port, post_head(extra=headers) + body)
        assert status_of(answer) == expected and b"Connection: close" in answer, (headers, answer[:300])
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["type"] == "invalid_request_error"
    same = raw_exchange(gateway.port, post_head(extra=b"Content-Length: %d\r\nContent-Length: %d\r\n"
                                                % (len(body), len(body))) + body)
    assert status_of(same) == 200
    # A GET frames a chunked body as a POST does: the request after it is read where it starts.
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) + post_head(len(body), b"Connection: close\r\n")
                           + body)
        answer = read_until_closed(connection)
    assert [r[:3] for r in answer.split(b"HTTP/1.1 ")[1:]] == [b"200", b"200"]


def test_a_head_ended_by_bare_line_feeds_keeps_its_body_with_blank_lines_in_it(gateway):
    # JSON may hold CRLF CRLF as whitespace; the head before it ends at a bare LF blank line.
    body = json.dumps(request_body()).encode().replace(b", ", b",\r\n\r\n")
    head = b"POST /v1/messages/count_tokens HTTP/1.1\nHost: localhost\nContent-Length: %d\n\n" % len(body)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as connection:
        connection.sendall(head + body + b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = read_until_closed(connection)
    assert [r[:3] for r in answer.split(b"HTTP/1.1 ")[1:]] == [b"200", b"200"], answer[:600]
    assert b'"input_tokens"' in answer


def expect_continue(port, head):
    """Send a head with Expect: 100-continue and no body; the proxy's first answer to it."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection.sendall(head)
    return connection, connection.recv(65536)


def test_expect_100_continue_comes_after_every_check(ollama):
    body = json.dumps(request_body()).encode()
    expect = b"Expect: 100-continue\r\nx-api-key: k-1\r\n"
    with running_proxy(ollama.url, PROXY_API_KEY="k-1", MAX_BODY_BYTES=10000) as gateway:
        refusals = {401: post_head(len(body), b"Expect: 100-continue\r\n"),
                    413: post_head(20000, expect),
                    404: post_head(len(body), expect, path=b"/v1/nowhere"),
                    403: post_head(len(body), expect + b"Origin: https://evil.example\r\n"),
                    411: post_head(None, expect)}
        for status, head in refusals.items():
            connection, answer = expect_continue(gateway.port, head)
            with connection:
                assert status_of(answer) == status and b"Connection: close" in answer, answer[:200]
        connection, answer = expect_continue(gateway.port, post_head(len(body), expect))
        with connection:
            assert answer == b"HTTP/1.1 100 Continue\r\n\r\n"
            connection.sendall(body)
            answer = connection.recv(65536)
            assert status_of(answer) == 200 and b"stand-in model" in answer
    assert len(ollama.chats()) == 1


def test_web_pages_cannot_use_the_proxy(ollama):
    with running_proxy(ollama.url, ALLOWED_ORIGINS="https://app.example.com, https://*.trusted.example") as gateway:
        body = json.dumps(request_body()).encode()
        for host in (b"evil.example", b"evil.example:8000", b"127.0.0.1.evil.example", b"localhost.evil.example",
                     b"[::1]x", b"10.0.0.1:8000"):
            answer = raw_exchange(gateway.port, post_head(len(body), host=host) + body)
            assert status_of(answer) == 403 and b'"permission_error"' in answer, host
        for host in (b"127.0.0.1:8001", b"localhost:8001", b"localhost", b"127.9.8.7", b"[::1]:8001",
                     b"LocalHost", b"app.localhost:3000"):
            assert status_of(raw_exchange(gateway.port, post_head(len(body), host=host) + body)) == 200, host
        assert len(ollama.chats()) == 7
        # Refused before the body is read: the answer comes without it.
        for origin in ("https://evil.example", "null", "http://localhost.evil.example", "https://app.example.com.evil"):
            connection = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
            with connection:
                connection.sendall(post_head(len(body), b"Origin: %s\r\n" % origin.encode()))
                answer = connection.recv(65536)
            assert status_of(answer) == 403 and b"ALLOWED_ORIGINS" in answer, origin
        assert len(ollama.chats()) == 7
        for origin in ("http://localhost:5173", "https://127.0.0.1", "http://[::1]:3000", "app://obsidian.md",
                       "https://app.example.com", "https://x.trusted.example"):
            status, headers, _ = gateway.call("POST", "/v1/messages", request_body(), {"Origin": origin})
            assert status == 200 and headers["access-control-allow-origin"] == origin, origin
            assert headers["vary"] == "Origin" and "request-id" in headers["access-control-expose-headers"]
        status, headers, _ = gateway.call("OPTIONS", "/v1/messages", headers={
            "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-api-key,anthropic-version,x-stainless-retry-count,"
                                              "anthropic-dangerous-direct-browser-access",
            "Access-Control-Request-Private-Network": "true"})
        allowed = {name.strip() for name in headers["access-control-allow-headers"].split(",")}
        assert status == 204 and headers["access-control-allow-origin"] == "https://app.example.com"
        assert {"content-type", "x-api-key", "anthropic-version", "x-stainless-retry-count", "authorization",
                "anthropic-dangerous-direct-browser-access", "anthropic-beta"} <= allowed
        assert "POST" in headers["access-control-allow-methods"] and headers["access-control-allow-private-network"] == "true"
        status, _, error = gateway.json("OPTIONS", "/v1/messages", headers={"Origin": "https://evil.example"})
        assert status == 403 and error["error"]["type"] == "permission_error"
    public = proxy.OriginPolicy(config(API_HOST="0.0.0.0"))
    assert public.refusal("gpu-box.example:8000", None) is None
    assert public.refusal("gpu-box.example", "https://evil.example").status == 403


def test_a_request_without_a_host_is_refused_not_let_past_the_host_check(gateway, ollama):
    body = json.dumps(request_body()).encode()
    length = b"Content-Length: %d\r\n\r\n" % len(body)
    for head in (b"POST /v1/messages HTTP/1.1\r\n", b"POST /v1/messages HTTP/1.1\r\nHost: \r\n",
                 b"POST http:///v1/messages HTTP/1.1\r\nHost: evil.example\r\n"):
        answer = raw_exchange(gateway.port, head + length + body)
        assert status_of(answer) == 400 and b"Host: localhost" in answer, (head, answer[:300])
    assert ollama.chats() == []
    # HTTP/1.0 has no Host requirement, and nothing for a web page to exploit there.
    assert status_of(raw_exchange(gateway.port, b"POST /v1/messages HTTP/1.0\r\n" + length + body)) == 200


def test_the_proxy_listens_on_an_ipv6_loopback_address(ollama):
    try:
        socket.socket(socket.AF_INET6).close()
        socket.getaddrinfo("::1", 0, socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 on this machine")
    with running_proxy(ollama.url, API_HOST="::1") as gateway:
        connection = http.client.HTTPConnection("::1", gateway.port, timeout=10)
        connection.request("POST", "/v1/messages", json.dumps(request_body()), {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and b"stand-in model" in response.read()
        connection.close()


def test_json_nesting_and_value_limits_are_refused_up_front(gateway, ollama):
    schema = {"type": "object"}
    for _ in range(200):
        schema = {"type": "object", "properties": {"x": schema}}
    status, _, error = gateway.messages(request_body(tools=[{"name": "Deep", "input_schema": schema}]))
    assert status == 400 and "more than 128 levels of arrays and objects" in error["error"]["message"]
    legal = {"type": "array", "items": {"type": "array", "items": {"type": "object", "properties": {
        "path": {"type": "string"}, "lines": {"type": "array", "items": {"type": "integer"}}}}}}
    assert gateway.messages(request_body(tools=[{"name": "Nested", "input_schema": legal}]))[0] == 200
    many = b'{"role":"user","content":"a"},' * 900000
    body = b'{"model":"claude-sonnet-4-5","max_tokens":5,"messages":[' + many + b'{"role":"user","content":"a"}]}'
    status, _, error = gateway.messages(body)
    assert status == 400 and "more than 1000000 JSON values" in error["error"]["message"]
    assert len(ollama.chats()) == 1 and gateway.messages(request_body())[0] == 200


def test_bodies_of_tiny_values_neither_bloat_nor_starve_the_proxy(ollama, tmp_path):
    """Three clients each send 30 MiB of `[],`; an ordinary request meanwhile is answered, the
    proxy's peak RSS stays under 1 GiB. The wait is bounded loosely here: bench/amplification.py
    measures it."""
    need(Path("/proc/self/status").exists(), "reading a process's peak RSS needs /proc")
    running = ProxyProcess(tmp_path, OLLAMA_HOST=ollama.url, LOG_LEVEL="WARNING")
    body = memoryview(b"[" + b"[]," * (10 * 1024 * 1024 - 1) + b"[]]")
    sending, answers = threading.Semaphore(0), []

    def send_big():
        with socket.create_connection(("127.0.0.1", running.port), timeout=120) as connection:
            connection.sendall(post_head(len(body), b"Connection: close\r\n"))
            connection.sendall(body[:1 << 20])
            sending.release()
            connection.sendall(body[1 << 20:])
            answer = read_until_closed(connection)
            answers.append(answer)

    try:
        senders = [threading.Thread(target=send_big) for _ in range(3)]
        for sender in senders:
            sender.start()
        for _ in senders:
            assert sending.acquire(timeout=60)
        began = time.monotonic()
        status, _, message = running.gateway.json("POST", "/v1/messages", request_body())
        waited = time.monotonic() - began
        for sender in senders:
            sender.join(120)
        peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{running.process.pid}/status").read_text())[1])
    finally:
        running.kill()
    assert status == 200 and message["content"][0]["text"]
    assert waited < 10, f"an ordinary request waited {waited:.1f} s behind three bodies of tiny values"
    assert len(answers) == 3 and all(status_of(a) == 400 and b"more than 1000000 JSON values" in a for a in answers)
    assert peak_kib < 1024 * 1024, f"peak RSS {peak_kib // 1024} MiB"
