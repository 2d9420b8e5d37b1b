"""The /metrics endpoint: what it counts, and who may read it.
"""

import json
import threading

from standins.ollama import chunk, final_chunk, Gate, host_list, MODEL, Reply, tool_reply
from standins.proxy import request_body, running_proxy
from standins.support import need, wait_for


def scrape(gateway, headers=None, busy=0):
    """GET /metrics parsed by Prometheus' own parser: {(name, sorted labels): value}."""
    try:
        from prometheus_client import parser
    except ImportError:
        parser = None
    need(parser is not None, "prometheus_client is not installed (pip install prometheus_client)")
    # A request is counted once answered: after its last byte has left.
    wait_for(lambda: gateway.server.active_requests == busy, "the requests to be counted")
    status, response_headers, raw = gateway.call("GET", "/metrics", headers=headers)
    assert status == 200 and response_headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {}
    for family in parser.text_string_to_metric_families(raw.decode()):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def sample(samples, name, **labels):
    return samples.get(("simple_api_proxy_" + name, tuple(sorted(labels.items()))), 0)


def test_metrics_count_known_traffic(ollama):
    with running_proxy(ollama.url, CACHE="on") as gateway:
        for _ in range(2):  # a miss, then a hit
            assert gateway.messages(request_body("count me"))[0] == 200
        assert gateway.stream(request_body("stream me"))[0] == 200
        assert gateway.messages(request_body(model="mistral:7b"))[0] == 404
        assert gateway.call("GET", "/nowhere")[0] == 404
        gate = Gate()
        ollama.responder = gate
        waiting = threading.Thread(target=gateway.messages, args=(request_body("held"),))
        waiting.start()
        wait_for(lambda: len(ollama.chats()) == 3, "the held generation upstream")
        during = scrape(gateway, busy=1)
        gate.opened.set()
        waiting.join(20)
        wait_for(lambda: gateway.server.in_flight == 0, "the generation to end")
        after = scrape(gateway)
    assert sample(during, "in_flight") == 1 and sample(after, "in_flight") == 0
    assert sample(after, "requests_total", route="messages", status="200", model=MODEL) == 4
    assert sample(after, "requests_total", route="messages", status="404", model="other") == 1
    assert sample(after, "requests_total", route="unknown", status="404", model="none") == 1
    assert sample(after, "requests_total", route="metrics", status="200", model="none") == 1
    assert sample(after, "request_duration_seconds_count", route="messages") == 5
    assert sample(after, "request_duration_seconds_bucket", route="messages", le="+Inf") == 5
    assert sample(after, "time_to_first_token_seconds_count") == 3  # the generations, not the hit
    assert sample(after, "cache_lookups_total", tier="memory", result="hit") == 1
    assert sample(after, "cache_lookups_total", tier="memory", result="miss") == 4  # the 404 looked too
    # The stand-in reports 26 prompt tokens and one output token per word, for each generation.
    assert sample(after, "tokens_total", direction="input") == 3 * 26
    assert sample(after, "tokens_total", direction="output") == 3 * 6
    assert sample(after, "upstream_up", host=ollama.url) == 1


def test_metrics_count_tool_calls_recovered_from_text(gateway, ollama):
    tools = [{"name": "Bash", "input_schema": {"type": "object"}}]
    ollama.script(Reply([chunk(content='{"name": "Bash", "arguments": {"command": "ls"}}'), final_chunk()]),
                  tool_reply(("Bash", {"command": "pwd"})))  # a structured call: not counted
    for n in range(2):
        status, _, message = gateway.messages(request_body(f"run {n}", tools=tools))
        assert status == 200 and message["stop_reason"] == "tool_use"
    assert sample(scrape(gateway), "tool_calls_from_text_total") == 1


def test_metrics_need_the_api_key_and_count_upstream_failures(hosts):
    with running_proxy(host_list(hosts), PROXY_API_KEY="s3cret") as gateway:
        assert gateway.call("GET", "/metrics")[0] == 401
        key = {"x-api-key": "s3cret"}
        hosts[0].stop()
        gateway.server.pool._turn = 0  # both idle: the first host is tried first
        assert gateway.messages(request_body(), headers=key)[0] == 200
        samples = scrape(gateway, {"authorization": "Bearer s3cret"})
    assert sample(samples, "upstream_up", host=hosts[0].url) == 0
    assert sample(samples, "upstream_up", host=hosts[1].url) == 1
    # refused, or closed if the start-up check met the host as it stopped
    assert sum(sample(samples, "upstream_errors_total", host=hosts[0].url, kind=kind)
               for kind in ("refused", "closed", "reset")) >= 1
    assert sample(samples, "requests_total", route="messages", status="200", model=MODEL) == 1


def test_metrics_count_529s_by_limit(ollama):
    ollama.responder = gate = Gate()
    with running_proxy(ollama.url, MAX_CONCURRENT=1) as gateway:
        held = threading.Thread(target=gateway.messages, args=(request_body("first"),))
        held.start()
        wait_for(lambda: ollama.chats(), "the first generation upstream")
        assert gateway.messages(request_body("second"))[0] == 529
        gate.opened.set()
        held.join(20)
        samples = scrape(gateway)
    assert sample(samples, "overloaded_total", limit="generations") == 1
    assert sample(samples, "requests_total", route="messages", status="529", model=MODEL) == 1


def test_made_up_model_names_share_one_label_and_are_404_on_every_path(ollama):
    with running_proxy(ollama.url) as gateway:
        for number in range(20):
            for max_tokens in (0, 16):
                status, _, error = gateway.messages(request_body(model=f"made-up-{number}:7b", max_tokens=max_tokens))
                assert status == 404 and error["error"]["type"] == "not_found_error", error
        status, _, error = gateway.json("POST", "/v1/messages/count_tokens",
                                        {"model": "made-up-0:7b", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 404, error
        assert gateway.messages(request_body(model="llama3.2:3b", max_tokens=0))[0] == 200  # installed
        assert gateway.messages(request_body(max_tokens=0))[0] == 200
        samples = scrape(gateway)
        models = {dict(labels).get("model") for (name, labels) in samples
                  if name == "simple_api_proxy_requests_total"}
        assert models == {"other", "llama3.2:3b", MODEL, "none"}, models
        assert sample(samples, "requests_total", route="messages", status="404", model="other") == 40


def test_no_request_can_break_metrics(ollama):
    with running_proxy(ollama.url) as gateway:
        for model in ("x\ud800", "\udfff", "new\nline\"quote\\", "claude-\ud83d"):
            body = json.dumps(request_body(model=model, max_tokens=0)).encode()  # \\uXXXX escapes: valid JSON
            status, _, raw = gateway.call("POST", "/v1/messages", body,
                                          headers={"Content-Type": "application/json"})
            assert status in (200, 404), raw
            assert scrape(gateway), "every scrape answers"
