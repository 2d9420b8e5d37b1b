"""StandInOllama: a small server that speaks Ollama's wire format (chunked NDJSON streams,
tool_calls, {"error": ...} bodies, hangs and resets on request), the chunk and reply builders its
scripts are made of, and RawOllama, which answers with exactly the bytes a test gives it.
"""

import contextlib
import http.client
import http.server
import json
import queue
import select
import socket
import struct
import threading
import time


MODEL = "qwen2.5-coder:7b"


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


class Gate:
    """A stand-in responder that holds every generation until opened."""

    def __init__(self):
        self.opened = threading.Event()

    def __call__(self, body):
        self.opened.wait(20)
        return text_reply()


def host_list(hosts):
    return ",".join(host.url for host in hosts)


def ollama_prompt(chat):
    """An Ollama chat request laid out the way Ollama's template layer renders it: every system
    message joined at the head (collate in template/template.go), then the tools, then the rest."""
    head = "\n\n".join(m["content"] for m in chat["messages"] if m["role"] == "system")
    rest = "".join(json.dumps(m, sort_keys=True) for m in chat["messages"] if m["role"] != "system")
    return head + json.dumps(chat.get("tools"), sort_keys=True) + rest


def ollama_wire(steps, status=200):
    """A streamed /api/chat answer as Ollama puts it on the wire: every NDJSON line its own chunk,
    the last line and the closing chunk in one write."""
    head = b"HTTP/1.1 %d OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n" % status
    lines = [json.dumps(step).encode() + b"\n" for step in steps]
    return head + b"".join(b"%x\r\n%s\r\n" % (len(line), line) for line in lines) + b"0\r\n\r\n"


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
