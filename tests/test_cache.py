"""The response cache: keys, the memory tier, replays, and the Redis tier (shared, private and
killed, tampered entries, and the proxy without redis-py).
"""

import ast
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

import simple_api_proxy as proxy

from standins.ollama import chunk, final_chunk, Reply, tool_reply
from standins.proxy import (
    assert_valid_stream, config, free_port, ollama_body, parse_sse, Proxy, request_body, running_proxy,
)
from standins.redis import PrivateRedis
from standins.support import anthropic_module, redis_module, ROOT, wait_until


def key_of(body, **config_settings):
    request = proxy.validate_messages_request(body, default_max_tokens=4096)
    settings = config(**config_settings)
    payload = ollama_body(request, proxy.resolve_model(request["model"], settings), settings)
    return proxy.cache_key(payload, request, settings.tool_call_recovery)


def test_cache_key_changes_with_everything_that_changes_the_answer():
    base = request_body(system="Be brief.", tools=[{"name": "Bash", "input_schema": {"type": "object"}}])
    variations = {
        "model": dict(base, model="llama3.2:3b"),
        "system": dict(base, system="Be verbose."),
        "messages": dict(base, messages=[{"role": "user", "content": "Hello!"}]),
        "tools": dict(base, tools=[{"name": "Read", "input_schema": {"type": "object"}}]),
        "tool_choice": dict(base, tool_choice={"type": "none"}),
        "max_tokens": dict(base, max_tokens=1025),
        "temperature": dict(base, temperature=0.5),
        "top_p": dict(base, top_p=0.5),
        "top_k": dict(base, top_k=5),
        "stop_sequences": dict(base, stop_sequences=["\n\n"]),
        "thinking": dict(base, thinking={"type": "adaptive"}),
        "output_config": dict(base, output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}}),
    }
    keys = {name: key_of(body) for name, body in variations.items()}
    keys["base"] = key_of(base)
    assert len(set(keys.values())) == len(keys), keys
    assert keys["base"].startswith("simple_api_proxy:v2:") and len(keys["base"]) == 20 + 64
    assert key_of(base, MODEL_MAP="sonnet=llama3.2:3b") != keys["base"]


def test_cache_key_ignores_what_does_not_change_the_answer():
    base = request_body(system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cch=aaa;"},
                                {"type": "text", "text": "Be brief."}])
    same = [
        dict(base, stream=True),
        dict(base, metadata={"user_id": "someone"}),
        dict(base, system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cch=bbb;"},
                           {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]),
        dict(base, messages=[{"role": "user", "content": [{"type": "text", "text": "Hello",
                                                           "cache_control": {"type": "ephemeral"}}]}]),
        dict(base, model="claude-opus-5-5"),
        dict(base, context_management={"edits": []}),
    ]
    assert {key_of(body) for body in same} == {key_of(base)}


def test_memory_tier_is_bounded_by_entries_and_bytes():
    tier = proxy.MemoryTier(max_entries=3, max_bytes=100, ttl=60)
    for name in "abcd":
        tier.put(name, name * 10, 10)
    assert tier.get("a") is None and tier.get("d") == "d" * 10
    tier.get("b")
    tier.put("e", "e", 10)
    assert tier.get("c") is None and tier.get("b") is not None
    tier.put("big", "z", 90)
    assert tier.bytes <= 100 and tier.get("big") is not None
    tier.put("huge", "z", 101)
    assert tier.get("huge") is None
    health = tier.health()
    assert health["state"] == "up" and health["entries"] == len(tier.entries) and health["hits"] >= 3


