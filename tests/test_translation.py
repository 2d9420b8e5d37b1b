"""Translation between the Anthropic Messages API and Ollama's chat API: requests (models,
system prompts, messages, tools, windows) and responses (streams, stop sequences, tool calls).
Pure functions are tested without sockets; the rest goes through a real proxy.
"""

import json
import re

import pytest

import simple_api_proxy as proxy

from standins.ollama import chunk, final_chunk, MODEL, ollama_call, ollama_prompt, text_reply, tool_reply
from standins.proxy import (
    assert_valid_stream, config, ollama_body, parse_sse, proxy_message, request_body, running_proxy,
    translate,
)
from standins.support import wait_until


def test_model_names_map_per_family():
    settings = config(MODEL_MAP="haiku=llama3.2:3b,opus=qwen2.5-coder:32b")
    assert proxy.resolve_model("claude-3-5-haiku-20241022", settings) == "llama3.2:3b"
    assert proxy.resolve_model("claude-opus-5-5", settings) == "qwen2.5-coder:32b"
    assert proxy.resolve_model("claude-sonnet-4-5", settings) == MODEL
    assert proxy.resolve_model("llama3.2:3b", settings) == "llama3.2:3b"


def test_system_blocks_join_and_billing_header_goes():
    body = request_body(system=[
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332; cch=abc123;"},
        {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Be brief."}])
    payload = ollama_body(body, MODEL, config())
    assert payload["messages"][0] == {"role": "system", "content": "You are Claude Code.\n\nBe brief."}
    other = dict(body, system=[dict(body["system"][0], text="x-anthropic-billing-header: cch=zzz;")] + body["system"][1:])
    assert ollama_body(other, MODEL, config()) == payload


def test_options_and_fields_map_to_ollama():
    body = request_body(temperature=0.2, top_p=0.9, top_k=40, stop_sequences=["###"], metadata={"user_id": "u"},
                        context_management={"edits": []}, service_tier="auto", unknown_new_field={"x": 1})
    payload = ollama_body(body, MODEL, config(OLLAMA_KEEP_ALIVE="30m"))
    assert payload["model"] == MODEL and payload["stream"] is True and payload["keep_alive"] == "30m"
    assert payload["options"] == {"num_ctx": 32768, "num_predict": 1024, "temperature": 0.2, "top_p": 0.9,
                                  "top_k": 40}
    assert "think" not in payload and "tools" not in payload
    assert ollama_body(body, MODEL, config(OLLAMA_KEEP_ALIVE="-1"))["keep_alive"] == -1


def test_thinking_is_sent_only_to_models_that_can_think(gateway, ollama):
    adaptive = request_body(thinking={"type": "adaptive", "display": "omitted"})
    effort = request_body(thinking={"type": "enabled", "budget_tokens": 2048}, output_config={"effort": "low"},
                          max_tokens=4096)
    for model, body, think in ((MODEL, adaptive, None), ("qwen3:8b", adaptive, True),
                               ("qwen3:8b", request_body(), False), ("qwen3:8b", effort, "low")):
        assert gateway.messages(dict(body, model=model))[0] == 200, (model, body)
        assert ollama.chats()[-1].get("think") == think, (model, body)


def test_messages_convert_with_tools_images_and_merging():
    body = request_body(messages=[
        {"role": "system", "content": [{"type": "text", "text": "Environment: linux"}]},
        {"role": "user", "content": "List files"},
        {"role": "user", "content": [{"type": "text", "text": "in /tmp"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                  "data": "iVBORw0KGgo="}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "use ls", "signature": "sig"},
            {"type": "text", "text": "Running ls."},
            {"type": "tool_use", "id": "toolu_01", "name": "Bash", "input": {"command": "ls /tmp"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "text", "text": "a.txt"},
                                                                           {"type": "text", "text": "b.txt"}]},
            {"type": "text", "text": "Now count them."}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_02", "name": "Bash",
                                           "input": {"command": "nope"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_02", "content": "not found",
                                      "is_error": True}]},
    ])
    assert ollama_body(body, MODEL, config())["messages"] == [
        {"role": "user", "content": "<system-reminder>\nEnvironment: linux\n</system-reminder>\n\nList files\n\nin /tmp",
         "images": ["iVBORw0KGgo="]},
        {"role": "assistant", "content": "Running ls.", "thinking": "use ls",
         "tool_calls": [{"id": "toolu_01", "function": {"name": "Bash", "arguments": {"command": "ls /tmp"}}}]},
        {"role": "tool", "content": "a.txt\nb.txt", "tool_call_id": "toolu_01", "tool_name": "Bash"},
        {"role": "user", "content": "Now count them."},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "toolu_02", "function": {"name": "Bash", "arguments": {"command": "nope"}}}]},
        {"role": "tool", "content": "Error: not found", "tool_call_id": "toolu_02", "tool_name": "Bash"},
    ]


