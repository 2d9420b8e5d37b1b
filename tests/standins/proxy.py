"""The proxy under test, in this process (running_proxy, Proxy) or as its own process
(ProxyProcess), and the client-side helpers that talk to it and read its answers.
"""

import contextlib
import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import simple_api_proxy as proxy

from standins.support import ROOT, wait_until


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


def translate(chunks, **options):
    translator = proxy.StreamTranslator("claude-sonnet-4-5", 10, **options)
    events = translator.start()
    for item in chunks:
        events += translator.feed(item)
        if translator.done:
            break
    return events, translator


def assert_threads_freed(gateway):
    deadline = time.monotonic() + 2
    while gateway.server.in_flight or gateway.server.active_requests:
        assert time.monotonic() < deadline, "a request never finished"
        time.sleep(0.01)
    assert gateway.server.slots._value == gateway.server.config.max_concurrent


TOOLS = ["Bash", "Write"]


BASH_CALL = '{"name": "Bash", "arguments": {"command": "ls -la"}}'


def text_calls(text, tools):
    """What find_text_tool_calls, as the stream translator calls it, finds in a whole reply:
    (the prose before the calls, the calls), or None. tools: {name: input_schema}, or bare names."""
    found = proxy.find_text_tool_calls(text, proxy.offered_tools(tools))
    return (text[:found[0]].strip(), found[1]) if found else None


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


class ProxyProcess:
    """simple_api_proxy.py as users run it: a process, signals and all."""

    def __init__(self, tmp_path, **settings):
        self.port = free_port()
        self.log_file = tmp_path / "proxy.log"
        env = dict(os.environ, API_PORT=str(self.port), LOG_FILE=str(self.log_file))
        env.update({k: str(v) for k, v in settings.items()})
        self.process = subprocess.Popen([sys.executable, str(ROOT / "simple_api_proxy.py")], env=env,
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


def logged_request(caplog, request_id, timeout=10):
    wait_until(lambda: any(r.getMessage().startswith(request_id + " ") for r in caplog.records),
               timeout, f"the log line of {request_id}")
    return next(r.getMessage() for r in caplog.records if r.getMessage().startswith(request_id + " "))


# Which field of its block each delta type extends.
DELTA_FIELDS = {"text_delta": "text", "thinking_delta": "thinking", "signature_delta": "signature",
                "input_json_delta": "partial_json"}


def streamed_content(events):
    """A stream's content blocks with every delta applied (input_json_delta as partial_json)."""
    content = []
    for name, data in events:
        if name == "content_block_start":
            content.append(dict(data["content_block"]))
        elif name == "content_block_delta":
            delta, block = data["delta"], content[data["index"]]
            field = DELTA_FIELDS[delta["type"]]
            block[field] = block.get(field, "") + delta[field]
    return content


def proxy_message(raw, stream):
    """The message a response carries, rebuilt from its events for a stream."""
    if not stream:
        return json.loads(raw)
    events = parse_sse(raw)
    assert_valid_stream(events)
    return {"stop_reason": events[-2][1]["delta"]["stop_reason"], "content": streamed_content(events)}
