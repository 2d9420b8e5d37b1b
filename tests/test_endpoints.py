"""The proxy's endpoints as a client meets them: /, /health, /v1/models, count_tokens and
/v1/messages, streaming and not.
"""

import json
import time

from standins.ollama import chunk, final_chunk, MODEL, Reply, text_reply, tool_reply
from standins.proxy import assert_valid_stream, free_port, parse_sse, request_body, running_proxy


def test_root_answers_get_and_head(gateway):
    status, headers, body = gateway.json("GET", "/")
    assert status == 200 and body["status"] == "ok" and headers["request-id"].startswith("req_")
    status, headers, raw = gateway.call("HEAD", "/")
    assert status == 200 and raw == b""


def test_health_reports_ollama_and_cache(gateway):
    status, _, body = gateway.json("GET", "/health")
    assert status == 200 and body["status"] == "ok"
    assert body["ollama"]["reachable"] and body["ollama"]["version"] == "0.33.0"
    assert body["ollama"]["default_model_installed"] is True and MODEL in body["ollama"]["models"]
    assert body["ollama"]["latency_ms"] >= 0 and body["cache"]["enabled"] is False


def test_health_is_503_json_when_ollama_is_down():
    with running_proxy(f"127.0.0.1:{free_port()}") as gateway:
        status, headers, body = gateway.json("GET", "/health")
    assert status == 503 and headers["content-type"] == "application/json"
    assert body["status"] == "degraded" and body["ollama"]["reachable"] is False
    assert "cannot reach Ollama" in body["ollama"]["error"]


def test_models_list_in_anthropic_shape_with_paging(gateway):
    status, _, body = gateway.json("GET", "/v1/models?limit=2")
    assert status == 200 and body["has_more"] is True
    assert [m["id"] for m in body["data"]] == [MODEL, "llama3.2:3b"]
    assert body["data"][0] == {"type": "model", "id": MODEL, "display_name": f"{MODEL} (7.6B)",
                               "created_at": "2026-05-10T08:06:48Z"}
    status, _, rest = gateway.json("GET", "/v1/models?after_id=llama3.2:3b")
    assert [m["id"] for m in rest["data"]] == ["qwen3:8b"] and rest["has_more"] is False
    status, _, one = gateway.json("GET", "/v1/models/claude-opus-5-5")
    assert status == 200 and one["id"] == "claude-opus-5-5" and MODEL in one["display_name"]
    status, _, missing = gateway.json("GET", "/v1/models/mistral:7b")
    assert status == 404 and missing["error"]["type"] == "not_found_error"


def test_unknown_routes_and_methods_get_the_error_envelope(gateway):
    status, _, body = gateway.json("GET", "/v2/anything")
    assert status == 404 and body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert body["request_id"].startswith("req_")
    status, headers, body = gateway.json("GET", "/v1/messages")
    assert status == 405 and "POST" in body["error"]["message"] and headers["allow"] == "POST"
    status, _, body = gateway.json("DELETE", "/v1/messages")
    assert status == 405 and body["type"] == "error" and "DELETE" in body["error"]["message"]
    # HEAD goes wherever GET does (RFC 9110 §9.3.2), and a 405 says what does (§15.5.6).
    status, headers, _ = gateway.call("HEAD", "/v1/models")
    assert status == 200 and int(headers["content-length"]) > 0
    assert gateway.call("DELETE", "/v1/models")[1]["allow"] == "GET, HEAD"


def test_count_tokens_estimates_without_calling_ollama(gateway, ollama):
    body = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "word " * 700}],
            "system": "Be brief.", "tools": [{"name": "Bash", "input_schema": {"type": "object"}}]}
    status, _, counted = gateway.json("POST", "/v1/messages/count_tokens?beta=true", body)
    assert status == 200 and 1000 < counted["input_tokens"] < 1100
    assert ollama.chats() == []


def test_message_non_streaming(gateway, ollama):
    status, headers, message = gateway.messages(request_body(system="Be brief.", temperature=0.1))
    assert status == 200 and headers["content-type"] == "application/json"
    assert int(headers["content-length"]) > 0
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["model"] == "claude-sonnet-4-5" and message["id"].startswith("msg_")
    assert message["content"] == [{"type": "text", "text": "Hello! I am the stand-in model."}]
    assert message["stop_reason"] == "end_turn" and message["stop_sequence"] is None
    assert message["usage"] == {"input_tokens": 26, "output_tokens": 6, "cache_creation_input_tokens": 0,
                                "cache_read_input_tokens": 0}
    sent = ollama.chats()[-1]
    assert sent["model"] == MODEL and sent["stream"] is True and sent["options"]["temperature"] == 0.1
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


def test_message_streaming_follows_the_protocol(gateway):
    status, headers, raw = gateway.stream(request_body())
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = parse_sse(raw)
    assert_valid_stream(events)
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "Hello! I am the stand-in model."
    assert events[0][1]["message"]["model"] == "claude-sonnet-4-5"
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn" and events[-2][1]["usage"]["output_tokens"] == 6