def test_documents_become_text_and_unreadable_ones_become_notes():
    text_doc = {"type": "document", "title": "notes", "source": {"type": "text", "media_type": "text/plain",
                                                                 "data": "line one"}}
    payload = ollama_body(request_body(messages=[{"role": "user", "content": [text_doc]}]),
                                        MODEL, config())
    assert payload["messages"] == [{"role": "user", "content": "notes\n\nline one"}]
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "QUJDRA=="}}
    url_doc = {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}
    url_image = {"type": "image", "source": {"type": "url", "url": "http://x/y.png\nforged log line"}}
    file_image = {"type": "image", "source": {"type": "file", "file_id": "file_011"}}
    png = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    body = request_body(messages=[
        {"role": "user", "content": [{"type": "text", "text": "Read it"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Read", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "text", "text": "PDF file read: a.pdf (4 bytes)"}, pdf, png]}, url_doc, url_image, file_image]}])
    notes = []
    blind = ollama_body(body, MODEL, config(), can_see=False, notes=notes)
    tool, user = blind["messages"][2:]
    assert tool["content"] == ("PDF file read: a.pdf (4 bytes)\n"
                               "[PDF document (application/pdf, 4 bytes) left out: this model can't read PDF documents]\n"
                               "[image (image/png, 8 bytes) left out: this model can't see images]")
    assert user["content"] == (
        "[document at https://example.com/a.pdf left out: this model can't read documents]\n\n"
        "[image at http://x/y.png forged log line left out: this proxy passes on only inline images]\n\n"
        "[image file file_011 left out: this proxy passes on only inline images]")
    assert "images" not in tool and "images" not in user and len(notes) == 5
    seeing = ollama_body(body, MODEL, config(), can_see=True)
    assert seeing["messages"][2]["images"] == ["iVBORw0KGgo="]


def test_tools_map_to_functions_minus_server_and_deferred_tools():
    tools = [{"name": "Bash", "description": "Run a command", "input_schema": {"type": "object", "properties": {
                 "command": {"type": "string"}}, "required": ["command"], "additionalProperties": False}},
             {"name": "DeferredToolPlaceholder", "description": "-", "input_schema": {"type": "object"},
              "defer_loading": True},
             {"type": "web_search_20250305", "name": "web_search"},
             {"type": "custom", "name": "Read", "input_schema": {"type": "object"}}]
    payload = ollama_body(request_body(tools=tools), MODEL, config())
    assert [t["function"]["name"] for t in payload["tools"]] == ["Bash", "Read"]
    assert payload["tools"][0] == {"type": "function", "function": {
        "name": "Bash", "description": "Run a command", "parameters": {"type": "object", "properties": {
            "command": {"type": "string"}}, "required": ["command"]}}}
    none = ollama_body(request_body(tools=tools, tool_choice={"type": "none"}), MODEL, config())
    assert "tools" not in none
    one = ollama_body(request_body(tools=tools, tool_choice={"type": "tool", "name": "Read"}),
                                    MODEL, config())
    assert [t["function"]["name"] for t in one["tools"]] == ["Read"]


def tool_search_turns(*names, call_id="toolu_search"):
    """The assistant's ToolSearch call and Claude Code's result: one tool_reference per loaded tool."""
    return [{"role": "assistant", "content": [{"type": "tool_use", "id": call_id, "name": "ToolSearch",
                                               "input": {"query": "select:" + ",".join(names)}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": call_id,
                 "content": [{"type": "tool_reference", "tool_name": name} for name in names]},
                {"type": "text", "text": "Tool loaded."}]}]


def test_deferred_tools_are_offered_once_a_tool_search_loads_them():
    schema = {"type": "object", "properties": {"notebook_path": {"type": "string"}}}
    tools = [{"name": "Bash", "input_schema": {"type": "object"}},
             {"name": "NotebookEdit", "description": "Edit a cell", "input_schema": schema, "defer_loading": True},
             {"name": "ToolSearch", "input_schema": {"type": "object"}},
             {"name": "WebFetch", "input_schema": {"type": "object"}, "defer_loading": True},
             {"name": "CronList", "input_schema": {"type": "object"}, "defer_loading": True}]
    first = [{"role": "user", "content": "edit the notebook"}]
    assert [t["name"] for t in proxy.client_tools(request_body(messages=first, tools=tools))] == ["Bash", "ToolSearch"]
    loaded = first + tool_search_turns("NotebookEdit") + tool_search_turns("CronList", "Missing", call_id="t2")
    payload = ollama_body(request_body(messages=loaded, tools=tools), MODEL, config())
    # Loaded tools go last, in load order, with their schema from the request; WebFetch stays out.
    assert [t["function"]["name"] for t in payload["tools"]] == ["Bash", "ToolSearch", "NotebookEdit", "CronList"]
    assert payload["tools"][2]["function"] == {"name": "NotebookEdit", "description": "Edit a cell",
                                               "parameters": schema}
    assert payload["messages"][2] == {"role": "tool", "content": "Tool loaded: NotebookEdit",
                                      "tool_call_id": "toolu_search", "tool_name": "ToolSearch"}


def test_a_deferred_tool_named_by_tool_choice_is_offered_and_forced():
    tools = [{"name": "Bash", "input_schema": {"type": "object"}},
             {"name": "NotebookEdit", "defer_loading": True, "input_schema": {"type": "object", "properties": {
                 "cell": {"type": "string"}}}}]
    payload = ollama_body(request_body(tools=tools, tool_choice={"type": "tool", "name": "NotebookEdit"}),
                                        MODEL, config())
    assert [tool["function"]["name"] for tool in payload["tools"]] == ["NotebookEdit"]
    assert payload["format"]["properties"]["name"] == {"const": "NotebookEdit"}


def test_system_entries_in_messages_become_reminders_at_their_place():
    nudge = "The user hasn't heard from you in a while."
    call = {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "ls"}}
    body = request_body(system="You are Claude Code.", messages=[
        {"role": "user", "content": "go"},
        {"role": "system", "content": [{"type": "text", "text": "# Environment\nlinux"}]},
        {"role": "assistant", "content": [call]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "a.txt"}]},
        {"role": "system", "content": nudge},
        {"role": "assistant", "content": [dict(call, id="t2")]},
        {"role": "system", "content": "<system-reminder>\nalready wrapped\n</system-reminder>"},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t2", "content": "b.txt"},
                                     {"type": "text", "text": "keep going"}]},
    ])
    messages = ollama_body(body, MODEL, config())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "user", "assistant", "tool", "user"]
    assert messages[0] == {"role": "system", "content": "You are Claude Code."}
    assert messages[1]["content"] == "go\n\n<system-reminder>\n# Environment\nlinux\n</system-reminder>"
    assert messages[4]["content"] == f"<system-reminder>\n{nudge}\n</system-reminder>"
    # A tool result still comes straight after its call, with the reminder after it.
    assert messages[6]["content"] == "b.txt"
    assert messages[7]["content"] == "<system-reminder>\nalready wrapped\n</system-reminder>\n\nkeep going"


