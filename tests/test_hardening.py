"""Hardening: access, limits, faults inside the proxy, logs, shutdown and secrets.
"""

import contextlib
import http.client
import http.server
import json
import socket
import threading
import time

import pytest

import simple_api_proxy as proxy

from standins.ollama import chunk, final_chunk, Reply, text_reply
from standins.proxy import (
    assert_threads_freed, free_port, logged_request, parse_sse, ProxyProcess, raw_exchange, request_body,
    running_proxy,
)
from standins.support import anthropic_module, wait_until


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
                       "release": (proxy.UpstreamExchange, "keep_or_close")}[stage]
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
            assert gateway.server.in_flight == 0 and gateway.server.pool.hosts[0].in_flight == 0, n


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
