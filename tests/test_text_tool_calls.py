"""Tool calls a model writes as text instead of structured tool_calls, with a corpus of replies
real models wrote.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import simple_api_proxy as proxy

from standins.ollama import chunk, final_chunk, Reply
from standins.support import ROOT
from standins.proxy import (
    assert_valid_stream, BASH_CALL, parse_sse, request_body, running_proxy, text_calls, TOOLS, translate,
)


def stream_text(text, piece=3, **options):
    """Feed text to a translator a few characters at a time, as a model streams it."""
    options.setdefault("tool_names", TOOLS)
    chunks = [chunk(content=text[i:i + piece]) for i in range(0, len(text), piece)] + [final_chunk()]
    return translate(chunks, **options)


@pytest.mark.parametrize("text, calls", [
    (BASH_CALL, [("Bash", {"command": "ls -la"})]),
    ('{"name": "Bash", "parameters": {"command": "ls -la"}}', [("Bash", {"command": "ls -la"})]),
    ('\n```json\n' + BASH_CALL + '\n```\n', [("Bash", {"command": "ls -la"})]),
    ('```\n' + BASH_CALL + '\n```', [("Bash", {"command": "ls -la"})]),
    ('<tool_call>\n' + BASH_CALL + '\n</tool_call>', [("Bash", {"command": "ls -la"})]),
    ('<tool_call>' + BASH_CALL + '</tool_call>\n<tool_call>{"name": "Write", "arguments": '
     '{"file_path": "a.txt", "content": "hi"}}</tool_call>',
     [("Bash", {"command": "ls -la"}), ("Write", {"file_path": "a.txt", "content": "hi"})]),
    (BASH_CALL + "\n" + BASH_CALL, [("Bash", {"command": "ls -la"})] * 2),
    ('{"name": "Bash", "arguments": "{\\"command\\": \\"ls -la\\"}"}', [("Bash", {"command": "ls -la"})]),
])
def test_text_tool_call_shapes_become_tool_use(text, calls):
    events, translator = stream_text(text)
    assert_valid_stream(events)
    message = translator.message
    assert message["stop_reason"] == "tool_use"
    assert [(b["name"], b["input"]) for b in message["content"]] == calls
    assert all(b["type"] == "tool_use" for b in message["content"])


def test_prose_then_tagged_call_keeps_the_prose_as_text():
    events, translator = stream_text("I will list the files.\n<tool_call>" + BASH_CALL + "</tool_call>")
    assert_valid_stream(events)
    text, call = translator.message["content"]
    assert text["text"].strip() == "I will list the files." and call["name"] == "Bash"
    first_delta = next(i for i, (n, _) in enumerate(events) if n == "content_block_delta")
    assert first_delta < len(events) - 6  # the prose streamed before the call was complete


@pytest.mark.parametrize("text, options", [
    ('{"name": "Deploy", "arguments": {"env": "prod"}}', {}),
    ('Here is an example:\n```json\n' + BASH_CALL + '\n```\nThat is how the tool is called.', {}),
    ('```python\nprint({"name": "Bash"})\n```', {}),
    (BASH_CALL, {"tool_names": []}),
    (BASH_CALL, {"recover_tool_calls": False}),
    ('{"name": "Bash", "arguments": {"command": "ls"}, "note": "extra keys mean data, not a call"}', {}),
    ('{"name": "Bash", "arguments": {"command": "ls"}} and then some words', {}),
    ('<tool_call>{"name": "Bash", "arguments": {"command"</tool_call>', {}),
    ('{"name": ["Bash"], "arguments": {}}', {}),
])
def test_near_misses_stay_text(text, options):
    events, translator = stream_text(text, **options)
    assert_valid_stream(events)
    assert translator.message["content"] == [{"type": "text", "text": text}]
    assert translator.message["stop_reason"] == "end_turn"


def test_plain_answer_streams_token_by_token_when_tools_are_offered():
    text = "Sure, the files are listed below with their sizes."
    events, translator = stream_text(text, piece=5)
    deltas = [d["delta"]["text"] for n, d in events if n == "content_block_delta"]
    assert len(deltas) >= 9 and "".join(deltas) == text


def test_json_answer_that_is_not_a_call_is_released_at_the_end():
    events, translator = stream_text('{"status": "ok", "count": 3}')
    assert translator.message["content"] == [{"type": "text", "text": '{"status": "ok", "count": 3}'}]


def test_text_tool_call_through_the_proxy_streaming_and_not(gateway, ollama):
    tools = [{"name": "Bash", "input_schema": {"type": "object"}}]
    pieces = ['{"name": "Ba', 'sh", "argum', 'ents": {"command": "echo hi"}}']
    for stream in (False, True):
        ollama.script(Reply([chunk(content=p) for p in pieces] + [final_chunk()]))
        status, _, raw = gateway.call("POST", "/v1/messages", request_body(tools=tools, stream=stream))
        if stream:
            events = parse_sse(raw)
            assert_valid_stream(events)
            assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
            deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
            assert [json.loads(d["partial_json"]) for d in deltas] == [{"command": "echo hi"}]
        else:
            message = json.loads(raw)
            assert message["stop_reason"] == "tool_use" and message["content"][0]["input"] == {"command": "echo hi"}


def test_text_tool_call_recovery_can_be_turned_off(ollama):
    ollama.script(Reply([chunk(content=BASH_CALL), final_chunk()]))
    with running_proxy(ollama.url, TOOL_CALL_RECOVERY="off") as gateway:
        status, _, message = gateway.messages(request_body(tools=[{"name": "Bash", "input_schema": {"type": "object"}}]))
    assert message["content"] == [{"type": "text", "text": BASH_CALL}] and message["stop_reason"] == "end_turn"


# A corpus of replies real models wrote, quoted from public threads (repository#issue), with the
# tools those threads offered (minimal schemas) and what the reply must become: its calls, or
# TEXT. Abridged only where marked.
TEXT = "text"


def tools(**offered):
    """Offered tools, each given as {property: JSON type}."""
    return {name: {"type": "object", "properties": {key: {"type": kind} for key, kind in properties.items()}}
            for name, properties in offered.items()}


class Written:
    def __init__(self, source, model, offered, text, expected):
        self.source, self.model, self.tools, self.text, self.expected = source, model, offered, text, expected

    def __repr__(self):
        return f"{self.source} {self.model}"


WEATHER = tools(get_weather={"location": "string"})


CORPUS = [
    # Qwen3-Coder's XML, with or without <tool_call>, after a preamble or not
    Written("ollama/ollama#14745", "qwen3.5:9b", tools(bash={"command": "string", "description": "string"}),
            "I need to mock Valkey for tests. Let me check how the app initializes Valkey and update TESTING.md "
            "with this information.\n<tool_call>\n<function=bash>\n<parameter=command>\ngrep \"redacted\" | head -20"
            "\n</parameter>\n<parameter=description>\nFind Valkey initialization\n</parameter>\n</function>\n"
            "</tool_call>",
            [("bash", {"command": 'grep "redacted" | head -20', "description": "Find Valkey initialization"})]),
    Written("ggml-org/llama.cpp#15012", "Qwen3-Coder-30B-A3B", tools(get_current_weather={"location": "string"}),
            "<tool_call>\n<function=get_current_weather>\n<parameter=location>\nTokyo, Japan\n</parameter>\n"
            "</function>\n</tool_call>",
            [("get_current_weather", {"location": "Tokyo, Japan"})]),
    Written("ggml-org/llama.cpp#15012", "Qwen3-Coder-30B-A3B", tools(get_current_weather={"location": "string"}),
            "I need to check the weather for Tokyo and Paris as well. Let me get that information for you.\n\n"
            "<tool_call>\n<function=get_current_weather>\n<parameter=location>\nTokyo, Japan\n</parameter>\n"
            "</function>\n</tool_call> ",
            [("get_current_weather", {"location": "Tokyo, Japan"})]),
    Written("ggml-org/llama.cpp#22878", "Qwen3.6-27B", tools(read={"path": "string"}),
            "\n<tool_call>\n<function=read>\n<parameter=path>\n/home/ps/workspace/docker/aichat/openclaw/.openclaw/"
            "workspace/USER.md\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=read>\n"
            "<parameter=path>\n/home/ps/workspace/docker/aichat/openclaw/.openclaw/workspace/MEMORY.md\n"
            "</parameter>\n</function>\n</tool_call>",
            [("read", {"path": "/home/ps/workspace/docker/aichat/openclaw/.openclaw/workspace/USER.md"}),
             ("read", {"path": "/home/ps/workspace/docker/aichat/openclaw/.openclaw/workspace/MEMORY.md"})]),
    Written("continuedev/continue#13057", "qwen3-coder:30b",
            tools(create_new_file={"filepath": "string", "contents": "string"}),
            "I'll create a file called test.txt with the content \"hello\".\n\n<function=create_new_file>\n"
            "<parameter=filepath> test.txt\n<parameter=contents> hello\n",
            [("create_new_file", {"filepath": " test.txt", "contents": " hello"})]),  # Qwen keeps the spaces
    Written("ZolOnTheNet/agentichat FEATURE_QWEN3_XML_SUPPORT.md", "Qwen3-Coder-30B-A3B-Instruct",
            tools(list_files={"path": "string"}),
            "Je vais analyser le programme dans le répertoire courant.\n<tool_call>\n<function=list_files>\n"
            "<parameter=path>\n.\n</parameter>\n</function>\n</tool_call>",
            [("list_files", {"path": "."})]),
    Written("waybarrios/vllm-mlx#63", "Qwen3-Coder", tools(search={"query": "array"}),
            "<tool_call>\n<function=search>\n<parameter=query>['python', 'tutorial']</parameter>\n</function>\n"
            "</tool_call>",
            [("search", {"query": ["python", "tutorial"]})]),
    Written("waybarrios/vllm-mlx#63", "Qwen3-Coder", tools(config={"settings": "object"}),
            "<tool_call>\n<function=config>\n<parameter=settings>{'theme': 'dark', 'size': 14}</parameter>\n"
            "</function>\n</tool_call>",
            [("config", {"settings": {"theme": "dark", "size": 14}})]),
    # JSON: bare, fenced (also on the fence's own line), wrapped, nested, other argument keys
    Written("ollama/ollama#12174", "qwen2.5-coder:14b", tools(calculator={"expr": "string"}),
            '{"name": "calculator", "arguments": {"expr": "17 * 23"}}',
            [("calculator", {"expr": "17 * 23"})]),
    Written("openai/codex#2229", "qwen2.5-coder:14b", tools(shell={"command": "array"}),
            '{"name": "shell", "arguments": {"command": ["ls"]}}',
            [("shell", {"command": ["ls"]})]),
    Written("anomalyco/opencode#46625", "qwen2.5-coder:7b", tools(glob={"pattern": "string"}),
            '{"name":"glob","arguments":{"pattern":"*"}}',
            [("glob", {"pattern": "*"})]),
    Written("anomalyco/opencode#10402", "qwen2.5-coder", tools(write={"content": "string", "filePath": "string"}),
            '{"name": "write", "arguments": {"content": "hello\\n", "filePath": "/C:/Code/SimpleTester/todo.md"}}',
            [("write", {"content": "hello\n", "filePath": "/C:/Code/SimpleTester/todo.md"})]),
    Written("anomalyco/opencode#590", "qwen2.5-coder:7b", tools(write={"filePath": "string", "content": "string"}),
            '{\n\t"name": "write",\n\t"arguments": {\n\t\t"filename": "README.md",\n\t\t"content": "<fileContent>"'
            '\n\t}\n}',
            [("write", {"filename": "README.md", "content": "<fileContent>"})]),
    Written("NousResearch/hermes-agent#5867", "qwen2.5-coder:14b", tools(search={"query": "string"}),
            '{"name": "search", "arguments": {"query": "北京今天的天气"}}',
            [("search", {"query": "北京今天的天气"})]),
    Written("NousResearch/hermes-agent#107125", "qwen2.5:32b-instruct", tools(terminal={"command": "string"}),
            '{"name": "terminal", "arguments": {"command": "echo ..."}}',
            [("terminal", {"command": "echo ..."})]),
    Written("jundot/omlx#1153", "Llama-4-Scout-17B-16E-Instruct", WEATHER,
            '{"name": "get_weather", "parameters": {"location": "Paris"}}',
            [("get_weather", {"location": "Paris"})]),
    Written("raullenchai/Rapid-MLX#700", "Meta-Llama-3.1-8B-Instruct", tools(web_search={"query": "string"}),
            '{"name": "web_search", "parameters": {"query": "你好"}}',
            [("web_search", {"query": "你好"})]),
    Written("vllm-project/vllm#46863 (closing braces restored)", "Llama-4-Scout-17B-16E-Instruct-FP8",
            tools(Bash={"command": "string", "timeout": "number"}),
            '{"type": "function", "name": "Bash", "parameters": {"command": "echo hello", "timeout": 12000}}',
            [("Bash", {"command": "echo hello", "timeout": 12000})]),
    Written("vllm-project/vllm#11786", "llama-3.2-11b-vision-instruct", tools(get_current_traffic={"location": "string"}),
            '{"type": "function", "function": {"name": "get_current_traffic", "parameters": {"location": "Sydney"}}}',
            [("get_current_traffic", {"location": "Sydney"})]),
    Written("ggml-org/llama.cpp#14697", "devstral", tools(file_view={"path": "string", "view_range": "array"}),
            '{\n  "tool_calls": [\n    {\n      "name": "file_view",\n      "arguments": {\n        "path": '
            '"src/util.rs",\n        "view_range": [\n          20,\n          40\n        ]\n      },\n      '
            '"id": "162875335"\n    }\n  ]\n}',
            [("file_view", {"path": "src/util.rs", "view_range": [20, 40]})]),
    Written("mistralai/mistral-common#73", "mistral-large-latest",
            tools(add_layer_to_map={"map_id": "string", "parameter": "string", "source": "string", "level": "string"}),
            '[{"name": "add_layer_to_map", "arguments": {"map_id": "map_0", "parameter": "WIND", "source": '
            '"AROME0.25", "level": "1000Hpa"}}, {"name": "add_layer_to_map", "arguments": {"map_id": "map_0", '
            '"parameter": "T", "source": "AROME0.25", "level": "1000Hpa"}}]',
            [("add_layer_to_map", {"map_id": "map_0", "parameter": "WIND", "source": "AROME0.25", "level": "1000Hpa"}),
             ("add_layer_to_map", {"map_id": "map_0", "parameter": "T", "source": "AROME0.25", "level": "1000Hpa"})]),
    Written("nicoalbanese/ai-sdk-fundamentals#4", "deepseek-coder-v2", tools(tellAJoke={"location": "string"}),
            '```json {"name":"tellAJoke","arguments":{"location":"San Francisco"}} ```',
            [("tellAJoke", {"location": "San Francisco"})]),
    Written("gpustack/llama-box#61", "qwen3-30b-a3b-instruct-2507", WEATHER,
            '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>',
            [("get_weather", {"location": "Paris"})]),
    Written("NousResearch/hermes-agent#107080", "gemma3nTools:e4b",
            tools(ha_call_service={"action": "string", "device_id": "string"}),
            '<tool_call>\n{"name": "ha_call_service", "args": {"action": "turn_off", "device_id": "light.salon"}}'
            '\n</tool_call>',
            [("ha_call_service", {"action": "turn_off", "device_id": "light.salon"})]),
    Written("webbrain-one/webbrain#2682", "not named (a browser agent's model)", tools(click={"text": "string"}),
            '{"name":"click","arguments":{"text":"Save"}}',
            [("click", {"text": "Save"})]),
    Written("webbrain-one/webbrain#2682", "not named (a browser agent's model)", tools(click={"text": "string"}),
            '{"name":"click","arguments":{"meta":{"source":"dialog"},"text":"Save {draft}"}}',
            [("click", {"meta": {"source": "dialog"}, "text": "Save {draft}"})]),
    # Llama's python markers, Gemma 4, Mistral, Anthropic-style XML
    Written("vllm-project/vllm#16214", "Llama 4", tools(brave_web_search={"query": "string"}),
            '<|python_start|>{"name": "brave_web_search", "parameters": {"query": "latest news"}}<|python_end|>',
            [("brave_web_search", {"query": "latest news"})]),
    Written("ggml-org/llama.cpp#22786", "gemma-4", tools(CommitMemoryTool={"memory": "string"}),
            "<|tool_call>call:CommitMemoryTool{memory:\"The user's name is John.\"}",
            [("CommitMemoryTool", {"memory": "The user's name is John."})]),
    Written("ml-explore/mlx-lm#1374", "Ministral-8B-Instruct-2410", tools(calculator={"expression": "string"}),
            '[TOOL_CALLS] [{"name": "calculator", "arguments": {"expression": "2+3"}}]',
            [("calculator", {"expression": "2+3"})]),
    Written("ml-explore/mlx-lm#1374", "Devstral-Small-2", tools(calculator={"expression": "string"}),
            '[TOOL_CALLS]calculator[ARGS]{"expression": "2+3"}',
            [("calculator", {"expression": "2+3"})]),
    Written("issue 12 of this project (thread not located)", "qwen3.5", tools(cronjob={"action": "string"}),
            '<function_calls><invoke name="cronjob"><parameter name="action">list</parameter></invoke>'
            '</function_calls>',
            [("cronjob", {"action": "list"})]),
    # Near misses and malformed calls: they stay text
    Written("ollama/ollama#11381", "qwen3:14b", tools(getApiFunctions={}, selectFunctions={"names": "array"}),
            '<tool_call>\n{"name": "create", "arguments": {"title": "test1", "content": "hello world!"}}\n</tool_call>',
            TEXT),  # names a tool the request did not offer
    Written("ggml-org/llama.cpp#15012", "Qwen3-Coder-30B-A3B", tools(get_current_weather={"location": "string"}),
            '{\n  "tool_calls": []\n}',
            TEXT),  # a wrapper with no call in it
    Written("ggml-org/llama.cpp#16710", "Qwen3-30B-A3B-Thinking", tools(read_file={"path": "string"}),
            '{\n    "name": "Bingo",\n    "age": 30\n}',
            TEXT),
    Written("ahwurm/localharness#105", "not named (local model)", tools(read_file={"path": "string"}),
            '```json\n{"name": "my-app", "version": "1.0.0"}\n```',
            TEXT),
    Written("ahwurm/localharness#105", "not named (local model)", tools(read_file={"path": "string"}),
            '```json\n[{"name": "alice", "age": 30}]\n```',
            TEXT),
    Written("ahwurm/localharness#105", "not named (local model)", tools(read_file={"path": "string"}),
            '```json\n{"expr": "sum(a, b)"}\n```',
            TEXT),
    Written("webbrain-one/webbrain#2682", "not named (a browser agent's model)", tools(click={"text": "string"}),
            'I will save it now.\n{"name":"click","arguments":{"text":"Save","meta":{"source":"dialog"}}}',
            TEXT),  # prose, then bare JSON
    Written("dnakov/anon-kode#23 (abridged)", "qwen2.5-coder:32b",
            tools(ReadNotebook={"notebook_path": "string"}, Edit={"file_path": "string"}),
            "To review the code in the specified file, you need to first read its contents.\n\nGiven your request, "
            "here is how you can call the ReadFile function to accomplish this:\n\n<function-name>ReadNotebook"
            "</function-name>\n<arguments>{\"notebook_path\": \"/src/Novaleaf.GodotDev/Game3d/Sprite3d/"
            "_sprite3d_scratch.cs\"}</arguments>\n\nHowever, note that ReadNotebook is meant for Jupyter notebook "
            "(.ipynb) files.",
            TEXT),
    Written("lmstudio-ai/lmstudio-bug-tracker#1592", "qwen3.5-35b-a3b", tools(web_search={"query": "string"}),
            "some models use `<function=...>`, others use `<tool_call>`",
            TEXT),
    Written("TheR1D/shell_gpt#509", "mistral:7b-instruct", tools(Bash={"command": "string"}),
            "```bash\nbrew update && brew cleanup\n```",
            TEXT),
    Written("dheerajcl/Shellsage#2", "deepseek-r1-abliterated:14b", tools(Bash={"command": "string"}),
            "To update all installed packages on Arch Linux, you can use the following command: \n\n**Command:**\n"
            "```bash\npacman -Syu\n```\n\nThis command updates the package list and upgrades any outdated packages. "
            "\n\n**Note:**  Make sure to run this command in your terminal to apply the updates. ",
            TEXT),
    Written("EKKOLearnAI/hermes-studio#942", "MiniMax-M2.7", tools(terminal={"command": "string"}),
            "[Calling tool: terminal with arguments: {“command”: “free -h && df -h / && nvidia-smi "
            "--query-gpu=utilization.gpu,utilization.memory,memory.used,memory.total --format=csv,noheader "
            "2>/dev/null || echo ‘no nvidia’”}]",
            TEXT),
    Written("EKKOLearnAI/hermes-studio#942", "MiniMax-M2.7",
            tools(search_files={"file_glob": "string", "path": "string", "pattern": "string"}),
            "[Calling tool: search_files]\n<parameter name=“file_glob”>*.tsx</parameter>\n<parameter name=“path”>"
            "/home/caoya/hermes-web-ui</parameter>\n<parameter name=“pattern”>tool_call|ToolCall|tool-call"
            "</parameter>\n</invoke>\n</minimax:tool_call>",
            TEXT),
    Written("matlab-deep-learning/llms-with-matlab#94", "mistral-nemo", tools(move={"target": "string"}),
            '[TOOL_CALLS]{"content": Movement complete}',
            TEXT),  # not JSON, and no call in it
]


def corpus_result(message):
    """A finished message as the corpus states outcomes: its calls, or TEXT."""
    calls = [(block["name"], block["input"]) for block in message["content"] if block["type"] == "tool_use"]
    return calls or TEXT


def chunkings(text):
    """The ways a model may stream text: by 1, 2, 3, 5 and 8 characters, word by word, all at once."""
    for size in (1, 2, 3, 5, 8):
        yield [text[i:i + size] for i in range(0, len(text), size)]
    yield re.findall(r"\s*\S+|\s+", text)
    yield [text]


@pytest.mark.parametrize("written", CORPUS, ids=repr)
def test_corpus_replies_become_what_they_are(written):
    parsed = text_calls(written.text, written.tools)
    assert ([(call["name"], call["input"]) for call in parsed[1]] if parsed else TEXT) == written.expected
    for pieces in chunkings(written.text):
        events, translator = translate([chunk(content=piece) for piece in pieces] + [final_chunk()],
                                       tool_names=written.tools)
        assert_valid_stream(events)
        message = translator.message
        assert corpus_result(message) == written.expected, pieces
        text = "".join(block["text"] for block in message["content"] if block["type"] == "text")
        if parsed:
            assert text.strip() == parsed[0] and message["stop_reason"] == "tool_use"
        else:
            assert text == written.text and message["stop_reason"] == "end_turn"


@pytest.mark.parametrize("text", [
    '{\n    "name": "Bingo",\n    "age": 30\n}',
    '```json\n{"name": "my-app", "version": "1.0.0", "private": true, "scripts": {"dev": "vite"}}\n```',
    '{"city": "Paris", "temperature": 21, "conditions": "sunny"}',
    '{"id": "chatcmpl-123", "object": "chat.completion", "choices": [{"message": {"content": "hi"}}]}',
    "```bash\nbrew update && brew cleanup\n```",
    "[1, 2, 3] are the first three numbers.",
    "I would call Bash to list the files, but I cannot run commands here.",
    '<tool_call>\n{"name": "create", "arguments": {"title": "test1"}}\n</tool_call>',
    '{\n  "tool_calls": []\n}',
    '{"tool_calls": [{"name": "Deploy", "arguments": {"env": "prod"}}]}',
])
def test_near_misses_stream_before_the_reply_ends(text):
    """Text is held only while it can still become a call: these show themselves early."""
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
    translator = proxy.StreamTranslator("claude-x", 5, tool_names=TOOLS + ["read_file"])
    translator.start()
    early = [event for piece in pieces for event in translator.feed(chunk(content=piece))]
    streamed = "".join(data["delta"]["text"] for name, data in early if name == "content_block_delta")
    assert len(streamed) >= len(text) // 2
    translator.feed(final_chunk())
    assert translator.message["content"] == [{"type": "text", "text": text}]


def test_parameters_written_as_xml_are_typed_by_the_tools_schema():
    schema = {"type": "object", "properties": {"count": {"type": "integer"}, "ratio": {"type": "number"},
                                               "force": {"type": "boolean"}, "tags": {"type": "array"},
                                               "spec": {"type": "object"}, "note": {"type": "string"}}}
    text = ("<function=Tune>\n<parameter=count>\n3\n</parameter>\n<parameter=ratio>\n0.5\n</parameter>\n"
            "<parameter=force>\nTrue\n</parameter>\n<parameter=tags>\n[\"a\", \"b\"]\n</parameter>\n"
            "<parameter=spec>\n{\"k\": 1}\n</parameter>\n<parameter=note>\n42\n</parameter>\n"
            "<parameter=other>\n7\n</parameter>\n<parameter=count2>\nnot a number\n</parameter>\n</function>")
    _, [call] = text_calls(text, {"Tune": schema})
    assert call["input"] == {"count": 3, "ratio": 0.5, "force": True, "tags": ["a", "b"], "spec": {"k": 1},
                             "note": "42", "other": "7", "count2": "not a number"}
    bad = text.replace("\n3\n", "\nthree\n")
    assert text_calls(bad, {"Tune": schema})[1][0]["input"]["count"] == "three"


@pytest.mark.parametrize("text", [
    "Here is an example:\n<tool_call>\n" + BASH_CALL + "\n</tool_call>",
    "I can't run that for you, but it would be:\n<function=Bash>\n<parameter=command>\nrm -rf /\n</parameter>\n</function>",
    "```\n<tool_call>\n" + BASH_CALL + "\n</tool_call>\n```",
    "Sure.\n<tool_call>\n" + BASH_CALL + "\n</tool_call>\nAnd then I will summarise the output for you.",
    "word " * 300 + "\n<tool_call>\n" + BASH_CALL + "\n</tool_call>",
    "Run it like <tool_call>" + BASH_CALL + "</tool_call> in your reply.",
    "Do not run this:\n<function=Bash>\n<parameter=command>\nrm -rf /\n</parameter>\n</function>",
    "You should never run:\n<tool_call>\n" + BASH_CALL + "\n</tool_call>",
    "A call looks like this:\n<tool_call>\n" + BASH_CALL + "\n</tool_call>",
    "Instead of running it, type:\n<tool_call>\n" + BASH_CALL + "\n</tool_call>",
    "Here is how to list the files:\n<tool_call>\n" + BASH_CALL + "\n</tool_call>",
    "You can call it like so:\n<function=Bash>\n<parameter=command>\nls\n</parameter>\n</function>",
])
def test_examples_refusals_and_calls_inside_prose_never_run(text):
    for pieces in ([text], [text[i:i + 4] for i in range(0, len(text), 4)]):
        events, translator = translate([chunk(content=piece) for piece in pieces] + [final_chunk()],
                                       tool_names=TOOLS)
        assert translator.message["content"] == [{"type": "text", "text": text}]


def test_a_call_cut_short_by_max_tokens_or_a_stop_sequence_never_runs():
    cut = "<function=Bash>\n<parameter=command>\nrm -rf /"  # "rm -rf /tmp/build", cut by max_tokens
    for pieces in ([cut], [cut[i:i + 3] for i in range(0, len(cut), 3)]):
        _, translator = translate([chunk(content=piece) for piece in pieces] + [final_chunk(done_reason="length")],
                                  tool_names=TOOLS)
        assert translator.message["content"] == [{"type": "text", "text": cut}]
        assert translator.message["stop_reason"] == "max_tokens"
    call = "<function=Bash>\n<parameter=command>\nls -la\n</parameter>\n</function>"
    _, translator = translate([chunk(content=call), final_chunk()], tool_names=TOOLS, stop_sequences=["-la"])
    assert translator.message["content"] == [{"type": "text", "text": "<function=Bash>\n<parameter=command>\nls "}]
    # A call that was complete when a stop sequence after it ended the reply still runs.
    _, translator = translate([chunk(content=call + "\nObservation:"), final_chunk()], tool_names=TOOLS,
                              stop_sequences=["Observation:"])
    assert [(b["type"], b.get("input")) for b in translator.message["content"]] == [("tool_use", {"command": "ls -la"})]


def test_a_preamble_may_mention_examples_without_being_one():
    text = "Let me look in the examples folder.\n<tool_call>\n" + BASH_CALL + "\n</tool_call>"
    assert text_calls(text, TOOLS) == ("Let me look in the examples folder.",
                                                        [{"name": "Bash", "input": {"command": "ls -la"}}])
    text = "It looks like the build failed; I do not know why yet, so:\n<tool_call>\n" + BASH_CALL + "\n</tool_call>"
    assert text_calls(text, TOOLS)[1] == [{"name": "Bash", "input": {"command": "ls -la"}}]


def test_mistral_calls_keep_the_calls_and_drop_the_answer_made_up_after_them():
    text = '[TOOL_CALLS] [{"name": "Bash", "arguments": {"command": "date"}}]\nIt is 10:42 on Monday.'
    events, translator = stream_text(text)
    assert [(b["type"], b.get("input")) for b in translator.message["content"]] == [("tool_use", {"command": "date"})]
    literal = "[TOOL_CALLS] [{'name': 'Bash', 'arguments': {'command': 'date', 'quiet': True}}]"
    assert text_calls(literal, TOOLS)[1] == [{"name": "Bash", "input": {"command": "date", "quiet": True}}]


def test_gemma_call_syntax_with_its_string_delimiter_and_nesting():
    text = '<|tool_call>call:Write{file_path:<|"|>/tmp/a, b.txt<|"|>,content:<|"|>x: {1}<|"|>,opts:{n:2,on:true,' \
           'tags:[<|"|>a<|"|>,null]}}<tool_call|>'
    _, [call] = text_calls(text, TOOLS)
    assert call == {"name": "Write", "input": {"file_path": "/tmp/a, b.txt", "content": "x: {1}",
                                               "opts": {"n": 2, "on": True, "tags": ["a", None]}}}


def test_qwen_xml_call_through_the_proxy_streaming_and_not(gateway, ollama):
    tools = [{"name": "Bash", "input_schema": {"type": "object", "properties": {
        "command": {"type": "string"}, "timeout": {"type": "number"}}}}]
    text = ("I'll run it.\n<tool_call>\n<function=Bash>\n<parameter=command>\necho 'a < b'\n</parameter>\n"
            "<parameter=timeout>\n5000\n</parameter>\n</function>\n</tool_call>")
    for stream in (False, True):
        ollama.script(Reply([chunk(content=text[i:i + 6]) for i in range(0, len(text), 6)] + [final_chunk()]))
        status, _, raw = gateway.call("POST", "/v1/messages", request_body(tools=tools, stream=stream))
        assert status == 200
        if stream:
            events = parse_sse(raw)
            assert_valid_stream(events)
            blocks = [data["content_block"] for name, data in events if name == "content_block_start"]
            deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
            assert [b["type"] for b in blocks] == ["text", "tool_use"] and blocks[1]["name"] == "Bash"
            assert "".join(d.get("text", "") for d in deltas).strip() == "I'll run it."
            assert json.loads(deltas[-1]["partial_json"]) == {"command": "echo 'a < b'", "timeout": 5000}
            assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
        else:
            message = json.loads(raw)
            assert message["stop_reason"] == "tool_use"
            assert message["content"][1]["input"] == {"command": "echo 'a < b'", "timeout": 5000}


# Replies that made the parse quadratic: a run of whitespace in an unclosed fence (a model stuck in
# a loop, or one asked to by a prompt injection), thousands of tags, parameters without their close.
ADVERSARIAL_REPLIES = {
    "fence, then spaces": "```\n" + " " * 1000000,
    "fence, spaces, half a close": "```json\n" + " " * 1000000 + "\n``",
    "newlines only": "\n" * 1000000,
    "python tags, thousands": ("<|python_tag|>" + BASH_CALL + "<|eom_id|>") * 20000,
    "invoke parameters, unclosed": '<function_calls>\n<invoke name="Bash">' + '<parameter name="a">' * 50000,
    # Prose, then a model stuck in blank lines or spaces: the text streams, and the gate that
    # watches for a call must not read everything let through again for each token.
    "a line, then blank lines": "Let me check.\n" + "\n" * 1000000,
    "a word, then spaces": "Hi" + " " * 1000000,
}
ADVERSARIAL_CHILD = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import simple_api_proxy as proxy
from test_text_tool_calls import ADVERSARIAL_REPLIES, TOOLS
results = {}
for name, text in ADVERSARIAL_REPLIES.items():
    found = proxy.find_text_tool_calls(text, proxy.offered_tools(TOOLS))
    translator = proxy.StreamTranslator("m", 1, tool_names=TOOLS)
    pieces = [{"message": {"role": "assistant", "content": text[at:at + 40]}} for at in range(0, len(text), 40)]
    translator.translate(pieces + [{"message": {"role": "assistant", "content": ""}, "done": True}], [])
    blocks = translator.message["content"]
    results[name] = [len(found[1]) if found else 0, [block["type"] for block in blocks][:1], len(blocks),
                     sum(len(block.get("text", "")) for block in blocks)]
print(json.dumps(results))
'''


def test_adversarial_replies_of_a_megabyte_are_read_in_linear_time():
    # Linear code reads all of these in a few seconds; the quadratic parse took hours on the first
    # (0.9 s for 32,000 spaces, x16 for each x4), holding the interpreter lock all the while. The
    # child's time limit only tells a hang from an answer; bench/text_calls.py measures the cost.
    tests_folder = str(Path(__file__).resolve().parent)
    child = subprocess.run([sys.executable, "-c", ADVERSARIAL_CHILD, str(ROOT)], cwd=tests_folder,
                           capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=tests_folder))
    assert child.returncode == 0, child.stderr
    results = json.loads(child.stdout)
    for name in ("fence, then spaces", "fence, spaces, half a close", "newlines only", "a line, then blank lines",
                 "a word, then spaces"):
        assert results[name] == [0, ["text"], 1, len(ADVERSARIAL_REPLIES[name])], name  # all of it, as text
    assert results["python tags, thousands"][:3] == [20000, ["tool_use"], 20000]
    assert results["invoke parameters, unclosed"][:3] == [0, ["text"], 1]


@pytest.mark.parametrize("stream", [False, True])
def test_a_whitespace_run_in_an_unclosed_fence_comes_back_as_text(gateway, ollama, stream):
    text = "```\n" + " " * 100000
    pieces = [text[at:at + 40] for at in range(0, len(text), 40)]
    ollama.script(Reply([chunk(content=piece) for piece in pieces] + [final_chunk(done_reason="length")]))
    status, _, raw = gateway.call("POST", "/v1/messages", request_body(f"spaces {stream}", tools=_tools_body(),
                                                                       stream=stream))
    assert status == 200
    if stream:
        events = parse_sse(raw)
        assert_valid_stream(events)
        assert "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta") == text
    else:
        message = json.loads(raw)
        assert message["content"] == [{"type": "text", "text": text}] and message["stop_reason"] == "max_tokens"


def _tools_body():
    return [{"name": name, "description": name, "input_schema": schema or {"type": "object"}}
            for name, schema in proxy.offered_tools(TOOLS).items()]