def test_parallel_tool_results_follow_the_order_of_their_calls():
    calls = [{"type": "tool_use", "id": f"t{n}", "name": name, "input": {}}
             for n, name in ((1, "Bash"), (2, "Read"), (3, "Glob"))]
    results = [{"type": "tool_result", "tool_use_id": call_id, "content": call_id} for call_id in ("t3", "tx", "t1", "t2")]
    body = request_body(messages=[{"role": "user", "content": "go"}, {"role": "assistant", "content": calls},
                                  {"role": "user", "content": results + [{"type": "text", "text": "and?"}]}])
    messages = ollama_body(body, MODEL, config())["messages"]
    assert [(m["role"], m.get("tool_call_id")) for m in messages[2:]] == [
        ("tool", "t1"), ("tool", "t2"), ("tool", "t3"), ("tool", "tx"), ("user", None)]


def test_tool_schemas_lose_validator_metadata_but_keep_constraints():
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "title": "Args",
              "properties": {"title": {"type": "string", "title": "Title", "maxLength": 80},
                             "mode": {"enum": ["a", "b"], "default": "a"},
                             "items": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                                                  "properties": {"n": {"type": "integer",
                                                                                       "minimum": 1}}}},
                             "either": {"anyOf": [{"type": "string", "$comment": "x"}, {"type": "null"}]}},
              "required": ["title"], "additionalProperties": False}
    assert proxy.lean_schema(schema) == {
        "type": "object",
        "properties": {"title": {"type": "string", "maxLength": 80}, "mode": {"enum": ["a", "b"], "default": "a"},
                       "items": {"type": "array", "items": {"type": "object", "properties": {
                           "n": {"type": "integer", "minimum": 1}}}},
                       "either": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "required": ["title"]}
    assert schema["$schema"] and schema["properties"]["title"]["title"] == "Title"  # the request is left alone


def read_result_body(sizes, window=32768, max_tokens=32000, tail_text="final words"):
    """A conversation of Reads whose results have the given sizes (characters), at a window."""
    messages = [{"role": "user", "content": "read the files"}]
    for n, size in enumerate(sizes):
        line = f"{n}: " + "x" * 60 + "\n"
        text = (line * (size // len(line) + 1))[:size - len(tail_text)] + tail_text
        messages += [{"role": "assistant", "content": [{"type": "tool_use", "id": f"r{n}", "name": "Read",
                                                        "input": {"file_path": f"/f{n}"}}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"r{n}", "content": text}]}]
    return request_body(messages=messages, max_tokens=max_tokens, system="base prompt " * 4000)


def test_largest_tool_results_are_cut_middle_out_to_fit_the_window():
    notes = []
    body = read_result_body([80_000, 3_000])
    payload, estimate = proxy.anthropic_to_ollama(body, MODEL, config(), notes=notes)
    assert estimate == proxy.estimate_tokens(payload)
    assert estimate <= 32768 - proxy.answer_room(32000, 32768) == 32768 - 4096
    big, small = (m["content"] for m in payload["messages"] if m["role"] == "tool")
    original = body["messages"][2]["content"][0]["content"]
    assert small == body["messages"][4]["content"][0]["content"]  # under the cut size: untouched
    head, tail = big.split("[simple_api_proxy: ")[0], big.rsplit("]\n", 1)[1]
    assert original.startswith(head) and original.endswith(tail) and tail.endswith("final words")
    cut = int(big.split("[simple_api_proxy: ")[1].split(" characters")[0].replace(",", ""))
    assert cut == len(original) - len(head) - len(tail) and cut > 40_000
    assert "to fit the model's 32768-token window; read the rest in ranges" in big
    assert notes and "1 tool result(s) cut" in notes[0]
    assert payload["options"]["num_predict"] == 32768 - estimate
    # The next turn adds a small result: the cut result stays byte for byte the same.
    grown = read_result_body([80_000, 3_000, 2_000])
    assert ollama_body(grown, MODEL, config())["messages"][:len(payload["messages"])] == payload["messages"]
    # Nothing to cut that would make it fit: the request stays as sent, for `prompt is too long`.
    hopeless = dict(read_result_body([80_000]), system="base prompt " * 12000)
    payload = ollama_body(hopeless, MODEL, config())
    assert payload["messages"][3]["content"] == hopeless["messages"][2]["content"][0]["content"]
    assert proxy.estimate_tokens(payload) > 32768 and payload["options"]["num_predict"] == 32000


def test_prompt_of_a_growing_session_extends_the_previous_one():
    """Each turn's prompt, as Ollama's templates lay it out (system head, tools, messages), starts
    with the previous turn's: nudges, a cut read and parallel results must not rewrite the past.
    (Only a step down the cut ladder, when the session outgrows a step, rewrites a cut result.)"""
    messages = [{"role": "user", "content": "go"},
                {"role": "system", "content": [{"type": "text", "text": "# Environment\nlinux"}]}]
    prompts = []
    for turn in range(6):
        calls = [{"type": "tool_use", "id": f"t{turn}{n}", "name": "Read", "input": {"file_path": f"/f{n}"}}
                 for n in range(2)]
        size = 90_000 if turn == 1 else 200
        results = [{"type": "tool_result", "tool_use_id": call["id"], "content": f"{call['id']}:" + "y" * size}
                   for call in reversed(calls)]
        messages += [{"role": "assistant", "content": calls}, {"role": "user", "content": results},
                     {"role": "system", "content": "The user hasn't heard from you in a while."}]
        body = request_body(system=[{"type": "text", "text": f"x-anthropic-billing-header: cch={turn};"},
                                    {"type": "text", "text": "base " * 6000}],
                            messages=messages, max_tokens=32000,
                            tools=[{"name": "Read", "input_schema": {"type": "object"}}])
        payload = ollama_body(body, MODEL, config())
        assert proxy.estimate_tokens(payload) <= 32768 - 4096
        prompts.append(ollama_prompt(payload))
    assert "characters cut from the middle" in prompts[-1]
    for earlier, later in zip(prompts, prompts[1:]):
        assert later.startswith(earlier)


def test_num_predict_is_capped_at_what_the_window_has_left():
    payload = ollama_body(request_body("hi", max_tokens=128000), MODEL, config())
    assert payload["options"]["num_predict"] == 32768 - proxy.estimate_tokens(payload)
    assert ollama_body(request_body("hi", max_tokens=500), MODEL, config())["options"]["num_predict"] == 500
    assert ollama_body(request_body("hi", max_tokens=0), MODEL, config())["options"]["num_predict"] == 0


def test_a_prompt_that_leaves_the_answer_no_room_is_too_long_not_cut_off(ollama):
    with running_proxy(ollama.url, OLLAMA_NUM_CTX=4096) as gateway:
        crowded = request_body("x " * 7000, max_tokens=32000)  # ~4000 of the 4096 tokens
        status, _, error = gateway.messages(crowded)
        assert status == 400 and re.match(r"prompt is too long: \d+ tokens > 3072 maximum", error["error"]["message"])
        assert ollama.chats() == []
        assert gateway.messages(dict(crowded, max_tokens=50))[0] == 200  # a short answer still fits
        assert ollama.chats()[-1]["options"]["num_predict"] == 50


@pytest.mark.parametrize("body, message", [
    ([], "Request body must be a JSON object"),
    ({"max_tokens": 5, "messages": []}, "model: Field required"),
    ({"model": "m", "max_tokens": 5}, "messages: Field required"),
    ({"model": "m", "max_tokens": 5, "messages": []}, "messages: at least one message is required"),
    ({"model": 7, "max_tokens": 5, "messages": []}, "model: Input should be a valid string"),
    ({"model": "m", "max_tokens": "5", "messages": []}, "max_tokens: Input should be a valid integer"),
    ({"model": "m", "max_tokens": True, "messages": []}, "max_tokens: Input should be a valid integer"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"text": "x"}]}]},
     "messages.0.content.0.type"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user"}]}, "messages.0.content: Field required"),
    ({"model": "m", "max_tokens": 5, "stream": "yes", "messages": [{"role": "user", "content": "x"}]}, "stream"),
    ({"model": "m", "max_tokens": 5, "temperature": "hot", "messages": [{"role": "user", "content": "x"}]},
     "temperature"),
    ({"model": "m", "max_tokens": 5, "tools": [{"name": "t"}], "messages": [{"role": "user", "content": "x"}]},
     "tools.0.input_schema"),
    ({"model": "m", "max_tokens": 5, "stop_sequences": [1], "messages": [{"role": "user", "content": "x"}]},
     "stop_sequences.0"),
])
def test_validation_names_the_field(body, message):
    with pytest.raises(proxy.ProxyError) as caught:
        proxy.validate_messages_request(body, default_max_tokens=4096)
    assert caught.value.status == 400 and caught.value.error_type == "invalid_request_error"
    assert message in caught.value.message


