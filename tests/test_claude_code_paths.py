"""Claude Code's paths that need more than a translation: thinking hidden from the client
(display omitted, the redact-thinking beta) and sealed in its signature, server tools answered
unavailable, the start-up warning for a window too small for Claude Code's prompt, and the prompt
prefix a deferred tool's load keeps.

Request shapes recorded from Claude Code 2.1.332 through the proxy (tests/recorded/) are replayed
against a proxy in front of the stand-in Ollama. print_mode_after_tool.json is `-p`'s second
request of a Bash tool loop, its thinking sealed with recorded/.../thinking.key; web_search.json
is the side request of its WebSearch tool; deferred_tool_load.json the request after ToolSearch
loaded NotebookEdit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import simple_api_proxy as proxy

from standins.ollama import chunk, final_chunk, MODEL, ollama_call, ollama_prompt, Reply, text_reply
from standins.proxy import (assert_valid_stream, config, ollama_body, parse_sse, ProxyProcess, request_body,
                            running_proxy, streamed_content, translate)
from standins.support import claude_code_binary, ROOT

RECORDED = Path(__file__).resolve().parent / "recorded" / "claude_code_2.1.332"
RECORDED_KEY = RECORDED / "thinking.key"
RECORDED_THINKING = "The user wants the command run. I will call Bash."
THINKING_MODEL = "qwen3:8b"  # the stand-in's model that can think


def recorded(name):
    """(body, headers) of a recorded request."""
    record = json.loads((RECORDED / name).read_text())
    return record["body"], {"anthropic-beta": record["anthropic-beta"]}


def first_print_request():
    """`-p`'s first request: the recorded second one without the tool call and its result."""
    body, headers = recorded("print_mode_after_tool.json")
    return dict(body, messages=body["messages"][:-2]), headers


def thinking_answer(thinking=("Let me think. ", "Done thinking."), text="The answer."):
    return Reply([chunk(thinking=piece) for piece in thinking] + [chunk(content=text), final_chunk()])


def streamed_message(raw):
    """The message a stream carries, every delta applied (signature_delta included)."""
    events = parse_sse(raw)
    assert_valid_stream(events)
    return events, streamed_content(events)


###############################################################################
# The seal
###############################################################################

def test_a_seal_opens_with_its_key_only_and_only_unaltered():
    seal = proxy.ThinkingSeal.from_key_file("")
    text = "Reasoning with ünïcode, \"quotes\" and a newline\n" * 20
    sealed = seal.seal(text)
    assert seal.open(sealed) == text and seal.open(seal.seal("")) == ""
    assert seal.seal(text) != sealed  # a fresh nonce each time
    assert text not in sealed and "Reasoning" not in proxy.base64.b64decode(sealed).decode("latin-1")
    assert proxy.ThinkingSeal.from_key_file("").open(sealed) is None
    raw = bytearray(proxy.base64.b64decode(sealed))
    for position in (0, 1, 17, 40, len(raw) - 33, len(raw) - 1):
        altered = bytearray(raw)
        altered[position] ^= 1
        assert seal.open(proxy.base64.b64encode(bytes(altered)).decode()) is None, position
    for garbage in ("", "not base64!", sealed[:-8], proxy.base64.b64encode(b"\x01" * 20).decode(), "A" * 200):
        assert seal.open(garbage) is None


def test_the_key_file_is_made_once_readable_by_its_owner_and_then_kept(tmp_path):
    path = tmp_path / "box" / "thinking.key"
    with pytest.raises(proxy.ThinkingKeyError, match="cannot create THINKING_KEY_FILE"):
        proxy.ThinkingSeal.from_key_file(str(path))
    path.parent.mkdir()
    sealed = proxy.ThinkingSeal.from_key_file(str(path)).seal("kept across restarts")
    assert path.stat().st_mode & 0o777 == 0o600 and len(path.read_text().strip()) == 64
    assert proxy.ThinkingSeal.from_key_file(str(path)).open(sealed) == "kept across restarts"
    path.write_text("short\n")
    with pytest.raises(proxy.ThinkingKeyError, match="holds 5 bytes"):
        proxy.ThinkingSeal.from_key_file(str(path))


