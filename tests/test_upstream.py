"""The proxy's side of Ollama: timeouts, faults and disconnects, kept-alive connections, the
chunk parser and broken answers, several hosts, failover and warm-up.
"""

import contextlib
import itertools
import json
import queue
import select
import socket
import threading
import time

import pytest

import simple_api_proxy as proxy

from standins.ollama import (
    chunk, final_chunk, Gate, host_list, MODEL, ollama_wire, RawOllama, Reply, StandInOllama, text_reply,
    tool_reply,
)
from standins.proxy import (
    assert_threads_freed, assert_valid_stream, config, free_port, parse_sse, proxy_message, request_body,
    running_proxy,
)
from standins.support import wait_for, wait_until


def test_ollama_unreachable_is_502_naming_the_address():
    port = free_port()
    with running_proxy(f"127.0.0.1:{port}") as gateway:
        status, _, body = gateway.messages(request_body())
    assert status == 502 and body["error"]["type"] == "api_error"
    assert f"127.0.0.1:{port}" in body["error"]["message"] and "ollama serve" in body["error"]["message"]


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


def restarted(host):
    """The same Ollama back on the same port, as after a reboot."""
    return StandInOllama(models=host.models, port=host.port)


@pytest.fixture
def fast_recheck(monkeypatch):
    monkeypatch.setattr(proxy.UpstreamPool, "RECHECK_SECONDS", 0.05)


def test_ollama_host_lists_several_hosts(capsys):
    settings = config(OLLAMA_HOST="gpu-a, gpu-b:11500 ,https://gpu-c")
    assert [h.url for h in settings.ollama_addresses] == ["http://gpu-a:11434", "http://gpu-b:11500",
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
        wait_for(lambda: [h.in_flight for h in gateway.server.pool.hosts] == [0, 0], "the generations to end")


@pytest.mark.parametrize("stream", [False, True])
def test_a_host_that_fails_before_answering_costs_no_request(hosts, stream):
    first, second = hosts
    with running_proxy(host_list(hosts)) as gateway:
        pool = gateway.server.pool

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
            pool = gateway.server.pool
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
    first.responder = lambda body: Reply(delay_before=proxy.Generation.FAIL_FAST_SECONDS + 0.5, drop="reset")
    with running_proxy(host_list(hosts)) as gateway:
        gateway.server.pool._turn = 0  # both idle: the first host is tried first
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
        pool = gateway.server.pool.hosts
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
            wait_for(lambda: not any(host.in_flight for host in gateway.server.pool.hosts), "the generation to end")
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
            assert exchange.finished and not exchange.response.unusable
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
        fast = exchange.response._whole_line_chunks
        exchange.response._whole_line_chunks = lambda *args: calls.append(args[1]) or fast(*args)
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
    client = proxy.OllamaClient(settings, settings.ollama_addresses[0])
    ours, ollama = socket.socketpair()
    ours.setblocking(False)
    with ours, ollama:
        exchange = proxy.UpstreamExchange(ours, "test", client)
        ollama.sendall(ollama_wire(text_reply("done").steps))
        lines = []
        while not exchange.finished:
            exchange.poller.poll(5000)
            exchange.receive()
            lines += exchange.pop_lines()
        assert json.loads(lines[-1])["done"]
        exchange.keep_or_close()
        assert client._idle == [ours]
        if extra:
            ollama.sendall(extra)  # arrives after the answer was complete, while the connection is kept
            select.select([ours], [], [], 5)
        assert client._idle_connection() is (None if extra else ours)
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


def test_ipv6_ollama_host_gets_a_bracketed_host_header():
    settings = config(OLLAMA_HOST="[::1]:11434")
    client = proxy.OllamaClient(settings, settings.ollama_addresses[0])
    assert client._host_header == b"[::1]:11434"


def test_each_ollama_host_uses_its_own_scheme():
    settings = config(OLLAMA_HOST="https://gpu-a,gpu-b")
    secure, plain = (proxy.OllamaClient(settings, host) for host in settings.ollama_addresses)
    assert secure._tls is not None and plain._tls is None


def stop_listening(host):
    """The host stops taking connections; connections it has stay open, as a crashing Ollama's
    kept-alive sockets do for a moment."""
    host.server.shutdown()
    host.server.server_close()


def upstream_in_flight(gateway):
    text = gateway.call("GET", "/metrics")[2].decode()
    return sorted(line for line in text.splitlines() if line.startswith("simple_api_proxy_upstream_in_flight{"))


# Where the first host dies, and whether the request can still move: until a line of the answer
# has been given out, the client must not notice; after that it gets an error, never a 500. In
# every case the host then stops listening, as an Ollama that crashed, so a resend on a fresh
# connection to it fails too.
KILL_STEPS = {
    "connect": ("gone", True),                     # no connection at all
    "send": (Reply(drop="reset"), True),           # it takes the request and resets the connection
    "kept-alive": ("kept", True),                  # the kept connection closed without an answer
    "headers": (Reply([("cut",)]), True),          # 200 and its headers, then nothing
    "first line": (Reply([chunk(content="Hal"), ("cut",)]), False),
    "mid-stream": (Reply([chunk(content="Hal"), chunk(content="f a"), chunk(content="nswer"), ("cut",)]), False),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("step", list(KILL_STEPS))
def test_a_host_killed_at_every_step_moves_the_request_or_fails_cleanly(hosts, step, stream):
    first, second = hosts
    how, moves = KILL_STEPS[step]
    with running_proxy(host_list(hosts), OLLAMA_WARMUP="off") as gateway:
        pool = gateway.server.pool
        wait_for(lambda: all(host.models is not None for host in pool.hosts), "both hosts' model lists")
        pool._turn = 0  # both idle: the first host is asked first
        assert gateway.messages(request_body("a first turn keeps a connection to the first host"))[0] == 200
        assert len(first.chats()) == 1 and not second.chats()
        if how == "gone":
            first.stop()
        else:
            if how == "kept":
                first.drop_kept = True
            else:
                first.script(how)
            stop_listening(first)
        pool._turn = 0
        status, _, raw = gateway.call("POST", "/v1/messages", request_body("the question", stream=stream))
        if moves:
            assert status == 200
            message = proxy_message(raw, stream)
            assert message["content"][0]["text"] == "Hello! I am the stand-in model.", raw
            assert len(second.chats()) == 1
        else:
            assert not second.chats(), "the answer had begun: it must not be generated twice"
            if stream:
                events = parse_sse(raw)
                assert status == 200 and events[-1][0] == "error"
                assert "Hal" in "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")
            else:
                assert status == 502 and json.loads(raw)["error"]["type"] == "api_error", raw
        wait_for(lambda: [host.in_flight for host in pool.hosts] == [0, 0], "every host's count back to 0")
        assert upstream_in_flight(gateway) == sorted(
            f'simple_api_proxy_upstream_in_flight{{host="{host.url}"}} 0' for host in hosts)
        assert_threads_freed(gateway)