def test_token_estimate_grows_with_prompt_and_tools():
    small = proxy.estimate_tokens(ollama_body(request_body("hi"), MODEL, config()))
    large = proxy.estimate_tokens(ollama_body(request_body("word " * 7000), MODEL, config()))
    assert small < 10 and 9000 < large < 11000


def test_stream_text_then_tool_calls_in_protocol_order():
    events, translator = translate([
        chunk(content="Checking"), chunk(content=" now."),
        chunk(tool_calls=[ollama_call("get_weather", {"city": "Paris"}), ollama_call("get_time", {}, 1)]),
        final_chunk(prompt_eval_count=412, eval_count=38)], tool_names=["get_weather", "get_time"],
        recover_tool_calls=False)
    assert_valid_stream(events)
    names = [name for name, _ in events]
    assert names == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop"] + ["content_block_start", "content_block_delta",
                                              "content_block_stop"] * 2 + ["message_delta", "message_stop"]
    tool_start = events[5][1]["content_block"]
    assert tool_start["type"] == "tool_use" and tool_start["input"] == {} and tool_start["id"].startswith("toolu_")
    assert json.loads(events[6][1]["delta"]["partial_json"]) == {"city": "Paris"}
    message = translator.message
    assert message["stop_reason"] == "tool_use" and message["content"][0] == {"type": "text", "text": "Checking now."}
    assert message["usage"]["input_tokens"] == 412 and message["usage"]["output_tokens"] == 38
    assert events[-2][1]["usage"] == {"input_tokens": 412, "output_tokens": 38}