def test_a_proxy_whose_key_file_cannot_serve_says_why_and_exits(tmp_path):
    key = tmp_path / "thinking.key"
    key.write_text("tiny")
    env = dict(os.environ, THINKING_KEY_FILE=str(key), API_PORT="0", LOG_FILE="", OLLAMA_WARMUP="off")
    result = subprocess.run([sys.executable, str(ROOT / "simple_api_proxy.py")], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1 and f"THINKING_KEY_FILE '{key}' holds 4 bytes" in result.stderr


###############################################################################
# Hidden thinking: translation
###############################################################################

def test_omitted_thinking_streams_no_text_and_a_signature_that_seals_it():
    seal = proxy.ThinkingSeal.from_key_file("")
    events, translator = translate([chunk(thinking="First, "), chunk(thinking="second."), chunk(content="Answer"),
                                    final_chunk()], hidden_thinking="omitted", thinking_seal=seal)
    assert_valid_stream(events)
    blocks = [(name, data.get("content_block") or data.get("delta")) for name, data in events
              if name.startswith("content_block") and name != "content_block_stop"]
    signature = translator.message["content"][0]["signature"]
    assert blocks == [("content_block_start", {"type": "thinking", "thinking": "", "signature": ""}),
                      ("content_block_delta", {"type": "signature_delta", "signature": signature}),
                      ("content_block_start", {"type": "text", "text": ""}),
                      ("content_block_delta", {"type": "text_delta", "text": "Answer"})]
    assert translator.message["content"] == [{"type": "thinking", "thinking": "", "signature": signature},
                                              {"type": "text", "text": "Answer"}]
    assert seal.open(signature) == "First, second."


def test_redacted_thinking_is_one_block_whose_data_is_the_seal_before_a_tool_call():
    seal = proxy.ThinkingSeal.from_key_file("")
    events, translator = translate(
        [chunk(thinking="Call it."), chunk(tool_calls=[ollama_call("Bash", {"command": "ls"})]), final_chunk()],
        hidden_thinking="redacted", thinking_seal=seal, tool_names=["Bash"])
    assert_valid_stream(events)
    content = translator.message["content"]
    assert [block["type"] for block in content] == ["redacted_thinking", "tool_use"]
    assert events[1] == ("content_block_start", {"type": "content_block_start", "index": 0,
                                                 "content_block": content[0]})
    assert events[2] == ("content_block_stop", {"type": "content_block_stop", "index": 0})
    assert seal.open(content[0]["data"]) == "Call it."


def test_thinking_shown_or_not_asked_for_is_unchanged():
    seal = proxy.ThinkingSeal.from_key_file("")
    chunks = [chunk(thinking="Visible."), chunk(content="Hi"), final_chunk()]
    _, shown = translate(chunks, show_thinking=True, thinking_seal=seal, hidden_thinking="omitted")
    assert shown.message["content"][0] == {"type": "thinking", "thinking": "Visible.", "signature": ""}
    _, dropped = translate(chunks)
    assert [block["type"] for block in dropped.message["content"]] == ["text"]


def test_a_replay_streams_the_stored_signature_and_redacted_block():
    message = proxy.message_object("msg_1", "claude-opus-5-5", [
        {"type": "thinking", "thinking": "", "signature": "c2VhbGVk"},
        {"type": "redacted_thinking", "data": "ZGF0YQ=="},
        {"type": "text", "text": "Hi"}], "end_turn", None, 10, 3)
    events = proxy.message_to_events(message)
    assert_valid_stream(events)
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert deltas == [{"type": "signature_delta", "signature": "c2VhbGVk"}, {"type": "text_delta", "text": "Hi"}]
    assert events[4][1]["content_block"] == {"type": "redacted_thinking", "data": "ZGF0YQ=="}
    assert proxy.is_replayable_message(message)


def test_sealed_thinking_goes_back_to_the_model_and_a_foreign_seal_is_left_out():
    seal = proxy.ThinkingSeal.from_key_file("")
    other = proxy.ThinkingSeal.from_key_file("")
    assistant = [{"type": "thinking", "thinking": "", "signature": seal.seal("Mine.")},
                 {"type": "redacted_thinking", "data": seal.seal("Also mine.")},
                 {"type": "thinking", "thinking": "", "signature": other.seal("Planted.")},
                 {"type": "redacted_thinking", "data": "bm90IGEgc2VhbA=="},
                 {"type": "thinking", "thinking": "", "signature": ""},
                 {"type": "text", "text": "Done."}]
    request = request_body(messages=[{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": assistant},
                                     {"role": "user", "content": "Go on"}])
    notes = []
    payload = ollama_body(request, MODEL, config(), notes=notes, thinking_seal=seal)
    assert payload["messages"][1] == {"role": "assistant", "content": "Done.", "thinking": "Mine.\n\nAlso mine."}
    assert [note.split(":")[0] for note in notes] == ["[thinking at messages.1.content.2 left out",
                                                      "[thinking at messages.1.content.3 left out"]
    assert "sealed by another key" in notes[0]
    summarized = request_body(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "Shown text.", "signature": ""}, {"type": "text", "text": "Ok"}]}])
    assert ollama_body(summarized, MODEL, config(), thinking_seal=seal)["messages"][1]["thinking"] == "Shown text."