def test_query_string_and_unknown_fields_are_accepted(gateway):
    body = request_body(context_management={"edits": [{"type": "clear_thinking_20251015"}]},
                        output_config={"effort": "high"}, thinking={"type": "adaptive", "display": "omitted"},
                        metadata={"user_id": "u1"}, cache_control={"type": "ephemeral"}, speed="fast")
    status, _, message = gateway.json("POST", "/v1/messages?beta=true", body,
                                      {"anthropic-beta": "a,b", "anthropic-version": "2026-10-21"})
    assert status == 200 and message["content"][0]["type"] == "text"


def test_tool_calls_round_trip(gateway, ollama):
    ollama.script(tool_reply(("Bash", {"command": "ls"}), text="Let me look."))
    tools = [{"name": "Bash", "description": "Run", "input_schema": {"type": "object"}}]
    status, _, message = gateway.messages(request_body(tools=tools))
    assert message["stop_reason"] == "tool_use"
    text, call = message["content"]
    assert text == {"type": "text", "text": "Let me look."}
    assert call["type"] == "tool_use" and call["name"] == "Bash" and call["input"] == {"command": "ls"}
    follow_up = request_body(tools=tools, messages=[
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": message["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "a.txt"}]}])
    status, _, final = gateway.messages(follow_up)
    assert status == 200 and final["stop_reason"] == "end_turn"
    sent = ollama.chats()[-1]["messages"]
    assert sent[-2]["tool_calls"][0]["id"] == call["id"]
    assert sent[-1] == {"role": "tool", "content": "a.txt", "tool_call_id": call["id"], "tool_name": "Bash"}


def test_streamed_tool_call_uses_input_json_delta(gateway, ollama):
    ollama.script(tool_reply(("Bash", {"command": "ls -la"})))
    status, _, raw = gateway.stream(request_body(tools=[{"name": "Bash", "input_schema": {"type": "object"}}]))
    events = parse_sse(raw)
    assert_valid_stream(events)
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert deltas == [{"type": "input_json_delta", "partial_json": '{"command": "ls -la"}'}]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_max_tokens_maps_to_length_stop(gateway, ollama):
    ollama.script(text_reply("cut short", done_reason="length"))
    status, _, message = gateway.messages(request_body(max_tokens=2))
    assert message["stop_reason"] == "max_tokens" and ollama.chats()[-1]["options"]["num_predict"] == 2


def test_max_tokens_zero_answers_without_generating(gateway, ollama):
    status, _, message = gateway.messages(request_body(max_tokens=0))
    assert status == 200 and message["content"] == [] and message["stop_reason"] == "max_tokens"
    assert ollama.chats() == []


def test_stop_sequence_is_reported_and_generation_stopped(gateway, ollama):
    ollama.script(Reply([chunk(content="alpha "), chunk(content="END"), ("sleep", 5), chunk(content="late")]))
    started = time.monotonic()
    status, _, message = gateway.messages(request_body(stop_sequences=["END"]))
    assert message["stop_reason"] == "stop_sequence" and message["stop_sequence"] == "END"
    assert message["content"] == [{"type": "text", "text": "alpha "}]
    assert time.monotonic() - started < 3


def test_thinking_model_gets_think_flag_and_capabilities_are_cached(gateway, ollama):
    ollama.script(Reply([chunk(thinking="pondering"), chunk(content="42"), final_chunk()]), text_reply())
    body = request_body(model="qwen3:8b", max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 2000})
    status, _, message = gateway.messages(body)
    assert ollama.chats()[-1]["think"] is True
    assert message["content"] == [{"type": "thinking", "thinking": "pondering", "signature": ""},
                                  {"type": "text", "text": "42"}]
    gateway.messages(request_body(model="qwen3:8b"))
    assert ollama.chats()[-1]["think"] is False
    assert sum(1 for path, _ in ollama.requests if path == "/api/show") == 1


def test_seed_guides_own_checks_answer_without_max_tokens(gateway, ollama):
    """SEED_GUIDE.md's bodies, copied literally: its curl check and its "Custom Applications" example."""
    curl_check = '{"messages":[{"role":"user","content":"Hello"}],"model":"qwen2.5-coder:7b"}'
    custom_application = {"model": "qwen2.5-coder:7b", "messages": [{"role": "user", "content": "Hello"}]}
    for raw in (curl_check.encode(), json.dumps(custom_application).encode()):
        status, _, answer = gateway.json("POST", "/v1/messages", raw)
        assert status == 200 and answer["content"][0]["text"] == "Hello! I am the stand-in model."
    assert [chat["options"]["num_predict"] for chat in ollama.chats()] == [4096, 4096]
    with running_proxy(ollama.url, DEFAULT_MAX_TOKENS=77) as small:
        assert small.json("POST", "/v1/messages", curl_check.encode())[0] == 200
    assert ollama.chats()[-1]["options"]["num_predict"] == 77
    status, _, answer = gateway.json("POST", "/v1/messages", dict(custom_application, max_tokens="200"))
    assert status == 400 and "max_tokens: Input should be a valid integer" in answer["error"]["message"]


def test_health_carries_an_instance_id_per_run(ollama):
    with running_proxy(ollama.url) as first, running_proxy(ollama.url, PROXY_API_KEY="k-1") as second:
        ids = [first.json("GET", "/health")[2]["instance_id"] for _ in range(2)]
        other = second.json("GET", "/health")[2]["instance_id"]  # without the key: still there
    assert ids[0] == ids[1] == first.server.instance_id and len(ids[0]) == 16
    assert other != ids[0]