def test_a_chunk_without_a_role_keeps_its_tool_calls_and_thinking():
    events, translator = translate([
        chunk(content="Checking"),
        {"message": {"content": " now", "tool_calls": [ollama_call("get_weather", {"city": "Oslo"})]}, "done": False},
        {"message": {"content": " and", "thinking": "hmm"}, "done": False}, final_chunk()],
        tool_names=["get_weather"], recover_tool_calls=False, show_thinking=True)
    kinds = [block["type"] for block in translator.message["content"]]
    assert kinds == ["text", "tool_use", "thinking", "text"] and translator.message["stop_reason"] == "tool_use"


def test_one_final_chunk_holding_everything_converts_whole():
    translator = proxy.StreamTranslator("claude-x", 5, show_thinking=True)
    translator.feed({"message": {"role": "assistant", "content": "Hi", "thinking": "hmm"}, "done": True,
                     "done_reason": "length", "prompt_eval_count": 3, "eval_count": 9})
    message = translator.message
    assert message["content"] == [{"type": "thinking", "thinking": "hmm", "signature": ""},
                                  {"type": "text", "text": "Hi"}]
    assert message["stop_reason"] == "max_tokens" and message["model"] == "claude-x"
    assert message["id"].startswith("msg_") and len(message["id"]) == 28


def test_thinking_is_dropped_unless_asked_for():
    events, translator = translate([chunk(thinking="secret plan"), chunk(content="Answer"), final_chunk()])
    assert translator.message["content"] == [{"type": "text", "text": "Answer"}]


def test_stop_sequence_is_found_across_chunks_and_cut():
    events, translator = translate([chunk(content="one two ##"), chunk(content="# three"), chunk(content="more")],
                                   stop_sequences=["###"])
    assert_valid_stream(events)
    assert translator.done and translator.message["stop_reason"] == "stop_sequence"
    assert translator.message["stop_sequence"] == "###"
    assert translator.message["content"] == [{"type": "text", "text": "one two "}]