###############################################################################
# Hidden thinking: Claude Code's recorded print-mode requests through the proxy
###############################################################################

def test_recorded_print_mode_turn_gives_the_model_its_thinking_back(ollama, caplog):
    body, headers = recorded("print_mode_after_tool.json")
    assert body["thinking"] == {"type": "adaptive", "display": "omitted"}
    ollama.responder = lambda request: text_reply("Output: proxy-42")
    with running_proxy(ollama.url, OLLAMA_MODEL=THINKING_MODEL, THINKING_KEY_FILE=RECORDED_KEY) as gateway:
        status, _, raw = gateway.stream(body, headers)
    assert status == 200 and streamed_message(raw)[1] == [{"type": "text", "text": "Output: proxy-42"}]
    chat = ollama.chats()[-1]
    assistant = [message for message in chat["messages"] if message["role"] == "assistant"]
    assert assistant == [{"role": "assistant", "content": "Running it.", "thinking": RECORDED_THINKING,
                          "tool_calls": [{"id": body["messages"][-2]["content"][2]["id"], "function": {
                              "name": "Bash", "arguments": {"command": "echo proxy-42", "description": "Echo"}}}]}]
    assert chat["think"] == "medium"


def test_recorded_print_mode_turn_after_a_key_change_is_served_without_that_thinking(ollama, caplog, tmp_path):
    body, headers = recorded("print_mode_after_tool.json")
    caplog.set_level("INFO", logger="simple_api_proxy")
    ollama.responder = lambda request: text_reply("Output: proxy-42")
    with running_proxy(ollama.url, OLLAMA_MODEL=THINKING_MODEL, THINKING_KEY_FILE=tmp_path / "new.key") as gateway:
        status, _, answer = gateway.messages(dict(body, stream=False), headers)
    assert status == 200 and answer["content"] == [{"type": "text", "text": "Output: proxy-42"}]
    assistant = [message for message in ollama.chats()[-1]["messages"] if message["role"] == "assistant"]
    assert "thinking" not in assistant[0] and assistant[0]["content"] == "Running it."
    assert "thinking at messages.2.content.0 left out: sealed by another key" in caplog.text