@pytest.mark.parametrize("text", ["plain", "\x00i\x00", '"\x00m\x00"', "\x00t\x00 and \x00i\x00", "é \u2028 \\u0000i\\u0000"])
def test_a_replayed_answer_is_the_stored_one_with_fresh_ids_and_the_callers_model(text):
    stored = proxy.message_object("msg_old", "claude-x", [
        {"type": "thinking", "thinking": text, "signature": ""},
        {"type": "text", "text": text},
        {"type": "tool_use", "id": "toolu_a", "name": "Bash", "input": {"command": text}},
        {"type": "tool_use", "id": "toolu_b", "name": "Read", "input": {"path": "/x"}}], "tool_use", None, 12, 34)
    original = json.loads(json.dumps(stored))
    answer = proxy.ReplayableAnswer(stored, proxy.json_bytes(stored))
    bodies = [answer.body(model) for model in ("claude-opus-5-5", 'odd "model" \u00e9', "claude-opus-5-5")]
    replays = [json.loads(body) for body in bodies] + [answer.fresh_message("claude-y")]
    ids = set()
    for replay, model in zip(replays, ("claude-opus-5-5", 'odd "model" \u00e9', "claude-opus-5-5", "claude-y")):
        assert replay["model"] == model
        ids.add(replay["id"])
        ids.update(block["id"] for block in replay["content"] if block["type"] == "tool_use")
        expected = dict(original, id=replay["id"], model=model, content=[
            dict(block, id=replay_block["id"]) if block["type"] == "tool_use" else block
            for block, replay_block in zip(original["content"], replay["content"])])
        assert replay == expected
    assert len(ids) == 12 and not ids & {"msg_old", "toolu_a", "toolu_b"}
    assert bodies[0] == proxy.json_bytes(replays[0])  # the very bytes json gives
    assert stored == original  # replays never change what is stored


def test_the_first_replays_of_an_answer_may_come_at_once_from_many_threads():
    stored = proxy.message_object("msg_old", "claude-x", [
        {"type": "text", "text": "hi " * 200},
        {"type": "tool_use", "id": "toolu_a", "name": "Bash", "input": {"command": "ls"}}], "tool_use", None, 3, 4)
    expected = dict(json.loads(proxy.json_bytes(stored)), id=None, model="m")
    for _ in range(30):
        answer = proxy.ReplayableAnswer(stored, proxy.json_bytes(stored))
        start, bodies = threading.Barrier(8), []

        def replay():
            start.wait(10)
            bodies.append(answer.body("m"))
        threads = [threading.Thread(target=replay) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        replays = [json.loads(body) for body in bodies]
        assert len(replays) == 8
        for replay in replays:
            replay["id"] = None
            assert replay["content"][1].pop("id").startswith("toolu_")
            assert replay == dict(expected, content=[expected["content"][0], {k: v for k, v in expected["content"][1].items() if k != "id"}])


def test_an_answer_that_would_not_be_replayed_is_not_stored(caplog):
    cache = proxy.ResponseCache(config(CACHE="on"))
    good = proxy.message_object("msg_a", "claude-x", [{"type": "text", "text": "hi"}], "end_turn", None, 3, 2)
    bad = proxy.message_object("msg_b", "claude-x", [{"type": "text", "text": "hi"}], "end_turn", None, 2.5, -3)
    cache.put("good", good)
    cache.put("bad", bad)
    assert cache.get("bad") is None and list(cache.memory.entries) == ["good"]
    assert json.loads(cache.get("good").body("claude-y"))["content"] == good["content"]
    assert any("bad" in r.getMessage() and "not stored" in r.getMessage() for r in caplog.records)


def test_memory_tier_entries_expire():
    tier = proxy.MemoryTier(max_entries=3, max_bytes=100, ttl=0.05)
    tier.put("a", "1", 1)
    time.sleep(0.1)
    assert tier.get("a") is None and tier.bytes == 0


def test_cache_hit_skips_ollama_and_says_so(ollama):
    with running_proxy(ollama.url, CACHE="on") as gateway:
        status, headers, first = gateway.messages(request_body())
        assert headers["x-cache"] == "MISS"
        status, headers, second = gateway.messages(request_body(model="claude-opus-5-5"))
        assert headers["x-cache"] == "HIT" and len(ollama.chats()) == 1
        assert second["content"] == first["content"] and second["id"] != first["id"]
        assert second["model"] == "claude-opus-5-5"
        status, headers, raw = gateway.stream(request_body())
        events = parse_sse(raw)
        assert_valid_stream(events)
        assert headers["x-cache"] == "HIT" and len(ollama.chats()) == 1
        assert "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta") == \
            first["content"][0]["text"]
        health = gateway.json("GET", "/health")[2]["cache"]
        assert health["memory"]["hits"] == 2 and health["memory"]["entries"] == 1
        assert health["redis"]["state"] == "disabled"