def test_text_that_only_looks_like_a_stop_sequence_is_released():
    events, translator = translate([chunk(content="a #"), chunk(content="# b"), final_chunk()],
                                   stop_sequences=["###"])
    assert translator.message["content"][0]["text"] == "a ## b"
    assert translator.message["stop_reason"] == "end_turn"


def test_message_replays_as_events_that_rebuild_it():
    _, translator = translate([chunk(content="Hi"), chunk(tool_calls=[ollama_call("Bash", {"command": "ls"})]),
                               final_chunk()], tool_names=["Bash"])
    events = proxy.message_to_events(translator.message)
    assert_valid_stream(events)
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_big_tool_results_are_cut_to_fit_and_num_predict_capped_through_the_proxy(gateway, ollama):
    status, _, body = gateway.messages(read_result_body([100_000]))
    assert status == 200, body
    sent = ollama.chats()[-1]
    assert "characters cut from the middle of this tool result" in sent["messages"][-1]["content"]
    assert sent["options"]["num_predict"] == 32768 - proxy.estimate_tokens(sent) < 32000
    status, _, body = gateway.messages(dict(read_result_body([100_000]), system="base prompt " * 12000))
    assert status == 400 and body["error"]["message"].startswith("prompt is too long: ")
    assert len(ollama.chats()) == 1


def test_a_prompt_no_cut_brings_within_the_limit_is_refused_at_the_size_sent(gateway, ollama):
    """At 32k with max_tokens 4096 the limit is 31,744 tokens: a prompt whose smallest cut lands
    between that and the window is refused uncut, with the size the client sent."""
    body = dict(read_result_body([80_000], max_tokens=4096), system="base prompt " * 9100)
    limit = proxy.prompt_limit(4096, 32768)
    payload, sent = proxy.anthropic_to_ollama(body, MODEL, config())
    result = payload["messages"][-1]
    assert result["content"] == body["messages"][-1]["content"][0]["content"]  # not cut
    result["content"] = proxy.trimmed_tool_text(result["content"], proxy.TRIM_LADDER[-1], 32768)
    assert limit == 31744 < proxy.estimate_tokens(payload) <= 32768  # the smallest cut: between
    status, _, error = gateway.messages(body)
    assert status == 400 and error["error"]["message"] == f"prompt is too long: {sent} tokens > 32768 maximum"
    assert ollama.chats() == []
    count = dict(body)
    del count["max_tokens"]  # count_tokens takes none; DEFAULT_MAX_TOKENS is 4096 too
    assert gateway.json("POST", "/v1/messages/count_tokens", count)[2] == {"input_tokens": sent}


def test_count_tokens_counts_the_prompt_messages_would_send(gateway, ollama):
    body = read_result_body([100_000])
    status, _, counted = gateway.json("POST", "/v1/messages/count_tokens", dict(body))
    assert gateway.messages(body)[0] == 200
    sent = ollama.chats()[-1]
    assert "characters cut" in sent["messages"][-1]["content"]
    assert counted == {"input_tokens": proxy.estimate_tokens(sent)}


def test_images_reach_only_models_that_can_see(gateway, ollama, caplog):
    ollama.models["llava:7b"] = ["completion", "vision"]
    png = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    content = [{"type": "text", "text": "What is this?"}, png]
    caplog.set_level("INFO", logger="simple_api_proxy")
    assert gateway.messages(request_body(model="llava:7b", messages=[{"role": "user", "content": content}]))[0] == 200
    assert gateway.messages(request_body(messages=[{"role": "user", "content": content}]))[0] == 200
    seeing, blind = ollama.chats()
    assert seeing["messages"][-1]["images"] == ["iVBORw0KGgo="]
    assert "images" not in blind["messages"][-1]
    assert blind["messages"][-1]["content"] == ("What is this?\n\n[image (image/png, 8 bytes) left out: "
                                                "this model can't see images]")
    assert caplog.text.count("changed for the model: [image (image/png, 8 bytes)") == 1


def test_many_stop_sequences_match_in_one_pass_earliest_first():
    stops = [f"STOP{n:02d}" for n in range(proxy.MAX_STOP_SEQUENCES - 2)] + ["bc", "abcd"]
    events, translator = translate([chunk(content="xx a"), chunk(content="b"), chunk(content="cd tail"),
                                    final_chunk()], stop_sequences=stops)
    assert_valid_stream(events)
    # "bc" completes before "abcd" does, as a model emitting tokens would stop at it.
    assert translator.message["stop_sequence"] == "bc"
    assert translator.message["content"] == [{"type": "text", "text": "xx a"}]
    events, translator = translate([chunk(content="ST"), chunk(content="OP0"), chunk(content="x STOP4"),
                                    chunk(content="1!"), final_chunk()], stop_sequences=stops)
    assert translator.message["stop_sequence"] == "STOP41"
    assert translator.message["content"] == [{"type": "text", "text": "STOP0x "}]
    text_deltas = [d["delta"]["text"] for n, d in events if n == "content_block_delta"]
    assert text_deltas == ["STOP0x "]