@pytest.mark.parametrize("stream", [True, False])
def test_recorded_first_print_request_gets_sealed_thinking_that_the_next_turn_restores(ollama, stream, tmp_path):
    body, headers = first_print_request()
    ollama.script(Reply([chunk(thinking="Plan: run "), chunk(thinking="echo."), chunk(content="Running it."),
                         chunk(tool_calls=[ollama_call("Bash", {"command": "echo hi", "description": "Echo"})]),
                         final_chunk()]),
                  text_reply("Output: hi"))
    with running_proxy(ollama.url, OLLAMA_MODEL=THINKING_MODEL, THINKING_KEY_FILE=tmp_path / "key") as gateway:
        if stream:
            status, _, raw = gateway.stream(body, headers)
            events, content = streamed_message(raw)
            assert not any(name == "content_block_delta" and data["delta"]["type"] == "thinking_delta"
                           for name, data in events)
        else:
            status, _, answer = gateway.messages(dict(body, stream=False), headers)
            content = answer["content"]
        assert status == 200
        assert [block["type"] for block in content] == ["thinking", "text", "tool_use"]
        assert content[0]["thinking"] == "" and len(content[0]["signature"]) > 40
        assert "Plan" not in json.dumps(content)
        # Claude Code's next request: the assistant turn as it came, then the tool's result.
        after = dict(body, messages=body["messages"] + [
            {"role": "assistant", "content": content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": content[2]["id"], "content": "hi"}]}])
        assert gateway.messages(dict(after, stream=False), headers)[0] == 200
    assert ollama.chats()[-1]["messages"][-2]["thinking"] == "Plan: run echo."


def test_hidden_thinking_replays_from_the_cache_with_the_same_signature(ollama, tmp_path):
    body, headers = first_print_request()
    ollama.script(thinking_answer())
    with running_proxy(ollama.url, OLLAMA_MODEL=THINKING_MODEL, CACHE="on",
                       THINKING_KEY_FILE=tmp_path / "key") as gateway:
        _, first_headers, first = gateway.messages(dict(body, stream=False), headers)
        _, hit_headers, hit = gateway.messages(dict(body, stream=False), headers)
        _, stream_headers, raw = gateway.stream(body, headers)
    assert (first_headers["x-cache"], hit_headers["x-cache"], stream_headers["x-cache"]) == ("MISS", "HIT", "HIT")
    assert hit["content"] == first["content"] and streamed_message(raw)[1] == first["content"]
    assert first["content"][0]["signature"] and len(ollama.chats()) == 1


def test_the_redact_thinking_beta_gets_redacted_thinking_and_the_model_probe_a_plain_answer(ollama, tmp_path):
    beta = {"anthropic-beta": "interleaved-thinking-2025-05-14,redact-thinking-2026-02-12"}
    ollama.script(thinking_answer(), text_reply("ok"))
    with running_proxy(ollama.url, OLLAMA_MODEL=THINKING_MODEL, THINKING_KEY_FILE=tmp_path / "key") as gateway:
        status, _, raw = gateway.stream(request_body(max_tokens=2048, thinking={"type": "adaptive"}), beta)
        content = streamed_message(raw)[1]
        assert status == 200 and [block["type"] for block in content] == ["redacted_thinking", "text"]
        seal = gateway.server.thinking_seal
        assert seal.open(content[0]["data"]) == "Let me think. Done thinking."
        # Claude Code's /model check: the beta, max_tokens 1, no thinking asked for.
        probe = {"model": "claude-haiku-4-5", "max_tokens": 1, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}]}]}
        status, _, answer = gateway.messages(probe, beta)
    assert status == 200 and answer["content"] == [{"type": "text", "text": "ok"}]
    assert ollama.chats()[-1]["think"] is False


def test_the_sdk_accumulates_the_signature_of_omitted_thinking(sdk, ollama):
    anthropic, client = sdk
    ollama.models["claude-thinker"] = ["completion", "tools", "thinking"]
    ollama.script(thinking_answer(), thinking_answer())
    arguments = dict(model="claude-thinker", max_tokens=2048, messages=[{"role": "user", "content": "Hi"}],
                     thinking={"type": "adaptive", "display": "omitted"})
    with client.messages.stream(**arguments) as stream:
        final = stream.get_final_message()
    created = client.messages.create(**arguments)
    for message in (final, created):
        assert message.content[0].type == "thinking" and message.content[0].thinking == ""
        assert message.content[0].signature and message.content[1].text == "The answer."


###############################################################################
# Server tools
###############################################################################

@pytest.mark.parametrize("stream", [True, False])
def test_recorded_web_search_request_is_answered_unavailable_without_the_model(gateway, ollama, stream):
    body, headers = recorded("web_search.json")
    assert [tool["type"] for tool in body["tools"]] == ["web_search_20250305"]
    assert body["tool_choice"] == {"type": "auto"}
    if stream:
        status, response_headers, raw = gateway.stream(body, headers)
        events, content = streamed_message(raw)
        delta = [data for name, data in events if name == "message_delta"][0]
        stop_reason, usage = delta["delta"]["stop_reason"], delta["usage"]
    else:
        status, response_headers, answer = gateway.messages(dict(body, stream=False), headers)
        content, stop_reason, usage = answer["content"], answer["stop_reason"], answer["usage"]
    assert status == 200 and response_headers["x-cache"] == "BYPASS"
    call_id = content[0]["id"]
    assert call_id.startswith("srvtoolu_") and len(call_id) == 33
    assert content[0] == {"type": "server_tool_use", "id": call_id, "name": "web_search",
                          "input": {}, **({"partial_json": "{}"} if stream else {})}
    assert content[1] == {"type": "web_search_tool_result", "tool_use_id": call_id,
                          "content": {"type": "web_search_tool_result_error", "error_code": "unavailable"}}
    assert stop_reason == "end_turn" and usage["server_tool_use"] == {"web_search_requests": 0,
                                                                      "web_fetch_requests": 0}
    assert usage["output_tokens"] == 0 and ollama.chats() == []