def test_cache_control_headers_and_cache_off(ollama):
    with running_proxy(ollama.url, CACHE="on") as gateway:
        assert gateway.messages(request_body(), {"Cache-Control": "no-store"})[1]["x-cache"] == "BYPASS"
        assert gateway.messages(request_body())[1]["x-cache"] == "MISS"
        assert gateway.messages(request_body(), {"Cache-Control": "no-cache"})[1]["x-cache"] == "BYPASS"
        assert gateway.messages(request_body())[1]["x-cache"] == "HIT"
        assert len(ollama.chats()) == 3
    with running_proxy(ollama.url, CACHE="off") as gateway:
        assert gateway.messages(request_body())[1]["x-cache"] == "BYPASS"
        assert gateway.messages(request_body())[1]["x-cache"] == "BYPASS"


@pytest.mark.parametrize("reply", [
    Reply(status=500, error="runner crashed"),
    Reply([chunk(content="Hi"), {"error": "runner crashed"}]),
    Reply([chunk(content="Hi"), ("cut",)]),
])
def test_errors_and_cut_streams_are_not_stored(ollama, reply):
    with running_proxy(ollama.url, CACHE="on") as gateway:
        for stream in (True, False):
            ollama.script(reply)
            gateway.call("POST", "/v1/messages", request_body(stream=stream))
        assert gateway.server.cache.memory.entries == {}
        assert gateway.messages(request_body())[1]["x-cache"] == "MISS"


def test_stream_whose_client_left_is_not_stored(ollama):
    ollama.script(Reply([chunk(content="a")] + [("sleep", 0.05), chunk(content="b")] * 40 + [final_chunk()]))
    with running_proxy(ollama.url, CACHE="on") as gateway:
        connection = socket.create_connection(("127.0.0.1", gateway.port))
        body = json.dumps(request_body(stream=True)).encode()
        connection.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert connection.recv(100).startswith(b"HTTP/1.1 200")
        connection.close()
        time.sleep(3)
        assert ollama.disconnects == 1 and gateway.server.cache.memory.entries == {}


@pytest.fixture
def shared_redis():
    """A Redis the proxies under test share: a private redis-server on a free port, so that no test
    reads, writes or empties a Redis it did not start (a user's own Redis may hold data)."""
    redis = redis_module()
    server = PrivateRedis()
    try:
        yield redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=1), \
            f"redis://127.0.0.1:{server.port}/0"
    finally:
        server.kill()


@pytest.fixture
def private_redis():
    server = PrivateRedis()
    yield server
    server.kill()


def test_redis_tier_is_shared_between_proxies_and_sets_the_ttl(ollama, shared_redis):
    client, url = shared_redis
    with running_proxy(ollama.url, CACHE="on", REDIS_URL=url, CACHE_TTL=600) as first, \
            running_proxy(ollama.url, CACHE="on", REDIS_URL=url) as second:
        assert first.messages(request_body())[1]["x-cache"] == "MISS"
        keys = client.keys("simple_api_proxy:v2:*")
        assert len(keys) == 1 and 590 <= client.ttl(keys[0]) <= 600
        stored = json.loads(client.get(keys[0]))
        assert stored["v"] == proxy.CACHE_ENTRY_VERSION
        assert stored["message"]["content"][0]["text"] == "Hello! I am the stand-in model."
        status, headers, raw = second.stream(request_body())
        assert headers["x-cache"] == "HIT" and len(ollama.chats()) == 1
        assert_valid_stream(parse_sse(raw))
        health = second.json("GET", "/health")[2]["cache"]["redis"]
        assert health["state"] == "up" and health["hits"] == 1 and health["db_keys"] == 1
        assert url.split("/")[2] in health["url"]


