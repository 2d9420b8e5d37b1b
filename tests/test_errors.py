"""Errors a client sees for its own request or for Ollama's refusal: status, type and wording.
"""

import json

import pytest

import simple_api_proxy as proxy

from standins.ollama import MODEL, Reply
from standins.proxy import config, ollama_body, request_body, running_proxy


@pytest.mark.parametrize("raw, fragment", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"model": "m", "max_tokens": 5.5, "messages": [{"role": "user", "content": "x"}]}',
     "max_tokens: Input should be a valid integer"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
])
def test_bad_bodies_get_400_and_the_server_keeps_serving(gateway, raw, fragment):
    status, headers, body = gateway.json("POST", "/v1/messages", raw)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert fragment in body["error"]["message"] and headers["x-should-retry"] == "false"
    assert "Traceback" not in json.dumps(body)
    assert gateway.json("GET", "/")[0] == 200


def test_missing_model_is_404_listing_installed_models(gateway):
    status, headers, body = gateway.messages(request_body(model="mistral:7b"))
    assert status == 404 and body["error"]["type"] == "not_found_error"
    message = body["error"]["message"]
    assert "mistral:7b" in message and MODEL in message and "ollama pull" in message
    status, _, raw = gateway.stream(request_body(model="mistral:7b"))
    assert status == 404


def test_prompt_too_long_uses_anthropics_wording(ollama):
    with running_proxy(ollama.url, OLLAMA_NUM_CTX=1000) as gateway:
        status, _, body = gateway.messages(request_body("word " * 5000))
    assert status == 400
    assert body["error"]["message"].startswith("prompt is too long: ")
    assert body["error"]["message"].endswith(" tokens > 1000 maximum")
    assert ollama.chats() == []


@pytest.mark.parametrize("reply, status, error_type", [
    (Reply(status=503, error="server busy, please try again.  maximum pending requests exceeded"), 529,
     "overloaded_error"),
    (Reply(status=500, error="llama runner process has terminated"), 500, "api_error"),
    (Reply(status=400, error='"qwen2.5-coder:7b" does not support thinking'), 400, "invalid_request_error"),
    (Reply(status=429, error="rate limited"), 429, "rate_limit_error"),
])
def test_ollama_errors_before_the_stream_keep_their_status(gateway, ollama, reply, status, error_type):
    for stream in (False, True):
        ollama.script(reply)
        got, headers, raw = gateway.call("POST", "/v1/messages", request_body(stream=stream))
        body = json.loads(raw)
        assert got == status and body["error"]["type"] == error_type
        assert reply.error in body["error"]["message"]


@pytest.mark.parametrize("extra, field", [
    ({"temperature": 1.5}, "temperature: Input should be between 0 and 1"),
    ({"temperature": -0.1}, "temperature: Input should be between 0 and 1"),
    ({"top_p": 2}, "top_p: Input should be between 0 and 1"),
    ({"top_k": -1}, "top_k: Input should be greater than or equal to 0"),
    ({"top_k": 2.5}, "top_k: Input should be a valid integer"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1000}}, "thinking.budget_tokens: Input should be greater"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking.budget_tokens: `max_tokens` must be"),
    ({"thinking": {"type": "enabled"}}, "thinking.enabled.budget_tokens: Field required"),
    ({"stop_sequences": ["x"] * (proxy.MAX_STOP_SEQUENCES + 1)}, "stop_sequences: at most"),
    ({"stop_sequences": ["ok", "y" * (proxy.MAX_STOP_SEQUENCE_CHARS + 1)]}, "stop_sequences.1: a stop sequence"),
])
def test_anthropic_value_rules_are_400s_naming_the_field(extra, field):
    body = request_body(**extra)
    body["max_tokens"] = 2048
    with pytest.raises(proxy.ProxyError) as caught:
        proxy.validate_messages_request(body, default_max_tokens=4096)
    assert caught.value.status == 400 and caught.value.error_type == "invalid_request_error"
    assert field in caught.value.message
    fine = request_body(temperature=1, top_p=0, top_k=0, stop_sequences=["s"] * proxy.MAX_STOP_SEQUENCES,
                        max_tokens=1025, thinking={"type": "enabled", "budget_tokens": 1024})
    assert proxy.validate_messages_request(fine, default_max_tokens=4096) is fine


def test_non_finite_numbers_and_missing_models_are_refused_through_the_proxy(gateway, ollama):
    body = json.dumps(request_body()).encode()
    for field, raw in (("temperature", body[:-1] + b', "temperature": 1e400}'),
                       ("tools.0.input_schema.maximum", body[:-1] + b', "tools": [{"name": "t", "input_schema": '
                                                                         b'{"type": "object", "maximum": -2E999}}]}')):
        status, _, answer = gateway.call("POST", "/v1/messages", raw)
        error = json.loads(answer)["error"]
        assert status == 400 and error["type"] == "invalid_request_error"
        assert error["message"].startswith(f"{field}: Input should be a finite number")
    assert ollama.chats() == []
    counted = dict(request_body(), model="no-such-model:1b")
    status, _, answer = gateway.json("POST", "/v1/messages/count_tokens", counted)
    assert status == 404 and answer["error"]["type"] == "not_found_error"
    assert gateway.json("POST", "/v1/messages", counted)[0] == 404


def test_errors_name_the_clients_own_message_index():
    body = request_body(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                  {"role": "assistant", "content": [{"type": "tool_use", "id": "t1",
                                                                     "name": "Bash", "input": "ls"}]}])
    with pytest.raises(proxy.ProxyError) as caught:
        ollama_body(body, MODEL, config())
    assert caught.value.message.startswith("messages.2.content.0.input")


def test_ollama_context_length_refusal_uses_anthropics_wording(gateway, ollama):
    ollama.script(Reply(status=400, error="the prompt is longer than the context length currently available"))
    status, _, body = gateway.messages(request_body())
    assert status == 400 and body["error"]["message"].startswith("prompt is too long: 32769 tokens > 32768 maximum")