WEATHER_TOOLS = [
    {"name": "get_weather", "description": "Weather in a city",
     "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    {"name": "get_time", "description": "Time in a zone",
     "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}},
]


def forced_reply(name, arguments):
    """What Ollama answers under a forced-call `format`: the JSON object as content, token by token."""
    text = json.dumps({"name": name, "arguments": arguments})
    return text_reply(text, pieces=[text[i:i + 5] for i in range(0, len(text), 5)])


def test_forced_tool_use_constrains_ollama_and_answers_with_tool_use(gateway, ollama):
    one = ollama_body(request_body(tools=WEATHER_TOOLS, tool_choice={"type": "tool", "name": "get_time"}),
                                    MODEL, config())
    assert one["format"] == {"type": "object", "required": ["name", "arguments"], "properties": {
        "name": {"const": "get_time"}, "arguments": WEATHER_TOOLS[1]["input_schema"]}}
    assert [t["function"]["name"] for t in one["tools"]] == ["get_time"]
    both = ollama_body(request_body(tools=WEATHER_TOOLS, tool_choice={"type": "any"}), MODEL, config())
    assert both["format"] == {"anyOf": [
        {"type": "object", "required": ["name", "arguments"],
         "properties": {"name": {"const": t["name"]}, "arguments": t["input_schema"]}} for t in WEATHER_TOOLS]}
    assert "format" not in ollama_body(request_body(tools=WEATHER_TOOLS), MODEL, config())
    for stream in (False, True):
        ollama.script(forced_reply("get_weather", {"city": "Paris"}))
        body = request_body(f"weather {stream}", tools=WEATHER_TOOLS, tool_choice={"type": "any"}, stream=stream)
        status, _, raw = gateway.call("POST", "/v1/messages", body)
        assert status == 200
        if stream:
            events = parse_sse(raw)
            assert_valid_stream(events)
            assert not [d for n, d in events if n == "content_block_delta" and d["delta"]["type"] == "text_delta"]
            starts = [d["content_block"] for n, d in events if n == "content_block_start"]
            assert [b["type"] for b in starts] == ["tool_use"] and starts[0]["name"] == "get_weather"
            assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
        else:
            message = json.loads(raw)
            assert message["stop_reason"] == "tool_use"
            assert [(b["type"], b["name"], b["input"]) for b in message["content"]] == \
                [("tool_use", "get_weather", {"city": "Paris"})]
        assert [branch["properties"]["name"]["const"] for branch in ollama.chats()[-1]["format"]["anyOf"]] == \
            ["get_weather", "get_time"]
    status, _, error = gateway.messages(request_body(tools=WEATHER_TOOLS, tool_choice={"type": "tool", "name": "nope"}))
    assert status == 400 and "tool_choice.name" in error["error"]["message"]


CLAUDE_CODE_TOOLS = [
    {"name": "Read", "description": "Read a file",
     "input_schema": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "title": "ReadInput",
                      "properties": {"file_path": {"type": "string"}, "limit": {"type": "integer", "minimum": 1}},
                      "required": ["file_path"], "additionalProperties": False}},
    {"name": "Bash", "description": "Run a command",
     "input_schema": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                      "properties": {"command": {"type": "string"}}, "required": ["command"],
                      "additionalProperties": False}},
]