def test_sdk_stream_accumulator_parses_a_replayed_hit(ollama, shared_redis):
    anthropic = anthropic_module()
    client_redis, url = shared_redis
    tools = [{"name": "Bash", "input_schema": {"type": "object"}}]
    ollama.script(tool_reply(("Bash", {"command": "ls"}), text="Listing."))
    with running_proxy(ollama.url, CACHE="on", REDIS_URL=url) as gateway:
        client = anthropic.Anthropic(base_url=gateway.url, api_key="dummy", max_retries=0)
        finals = []
        for _ in range(2):
            with client.messages.stream(model="claude-opus-5-5", max_tokens=100, tools=tools,
                                        messages=[{"role": "user", "content": "ls"}]) as stream:
                finals.append(stream.get_final_message())
    assert len(ollama.chats()) == 1
    miss, hit = finals
    assert hit.id != miss.id and hit.stop_reason == "tool_use"
    assert [b.model_dump(exclude={"id"}) for b in hit.content] == [b.model_dump(exclude={"id"}) for b in miss.content]
    assert hit.content[1].id != miss.content[1].id  # each replay's tool_use ids are its own


def test_redis_killed_mid_traffic_costs_nothing_and_comes_back(ollama, private_redis):
    url = f"redis://127.0.0.1:{private_redis.port}/0"
    with running_proxy(ollama.url, CACHE="on", REDIS_URL=url) as gateway:
        results = []
        for index in range(60):
            if index == 20:
                private_redis.kill()
            started = time.monotonic()
            status, headers, _ = gateway.messages(request_body(f"question {index % 30}"))
            results.append((status, time.monotonic() - started, headers.get("x-cache")))
        assert all(status == 200 for status, _, _ in results)
        assert max(elapsed for _, elapsed, _ in results) < 1.0
        assert [cache for _, _, cache in results[30:40]] == ["HIT"] * 10  # memory tier still serves
        health = gateway.json("GET", "/health")[2]["cache"]["redis"]
        assert health["state"] == "down" and "Error" in health["last_error"]

        private_redis.start()
        deadline = time.monotonic() + 10
        while gateway.json("GET", "/health")[2]["cache"]["redis"]["state"] != "up":
            assert time.monotonic() < deadline, "Redis writes did not resume within 10 s"
            time.sleep(0.2)
        gateway.messages(request_body("after the restart"))
        client = redis_module().Redis(host="127.0.0.1", port=private_redis.port)
        assert len(client.keys("simple_api_proxy:v2:*")) == 1


