#!/usr/bin/env python3
"""Soak test: mixed load through simple_api_proxy while Ollama and Redis fail on a schedule.

    python3 bench/soak.py              # 60 s
    python3 bench/soak.py --seconds 10

It starts the tests' stand-in Ollama, a private redis-server on a free port and the proxy as a
process (all on 127.0.0.1), then keeps CLIENTS connections busy with streaming and non-streaming
requests. Every prompt carries a nonce and the stand-in answers with text built from it, so an
answer that is lost, cut short without an error, or belongs to another request is caught.

Faults, by the clock (fractions of the run):
  Ollama  each request in the fault windows gets one scripted fault: reset before or during the
          stream, garbage or truncated NDJSON, {"error"} mid-stream, a hang before the first
          byte or mid-stream, 503 queue full, or a stray second answer after a complete one on
          the kept connection (which must cost nothing); a few requests ask for a model that is
          not installed (404); and Ollama is down altogether for a while (connection refused).
  Redis   killed at 30%, started again at 50%: it must cost no request anything.
  Cache   between 12% and 28%, some requests find a tampered value (garbage, a wrong shape, an
          old format) planted in Redis under their own cache key: it must be a miss, never replayed.

The summary lists requests sent, answers by status, client-visible failures by cause, and
answers lost or corrupted. It exits 1 if any answer was lost or corrupted, if a request failed
that no fault explains, or if Redis did not come back.
"""

import argparse
import collections
import contextlib
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import simple_api_proxy  # noqa: E402
from load import free_port, wait_for_port  # noqa: E402
from standins import ollama as standin  # noqa: E402  (the tests' stand-in Ollama and its script)
from standins.proxy import parse_sse  # noqa: E402

CLIENTS = 8
REQUEST_TIMEOUT = 30
OLLAMA_DOWN = (0.70, 0.78)  # fractions of the run
REDIS_DOWN = (0.30, 0.50)
FAULT_WINDOWS = ((0.10, 0.25), (0.55, 0.65), (0.85, 0.95))
FAULT_SHARE = 0.5  # of the requests that reach Ollama inside a fault window
MISSING_MODEL_SHARE = 0.02
REPEAT_SHARE = 0.3  # prompts drawn from a small set, so the cache hits
TAMPER_WINDOW = (0.12, 0.28)  # Redis is up; fractions of the run
TAMPER_SHARE = 0.3
TAMPERED_VALUES = (b"garbage{{", b"[1,2,3]", b'{"id":"x"}', b'{"v":2,"message":{"type":"message"}}',
                   b'{"type":"message","role":"assistant","content":[{"type":"text","text":"stale"}]}')


def answer_for(nonce):
    return f"Answer for {nonce}: all good."


# A whole second answer after a complete one, on a connection the proxy would keep: it must close
# that connection, so the stray answer never becomes another request's. The request itself succeeds.
STRAY_FAULT = "stray answer after the reply"
STRAY_ANSWER = standin.ollama_wire([standin.chunk(content="Answer for nobody: stray."), standin.final_chunk()])


def faults():
    """Each scripted fault: a name (the cause a client will see) and the stand-in's Reply."""
    c, final = standin.chunk, standin.final_chunk
    return [
        ("reset before the stream", lambda text: standin.Reply([("reset",)])),
        ("reset mid-stream", lambda text: standin.Reply([c(content=text[:5]), ("reset",)])),
        ("garbage NDJSON", lambda text: standin.Reply([c(content=text[:5]), ("raw", b"{garbage\n")])),
        ("truncated stream", lambda text: standin.Reply([c(content=text[:5]), ("cut",)])),
        ("error mid-stream", lambda text: standin.Reply([c(content=text[:5]), {"error": "runner crashed"}])),
        ("hang before the first byte", lambda text: standin.Reply(delay_before=4)),
        ("hang mid-stream", lambda text: standin.Reply([c(content=text[:5]), ("sleep", 4), final()])),
        ("503 queue full", lambda text: standin.Reply(
            status=503, error="server busy, please try again.  maximum pending requests exceeded")),
        (STRAY_FAULT, lambda text: standin.Reply([c(content=text), final(), ("after_end", STRAY_ANSWER)])),
    ]