def test_a_forced_format_pairs_each_name_with_its_own_arguments_and_loses_schema_metadata():
    payload = ollama_body(request_body(tools=CLAUDE_CODE_TOOLS, tool_choice={"type": "any"}), MODEL, config())
    branches = payload["format"]["anyOf"]
    assert [branch["properties"]["name"] for branch in branches] == [{"const": "Read"}, {"const": "Bash"}]
    for branch, tool in zip(branches, payload["tools"]):
        assert branch["properties"]["arguments"] == tool["function"]["parameters"]  # the same lean copy
        assert "$schema" not in json.dumps(branch) and "title" not in branch["properties"]["arguments"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("name, arguments, why", [
    ("Read", {"command": "rm -rf ~/project"}, "Bash's arguments under Read's name"),
    ("Read", {"file_path": "/a", "limit": 0}, "a bound broken"),
    ("Read", {"file_path": 7}, "a wrong type"),
    ("Bash", {"command": "ls", "file_path": "/a"}, "a property the schema rules out"),
])
def test_a_forced_call_whose_arguments_break_its_tools_schema_is_no_tool_use(gateway, ollama, stream, name,
                                                                             arguments, why):
    # An Ollama that does not enforce `format` (or a model that escapes it) can pair any name with any
    # arguments; the proxy must not hand Read a command to run.
    ollama.script(forced_reply(name, arguments))
    body = request_body(f"forced {name} {why} {stream}", tools=CLAUDE_CODE_TOOLS, tool_choice={"type": "any"},
                        stream=stream)
    status, _, raw = gateway.call("POST", "/v1/messages", body)
    assert status == 200
    if stream:
        events = parse_sse(raw)
        assert_valid_stream(events)
        assert not [d for n, d in events if n == "content_block_start" and d["content_block"]["type"] == "tool_use"]
        text = "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")
    else:
        message = json.loads(raw)
        assert [block["type"] for block in message["content"]] == ["text"] and message["stop_reason"] == "end_turn"
        text = message["content"][0]["text"]
    assert json.loads(text) == {"name": name, "arguments": arguments}  # nothing the model said is lost
    ollama.script(forced_reply("Read", {"file_path": "/a", "limit": 5}))
    status, _, message = gateway.messages(request_body(f"fine {stream} {why}", tools=CLAUDE_CODE_TOOLS,
                                                       tool_choice={"type": "any"}))
    assert status == 200 and message["content"][0]["input"] == {"file_path": "/a", "limit": 5}


@pytest.mark.parametrize("arguments, schema", [
    ({"url": "http://x", "x-trace": "1"},
     {"type": "object", "properties": {"url": {"type": "string"}}, "patternProperties": {"^x-": {"type": "string"}},
      "additionalProperties": False}),
    ({"n_count": 3}, {"type": "object", "patternProperties": {"^n_": {"type": "integer"}},
                      "additionalProperties": {"type": "string"}}),
    ({"command": "ls -la"}, {"type": "object", "properties": {"command": {"type": "string", "not": {"pattern": "^rm "}}}}),
    ({"to": "a@b.c"}, {"type": "object", "properties": {"to": {"oneOf": [{"type": "string", "format": "email"},
                                                                          {"type": "string", "pattern": "@"}]}}}),
    ({"data": list(range(12000))}, {"type": "object", "properties": {"data": {
        "oneOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}]}}}),
    ({"path": None}, {"type": "object", "properties": {"path": {"type": ["string", "null"]}}}),
    ({"limit": 5.0}, {"type": "object", "properties": {"limit": {"type": "integer"}}}),
])
def test_what_the_schema_check_cannot_judge_never_refuses_a_valid_call(arguments, schema):
    # Patterns are not run and exclusive branches not counted: a keyword left unjudged must not
    # turn a valid forced call into text.
    assert proxy.schema_violation(arguments, schema) is None


def test_schema_checks_end_on_cycles_and_branch_bombs():
    bomb = {"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"}
    assert proxy.schema_violation({"x": 1}, bomb) is None  # bounded: taken as valid, as the sampler held it
    assert proxy.schema_violation(1, {"$ref": "#"}) is None
    nested = {"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "$ref": "#/$defs/n"}
    assert proxy.schema_violation([[[]]], nested) is None
    assert proxy.schema_violation([[1]], nested) == "input[0][0] is not of type array"
    assert proxy.schema_violation(True, {"enum": [1]}) and proxy.schema_violation(1.0, {"const": 1}) is None
    assert proxy.schema_violation(7, {"oneOf": [{"type": "string"}, {"type": "array"}]}) == "input does not match oneOf"


def test_sdk_tool_choice_any_gets_a_tool_use(sdk, ollama):
    _, client = sdk
    ollama.script(forced_reply("get_time", {"zone": "UTC"}))
    reply = client.messages.create(model="claude-opus-5-5", max_tokens=200, tools=WEATHER_TOOLS,
                                tool_choice={"type": "any"}, messages=[{"role": "user", "content": "What time?"}])
    assert reply.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in reply.content] == [("tool_use", "get_time", {"zone": "UTC"})]


def test_calls_to_tools_not_offered_are_dropped_not_returned(gateway, ollama, caplog):
    caplog.set_level("WARNING", logger="simple_api_proxy")
    cases = [(dict(tools=WEATHER_TOOLS[:1]), ("Bash", {"command": "rm -rf /"})),
             (dict(tools=WEATHER_TOOLS, tool_choice={"type": "none"}), ("get_weather", {"city": "Oslo"}))]
    for stream in (False, True):
        for options, call in cases:
            ollama.script(tool_reply(call, text="Here you go."))
            status, headers, raw = gateway.call("POST", "/v1/messages", request_body(stream=stream, **options))
            message = proxy_message(raw, stream)
            assert status == 200 and message["stop_reason"] == "end_turn"
            assert message["content"] == [{"type": "text", "text": "Here you go."}]
            wait_until(lambda: any(headers["request-id"] in r.getMessage() and call[0] in r.getMessage()
                                   for r in caplog.records), what="the dropped call to be logged")