def test_proxy_runs_without_redis_py(ollama, tmp_path):
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['redis'] = None\n")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(tmp_path), API_PORT=str(port), OLLAMA_HOST=ollama.url,
               REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", LOG_FILE="")
    process = subprocess.Popen([sys.executable, str(ROOT / "simple_api_proxy.py")], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        gateway = Proxy.__new__(Proxy)
        gateway.port, gateway.url = port, f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                if gateway.call("GET", "/")[0] == 200:
                    break
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        health = gateway.json("GET", "/health")[2]["cache"]
        assert health["redis"]["state"] == "disabled" and "redis-py is not installed" in health["redis"]["reason"]
        assert gateway.messages(request_body())[1]["x-cache"] == "MISS"
        assert gateway.messages(request_body())[1]["x-cache"] == "HIT"
    finally:
        process.terminate()
        output = process.communicate(timeout=15)[0]
    assert process.returncode == 0, output
    assert "redis-py is not installed" in output


TAMPERED_CACHE_VALUES = [b"garbage{{", b"[1,2,3]", b'{"id":"x"}', b"\xff\xfe",
                         json.dumps({"v": proxy.CACHE_ENTRY_VERSION, "message": {"type": "message"}}).encode(),
                         None]  # None: an answer in the format before entries were versioned


def tampered_values(valid_entry):
    message = json.loads(valid_entry)["message"]
    values = [value if value is not None else json.dumps(message).encode() for value in TAMPERED_CACHE_VALUES]
    bad_usage = json.loads(valid_entry)
    bad_usage["message"]["usage"]["output_tokens"] = "7"
    bad_block = json.loads(valid_entry)
    bad_block["message"]["content"] = [{"type": "tool_use", "name": "Bash"}]
    # Right types where the checks look, wrong ones in fields a client parses too.
    extra_fields = []
    for place, field, value in (("message", "container", 7), ("usage", "server_tool_use", "many"),
                                ("block", "citations", "not a list"), ("message", "id", 5),
                                ("message", "model", None)):
        entry = json.loads(valid_entry)
        target = {"message": entry["message"], "usage": entry["message"]["usage"],
                  "block": entry["message"]["content"][0]}[place]
        target[field] = value
        extra_fields.append(json.dumps(entry).encode())
    return values + [json.dumps(bad_usage).encode(), json.dumps(bad_block).encode(),
                     valid_entry.replace(b'"v":2', b'"v":2,"x":1e400')] + extra_fields


def assert_tampered_entries_are_misses(gateway, tamper, read, caplog):
    caplog.set_level("WARNING", logger="simple_api_proxy")
    assert gateway.messages(request_body("cached"))[1]["x-cache"] == "MISS"
    (key,) = gateway.server.cache.memory.entries
    valid = read(key)
    for number, value in enumerate(tampered_values(valid)):
        stream = bool(number % 2)
        caplog.clear()
        tamper(key, value)
        status, headers, raw = gateway.call("POST", "/v1/messages", request_body("cached", stream=stream))
        wait_until(lambda: gateway.server.active_requests == 0, what="the answer to be stored")
        assert status == 200 and headers["x-cache"] == "MISS", (value, raw)
        assert b"stand-in" in raw
        if stream:
            assert_valid_stream(parse_sse(raw))
        warned = [r for r in caplog.records if key in r.getMessage() and "redis" in r.getMessage()]
        assert len(warned) == 1, value
        assert proxy.decode_cache_entry(read(key)) is not None  # replaced by the fresh answer
        assert gateway.messages(request_body("cached"))[1]["x-cache"] == "HIT"


def test_tampered_redis_entries_are_misses_never_copied_to_memory(ollama, shared_redis, caplog):
    client, url = shared_redis
    with running_proxy(ollama.url, CACHE="on", REDIS_URL=url) as gateway:
        memory = gateway.server.cache.memory

        def tamper(key, value):
            memory.entries.clear()
            memory.bytes = 0
            client.set(key, value)

        assert_tampered_entries_are_misses(gateway, tamper, client.get, caplog)


def test_the_tests_never_empty_or_share_a_redis_they_did_not_start():
    # A user who runs the test command on a machine whose Redis holds data must not lose it: every
    # test Redis is a PrivateRedis, and nothing here flushes a database.
    machine_port = next(default for name, _, default, _ in proxy.SETTINGS if name == "REDIS_PORT")
    sources = [path for folder in ("tests", "bench") for path in (ROOT / folder).rglob("*.py")]
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.lower() in ("flushdb", "flushall", "flush_all"):
                pytest.fail(f"{path.name}:{node.lineno} empties a Redis database ({node.attr})")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search(
                    r"redis://[^/]*:%d\b" % machine_port, node.value):
                pytest.fail(f"{path.name}:{node.lineno} points at the machine's own Redis")