class Soak:
    def __init__(self, seconds):
        self.seconds = seconds
        self.started = None
        self.lock = threading.Lock()
        self.injected = {}  # nonce -> fault name, as the stand-in decided
        self.results = []  # (nonce, stream, status, outcome, detail, phase when answered)
        self.sent = 0
        self.fault_list = faults()
        self.random = random.Random(7)
        self.tampered = 0
        self.redis = None  # (redis-py client, the proxy's Config) when cache values can be tampered with

    def phase(self):
        return (time.monotonic() - self.started) / self.seconds

    # -- the stand-in's side ---------------------------------------------------------
    def respond(self, request):
        prompt = request["messages"][-1]["content"]
        nonce = prompt.rsplit(" ", 1)[-1]
        text = answer_for(nonce)
        now = self.phase()
        with self.lock:
            faulty = any(a <= now < b for a, b in FAULT_WINDOWS) and self.random.random() < FAULT_SHARE
            name, make = self.random.choice(self.fault_list) if faulty else (None, None)
            if name:
                self.injected[nonce] = name
        if make:
            return make(text)
        pieces = [text[i:i + 4] for i in range(0, len(text), 4)]
        return standin.Reply([standin.chunk(content=p) for p in pieces] + [standin.final_chunk()],
                             per_token_delay=0.002)

    # -- the clients' side ------------------------------------------------------------
    def client(self, port, index):
        rng = random.Random(index)
        connection = None
        count = 0
        while time.monotonic() - self.started < self.seconds:
            count += 1
            if rng.random() < REPEAT_SHARE:
                nonce = f"repeat{rng.randrange(5)}"
            else:
                nonce = f"c{index}n{count}"
            stream = rng.random() < 0.5
            model = "absent:1b" if rng.random() < MISSING_MODEL_SHARE else "claude-opus-5-5"
            body = {"model": model, "max_tokens": 200, "stream": stream,
                    "messages": [{"role": "user", "content": f"Please answer {nonce}"}]}
            with self.lock:
                self.sent += 1
            if self.redis and TAMPER_WINDOW[0] <= self.phase() < TAMPER_WINDOW[1] and rng.random() < TAMPER_SHARE:
                self.tamper(body, rng.choice(TAMPERED_VALUES))
            if connection is None:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
            try:
                connection.request("POST", "/v1/messages", json.dumps(body), {"Content-Type": "application/json"})
                response = connection.getresponse()
                raw = response.read()
                status = response.status
                if response.will_close:
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                connection = None
                self.record(nonce, stream, None, "lost", f"{type(exc).__name__}: {exc}")
                continue
            self.judge(nonce, stream, status, raw, model)
        if connection:
            connection.close()

    def tamper(self, body, value):
        """Plant a bad value under the cache key this request will look up."""
        client, config = self.redis
        model = simple_api_proxy.resolve_model(body["model"], config)
        payload, _ = simple_api_proxy.anthropic_to_ollama(body, model, config)
        key = simple_api_proxy.cache_key(payload, body, config.tool_call_recovery)
        with contextlib.suppress(Exception):  # Redis may be restarting: then nothing was planted
            client.set(key, value)
            with self.lock:
                self.tampered += 1

    def judge(self, nonce, stream, status, raw, model):
        expected = answer_for(nonce)
        if status != 200:
            try:
                error = json.loads(raw)["error"]
                detail = f"{status} {error['type']}: {error['message'][:70]}"
            except (ValueError, KeyError, TypeError):
                return self.record(nonce, stream, status, "corrupted", f"not an error envelope: {raw[:80]!r}")
            return self.record(nonce, stream, status, "failed", detail)
        if not stream:
            try:
                text = "".join(b["text"] for b in json.loads(raw)["content"] if b["type"] == "text")
            except (ValueError, KeyError, TypeError):
                return self.record(nonce, stream, status, "corrupted", f"unreadable: {raw[:80]!r}")
            return self.record(nonce, stream, status, "ok" if text == expected else "corrupted", text[:60])
        try:
            events = parse_sse(raw)
        except (AssertionError, ValueError, IndexError):
            return self.record(nonce, stream, status, "corrupted", f"bad SSE framing: {raw[-80:]!r}")
        names = [name for name, _ in events]
        text = "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")
        if names and names[-1] == "error":
            error = events[-1][1]["error"]
            return self.record(nonce, stream, status, "failed", f"stream {error['type']}: {error['message'][:70]}")
        if not names or names[-1] != "message_stop":
            return self.record(nonce, stream, status, "lost", "stream ended without message_stop or error")
        return self.record(nonce, stream, status, "ok" if text == expected else "corrupted", text[:60])

    def record(self, nonce, stream, status, outcome, detail):
        with self.lock:
            self.results.append((nonce, stream, status, outcome, detail, self.phase()))


def start_redis():
    if not shutil.which("redis-server"):
        return None, None
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    return port, process


