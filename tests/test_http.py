"""HTTP between client and proxy: request framing, Expect: 100-continue, keep-alive, body and
JSON limits, Host and Origin checks, and listening on IPv6.
"""

import http.client
import http.server
import io
import json
import re
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

import simple_api_proxy as proxy

from standins.ollama import chunk, final_chunk, Reply
from standins.proxy import (
    assert_valid_stream, config, logged_request, parse_sse, ProxyProcess, raw_exchange, read_until_closed,
    request_body, running_proxy,
)
from standins.support import need, wait_until


def test_keep_alive_connection_serves_several_requests(gateway):
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    for stream in (False, True, False):
        connection.request("POST", "/v1/messages", json.dumps(request_body(stream=stream)),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.read()
    connection.close()


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