@pytest.mark.parametrize("kind, result_type, error_type", [
    ("web_search_20260209", "web_search_tool_result", "web_search_tool_result_error"),
    ("web_fetch_20250910", "web_fetch_tool_result", "web_fetch_tool_result_error"),
    ("code_execution_20250825", "code_execution_tool_result", "code_execution_tool_result_error"),
    ("tool_search_tool_regex_20251119", "tool_search_tool_result", "tool_search_tool_result_error"),
])
def test_each_server_tool_is_answered_with_its_own_result_block(gateway, ollama, kind, result_type, error_type):
    name = kind.rsplit("_", 1)[0]  # web_fetch_20250910 -> web_fetch, as the SDKs' types name them
    status, _, answer = gateway.messages(request_body(tools=[{"type": kind, "name": name}]))
    assert status == 200 and answer["content"][0]["name"] == name
    assert answer["content"][1] == {"type": result_type, "tool_use_id": answer["content"][0]["id"],
                                    "content": {"type": error_type, "error_code": "unavailable"}}
    assert ollama.chats() == []


def test_the_sdk_reads_the_unavailable_answer_streamed_and_not(sdk, ollama):
    anthropic, client = sdk
    arguments = dict(model="claude-opus-5-5", max_tokens=1024, tools=[{"type": "web_search_20250305",
                                                                      "name": "web_search", "max_uses": 8}],
                     messages=[{"role": "user", "content": "Perform a web search for the query: proxies"}])
    created = client.messages.create(**arguments)
    with client.messages.stream(**arguments) as stream:
        final = stream.get_final_message()
    for message in (created, final):
        assert isinstance(message.content[0], anthropic.types.ServerToolUseBlock)
        assert isinstance(message.content[1], anthropic.types.WebSearchToolResultBlock)
        assert message.content[1].content.error_code == "unavailable"
        assert message.usage.server_tool_use.web_search_requests == 0
    assert ollama.chats() == []


def test_server_tools_beside_client_tools_are_not_offered_and_the_model_is_told(gateway, ollama):
    tools = [{"type": "web_search_20250305", "name": "web_search"},
             {"name": "get_weather", "input_schema": {"type": "object"}}]
    payload = ollama_body(request_body(tools=tools, system="Be brief."), MODEL, config())
    assert [tool["function"]["name"] for tool in payload["tools"]] == ["get_weather"]
    system = payload["messages"][0]["content"]
    assert system.startswith("Be brief.\n\n") and system.endswith(proxy.server_tools_note(tools[:1]))
    assert "Never answer as if you had used them" in system
    later = request_body(tools=tools, system="Be brief.", messages=[
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "More"}])
    assert ollama_body(later, MODEL, config())["messages"][0] == payload["messages"][0]  # the same every turn
    assert gateway.messages(request_body(tools=tools))[2]["content"][0]["type"] == "text"
    forced = gateway.messages(request_body(tools=tools, tool_choice={"type": "tool", "name": "web_search"}))[2]
    assert [block["type"] for block in forced["content"]] == ["server_tool_use", "web_search_tool_result"]
    # tool_choice none: the client wants an answer without tools; the model gives it, told.
    assert gateway.messages(request_body(tools=tools[:1], tool_choice={"type": "none"}))[0] == 200
    chats = ollama.chats()
    assert len(chats) == 2 and "tools" not in chats[1]
    assert chats[1]["messages"][0]["content"] == proxy.server_tools_note(tools[:1])


def test_a_server_tool_request_for_a_model_ollama_lacks_is_a_404(gateway):
    status, _, answer = gateway.messages(request_body(model="no-such-model:1b",
                                                      tools=[{"type": "web_search_20250305", "name": "web_search"}]))
    assert status == 404 and answer["error"]["type"] == "not_found_error"


###############################################################################
# A window too small for Claude Code's prompt
###############################################################################