def health(port):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/health")
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()

    soak = Soak(args.seconds)
    ollama = standin.StandInOllama()
    ollama.responder = soak.respond
    ollama_port = ollama.port
    redis_port, redis = start_redis()
    proxy_port = free_port()
    env = dict(os.environ, API_PORT=str(proxy_port), OLLAMA_HOST=f"127.0.0.1:{ollama_port}", LOG_FILE="",
               LOG_LEVEL="ERROR", OLLAMA_TIMEOUT="1.5", OLLAMA_FIRST_TOKEN_TIMEOUT="2", CACHE_TTL="600")
    if redis_port:
        env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        with contextlib.suppress(ImportError):
            import redis as redis_py
            soak.redis = (redis_py.Redis(host="127.0.0.1", port=redis_port, socket_timeout=1),
                          simple_api_proxy.load_config([], env))
    proxy = subprocess.Popen([sys.executable, str(ROOT / "simple_api_proxy.py")], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    redis_back = None
    try:
        wait_for_port(proxy_port)
        soak.started = time.monotonic()
        clients = [threading.Thread(target=soak.client, args=(proxy_port, i), daemon=True) for i in range(CLIENTS)]
        for thread in clients:
            thread.start()
        events = sorted([(REDIS_DOWN[0], "redis down"), (REDIS_DOWN[1], "redis up"),
                         (OLLAMA_DOWN[0], "ollama down"), (OLLAMA_DOWN[1], "ollama up")])
        for at, what in events:
            time.sleep(max(0.0, soak.started + at * args.seconds - time.monotonic()))
            if what == "redis down" and redis:
                redis.kill()
                redis.wait(10)
            elif what == "redis up" and redis:
                redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                          "--save", "", "--appendonly", "no"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wait_for_port(redis_port)
            elif what == "ollama down":
                ollama.stop()
            elif what == "ollama up":
                ollama = standin.StandInOllama(port=ollama_port, responder=soak.respond)
        for thread in clients:
            thread.join(REQUEST_TIMEOUT + args.seconds)
        if redis_port:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if health(proxy_port)["cache"]["redis"]["state"] == "up":
                    redis_back = True
                    break
                time.sleep(0.2)
            else:
                redis_back = False
    finally:
        proxy.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proxy.communicate(timeout=15)
        ollama.stop()
        if redis:
            redis.kill()
            redis.wait(10)
    return report(soak, redis_back, proxy.returncode)


def ollama_down_explains(detail, phase, seconds):
    """Ollama refusing connections while down, or dropping the replies in flight as it went down."""
    if "cannot reach Ollama" in detail:
        return True
    going_down = OLLAMA_DOWN[0] <= phase <= OLLAMA_DOWN[0] + 2 / seconds
    return going_down and "closed the connection" in detail


def explained(outcome, detail, fault, phase, seconds):
    """Whether a client-visible failure is what the fault (or a missing model, or Ollama down) explains."""
    if outcome != "failed":
        return False
    if "not_found_error" in detail and "absent:1b" in detail:
        return True
    return fault not in (None, STRAY_FAULT) or ollama_down_explains(detail, phase, seconds)


def report(soak, redis_back, proxy_exit):
    by_status = collections.Counter(row[2] for row in soak.results)
    outcomes = collections.Counter(row[3] for row in soak.results)
    causes = collections.Counter()
    unexplained = []
    for nonce, stream, status, outcome, detail, phase in soak.results:
        fault = soak.injected.get(nonce)
        if outcome == "failed":
            cause = fault or ("model not installed" if "absent:1b" in detail else
                              "Ollama down" if ollama_down_explains(detail, phase, soak.seconds)
                              else "unexplained")
            causes[cause] += 1
        if outcome in ("failed", "lost", "corrupted") and not explained(outcome, detail, fault, phase,
                                                                         soak.seconds):
            unexplained.append((nonce, "stream" if stream else "json", status, outcome, detail))
    lost, corrupted = outcomes["lost"], outcomes["corrupted"]
    print(f"soak: {soak.seconds:g} s, {CLIENTS} clients, half streaming; Redis killed at "
          f"{REDIS_DOWN[0]:.0%} and back at {REDIS_DOWN[1]:.0%}; Ollama down {OLLAMA_DOWN[0]:.0%}–{OLLAMA_DOWN[1]:.0%}")
    print(f"requests sent: {soak.sent}; answered: {len(soak.results)}")
    strays = sum(1 for fault in soak.injected.values() if fault == STRAY_FAULT)
    print(f"stray answers written after a complete one: {strays} (each must cost no request anything)")
    print("answers by status: " + ", ".join(f"{status or 'none'}: {n}" for status, n in sorted(
        by_status.items(), key=lambda item: item[0] or 0)))
    print(f"ok: {outcomes['ok']}; client-visible failures: {outcomes['failed']}")
    for cause, n in causes.most_common():
        print(f"  {cause}: {n}")
    print(f"faults injected into Ollama replies: {len(soak.injected)}")
    print(f"tampered cache values planted in Redis: {soak.tampered if soak.redis else 'not run (no redis-py)'}")
    print(f"answers lost: {lost}; corrupted: {corrupted}")
    print(f"Redis back after its restart: {'yes' if redis_back else 'no' if redis_back is False else 'not run'}")
    print(f"proxy exit status after SIGTERM: {proxy_exit}")
    for row in unexplained[:20]:
        print("  unexpected:", row)
    failed = bool(unexplained) or lost or corrupted or redis_back is False or proxy_exit != 0
    print("soak: " + ("FAILED" if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
