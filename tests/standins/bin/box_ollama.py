#!/usr/bin/env python3
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
