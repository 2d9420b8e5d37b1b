#!/usr/bin/env python3
"""A ThreadingHTTPServer that does nothing but answer every POST with the same prepared bytes.

bench/run.py starts it next to the proxy on the cache-hit rows: it shows what http.server itself
costs per request (its email-based header parsing and its thread per connection), so a hit's
figures can be read against the cheapest answer this design could give.

    python3 bench/do_nothing_server.py --port 8010 --answer answer.json --headers headers.json
"""

from __future__ import annotations

import argparse
import http.server
import json
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--answer", required=True, help="file holding the body of every answer")
    parser.add_argument("--headers", required=True, help="JSON file: the answer's extra headers as an object")
    args = parser.parse_args(argv)
    with open(args.answer, "rb") as answer_file:
        body = answer_file.read()
    with open(args.headers) as headers_file:
        extra = json.load(headers_file)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # the head and the body leave in two writes

        def do_GET(self):
            self.answer(b"")

        def do_POST(self):
            self.answer(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

        def answer(self, request_body):
            self.send_response(200)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
