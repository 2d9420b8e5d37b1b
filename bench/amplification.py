#!/usr/bin/env python3
"""Amplification: what bodies built to be expensive cost the proxy, and whether others still get served.

Each scenario starts a fresh proxy process (so its peak RSS is the scenario's own) in front of
bench/standin_ollama.py, sends its bodies, and meanwhile sends an ordinary request every 0.1 s on
another connection. It prints, per scenario: how the bodies were answered, the longest wait of an
ordinary request, the proxy's peak RSS (VmHWM) and the CPU seconds it spent.

    python3 bench/amplification.py                      # the proxy in this checkout
    python3 bench/amplification.py --proxy /tmp/old.py  # another copy, e.g. a baseline

Loopback only; every request has a timeout, and the run ends by itself. Linux: it reads /proc.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from load import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
ORDINARY = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 5,
                       "messages": [{"role": "user", "content": "Hello"}]}).encode()


def tiny_arrays(size):
    return b"[" + b"[]," * (size // 3 - 1) + b"[]]"


def tiny_messages(count):
    message = b'{"role":"user","content":"a"}'
    return (b'{"model":"claude-sonnet-4-5","max_tokens":5,"messages":[' + b",".join([message] * count) + b"]}")


def long_prompt(size):
    text = ("All work and no play makes Jack a dull boy. " * (size // 44))[:size - 100]
    return json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 5,
                       "messages": [{"role": "user", "content": text}]}).encode()


SCENARIOS = (
    ("3 clients x 30 MiB of [],", lambda: [tiny_arrays(30 * MIB)] * 3),
    ("1 client x 32 MiB of [],", lambda: [tiny_arrays(32 * MIB - 16)]),
    ("0.9 M tiny messages (27 MiB)", lambda: [tiny_messages(900_000)]),
    ("3 clients x 30 MiB of prompt text", lambda: [long_prompt(30 * MIB)] * 3),
)


def exchange(port, body, timeout=120):
    """POST body to /v1/messages on a new connection; the status of the answer (None if none came)."""
    head = (b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    answer = b""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(head + body)
        while True:
            part = connection.recv(65536)
            if not part:
                break
            answer += part
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


def proxy_figures(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    peak_kib = int(status.split("VmHWM:")[1].split()[0])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return peak_kib / 1024, cpu


def run_scenario(proxy_path, ollama_port, bodies):
    port = free_port()
    env = dict(os.environ, API_PORT=str(port), OLLAMA_HOST=f"127.0.0.1:{ollama_port}", LOG_FILE="",
               LOG_LEVEL="WARNING", CACHE="off")
    proxy = subprocess.Popen([sys.executable, str(proxy_path)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        statuses, waits = [], []
        senders = [threading.Thread(target=lambda b=body: statuses.append(exchange(port, b))) for body in bodies]
        for sender in senders:
            sender.start()
        while any(sender.is_alive() for sender in senders):
            began = time.monotonic()
            exchange(port, ORDINARY, timeout=60)
            waits.append(time.monotonic() - began)
            time.sleep(0.1)
        peak_mib, cpu = proxy_figures(proxy.pid)
        return statuses, max(waits, default=0.0), peak_mib, cpu
    finally:
        proxy.kill()
        proxy.wait(10)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy", type=Path, default=ROOT / "simple_api_proxy.py", help="proxy file to run")
    args = parser.parse_args()
    ollama_port = free_port()
    ollama = subprocess.Popen([sys.executable, str(ROOT / "bench" / "standin_ollama.py"), "--port",
                               str(ollama_port), "--tokens", "5"], stdout=subprocess.DEVNULL)
    try:
        wait_for_port(ollama_port)
        print(f"proxy: {args.proxy}")
        print("| scenario | answers | longest wait of an ordinary request | proxy peak RSS | proxy CPU |")
        print("|---|---|---|---|---|")
        for name, make in SCENARIOS:
            statuses, wait, peak_mib, cpu = run_scenario(args.proxy, ollama_port, make())
            answers = ", ".join(str(s) for s in sorted(statuses, key=str))
            print(f"| {name} | {answers} | {wait:.2f} s | {peak_mib:.0f} MiB | {cpu:.1f} s |", flush=True)
    finally:
        ollama.kill()
        ollama.wait(10)


if __name__ == "__main__":
    main()
