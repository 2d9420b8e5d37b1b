#!/usr/bin/env python3
# Stand-in for simple_api_proxy.py: serves /health on $API_HOST:$API_PORT.
# STUB_PROXY_RECORD: file to write pid and environment to; STUB_PROXY_STATUS:
# status of /health; STUB_PROXY_SILENT: never listen (health never answers).
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