def test_windows_that_cannot_hold_claude_codes_prompt_and_an_answer_are_named():
    assert proxy.small_window_warning(32768) is None and proxy.small_window_warning(16384) is None
    # 13,500 + an eighth of the window: 15,420 at 15,360, 15,437 at 15,500.
    assert proxy.small_window_warning(15360) and proxy.small_window_warning(15500) is None
    warning = proxy.small_window_warning(8192)
    assert warning.startswith("OLLAMA_NUM_CTX=8192 cannot hold Claude Code's prompt with all its tools")
    assert "14,524 tokens in all" in warning and "--lean" in warning and "16384" in warning


def test_the_proxy_warns_at_start_and_the_recorded_first_request_is_refused_as_the_warning_says(ollama, tmp_path):
    small = ProxyProcess(tmp_path, OLLAMA_HOST=ollama.url, OLLAMA_NUM_CTX="8192", OLLAMA_WARMUP="off")
    try:
        body, headers = first_print_request()
        status, _, answer = small.gateway.json("POST", "/v1/messages", dict(body, stream=False), headers)
    finally:
        small.process.send_signal(proxy.signal.SIGTERM)
        assert small.finish() == 0
    assert "WARNING OLLAMA_NUM_CTX=8192 cannot hold Claude Code's prompt" in small.output
    assert status == 400 and answer["error"]["message"].startswith("prompt is too long: ")
    assert int(answer["error"]["message"].split()[4]) > 13000 and ollama.chats() == []
    (tmp_path / "default").mkdir()
    default = ProxyProcess(tmp_path / "default", OLLAMA_HOST=ollama.url, OLLAMA_WARMUP="off")
    default.process.send_signal(proxy.signal.SIGTERM)
    assert default.finish() == 0 and "cannot hold Claude Code's prompt" not in default.output


###############################################################################
# A deferred tool's load and the prompt prefix
###############################################################################

def common_prefix(first, second):
    return next((index for index, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))


def test_a_recorded_deferred_tool_load_keeps_the_system_prompt_and_earlier_tools_as_prefix(gateway, ollama):
    """Claude Code sends a deferred tool's schema only once ToolSearch has loaded it, so it cannot be
    offered earlier. The proxy sends it after the others: Ollama's prompt keeps the system prompt and
    every earlier tool, and what it evaluates again is the conversation, once per load."""
    loaded, headers = recorded("deferred_tool_load.json")
    assert [tool["name"] for tool in loaded["tools"] if tool.get("defer_loading")] == \
        ["NotebookEdit", "DeferredToolPlaceholder"]
    before = dict(loaded, messages=loaded["messages"][:-2],
                  tools=[tool for tool in loaded["tools"] if tool["name"] != "NotebookEdit"])
    for body in (before, loaded):
        ollama.script(text_reply("ok"))
        assert gateway.messages(dict(body, stream=False), headers)[0] == 200
    earlier, later = ollama.chats()
    assert [tool["function"]["name"] for tool in later["tools"]] == \
        [tool["function"]["name"] for tool in earlier["tools"]] + ["NotebookEdit"]
    first, second = ollama_prompt(earlier), ollama_prompt(later)
    kept = common_prefix(first, second)
    tools_end = len(ollama_prompt(dict(earlier, messages=[m for m in earlier["messages"] if m["role"] == "system"])))
    assert tools_end - 1 <= kept < tools_end  # up to the tools list's closing bracket
    evaluated_again = len(first) - kept  # what the earlier prompt held after the kept prefix
    conversation = len(first) - tools_end
    assert conversation <= evaluated_again <= conversation + 1
    assert proxy.estimate_tokens(later) > 15000 and conversation / proxy.CHARS_PER_TOKEN > 2000


def test_the_deferred_tool_measurement_runs_and_finds_each_load():
    claude_code_binary()  # skips (or fails under CI) without the CLI
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "deferred_tool_prefix.py")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if "(loads " in line]
    assert [row.split("(loads ")[1].split(")")[0] for row in rows] == ["NotebookEdit", "WebFetch"]
    again = [int(row.split("|")[-2].replace(",", "")) for row in rows]
    assert all(figure > 2000 for figure in again)  # the conversation so far, evaluated once more
    assert "ENABLE_TOOL_SEARCH=false:" in result.stdout
