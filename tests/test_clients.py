"""Real clients through the proxy: the official anthropic SDK, unmodified, and the real Claude
Code CLI (found through CLAUDE_CODE_BIN).
"""

import json
import os
import subprocess

import pytest

import simple_api_proxy as proxy

from standins.ollama import chunk, final_chunk, MODEL, ollama_call, ollama_prompt, Reply, text_reply, tool_reply
from standins.proxy import free_port, running_proxy
from standins.support import anthropic_module, claude_code_binary


def test_sdk_messages_create(sdk):
    anthropic, client = sdk
    message = client.messages.create(model="claude-opus-5-5", max_tokens=100,
                                     messages=[{"role": "user", "content": "Hello"}])
    assert message.content[0].text == "Hello! I am the stand-in model."
    assert message.stop_reason == "end_turn" and message.usage.output_tokens == 6
    assert message._request_id.startswith("req_")


def test_sdk_stream_get_final_message(sdk, ollama):
    anthropic, client = sdk
    ollama.script(Reply([chunk(content="Streaming "), chunk(content="works."), final_chunk(eval_count=2)]))
    with client.messages.stream(model="claude-opus-5-5", max_tokens=100,
                                messages=[{"role": "user", "content": "Hi"}]) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert texts == ["Streaming ", "works."]
    assert final.content[0].text == "Streaming works." and final.usage.output_tokens == 2


def test_sdk_tool_use_both_directions(sdk, ollama):
    anthropic, client = sdk
    tools = [{"name": "get_weather", "description": "Weather for a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    ollama.script(tool_reply(("get_weather", {"city": "Paris"})))
    with client.messages.stream(model="claude-opus-5-5", max_tokens=100, tools=tools,
                                messages=[{"role": "user", "content": "Weather in Paris?"}]) as stream:
        first = stream.get_final_message()
    call = first.content[0]
    assert first.stop_reason == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
    ollama.script(text_reply("It is 11 °C in Paris."))
    second = client.messages.create(model="claude-opus-5-5", max_tokens=100, tools=tools, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "11 °C"}]}])
    assert second.content[0].text == "It is 11 °C in Paris."
    assert ollama.chats()[-1]["messages"][-1] == {"role": "tool", "content": "11 °C", "tool_call_id": call.id,
                                                  "tool_name": "get_weather"}


def test_sdk_count_tokens_and_models(sdk):
    anthropic, client = sdk
    counted = client.messages.count_tokens(model="claude-opus-5-5", messages=[{"role": "user", "content": "Hi"}])
    assert counted.input_tokens > 0
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL, "llama3.2:3b", "qwen3:8b"]
    assert client.models.retrieve("claude-haiku-4-5").id == "claude-haiku-4-5"


def test_sdk_raises_the_matching_exception_for_each_error(sdk, ollama):
    anthropic, client = sdk
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="claude-opus-5-5", max_tokens=10, messages=[])
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="mistral:7b", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    ollama.script(Reply(status=503, error="server busy, please try again.  maximum pending requests exceeded"))
    with pytest.raises(anthropic.OverloadedError):
        client.messages.create(model="claude-opus-5-5", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    ollama.script(Reply([chunk(content="Hi"), {"error": "runner crashed"}]))
    with pytest.raises(anthropic.APIStatusError, match="runner crashed"):
        with client.messages.stream(model="claude-opus-5-5", max_tokens=10,
                                    messages=[{"role": "user", "content": "x"}]) as stream:
            stream.get_final_message()
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("nothing-here")


def test_sdk_sees_gateway_timeout_and_unreachable_ollama(ollama):
    anthropic = anthropic_module()
    ollama.script(Reply(delay_before=3))
    with running_proxy(ollama.url, OLLAMA_FIRST_TOKEN_TIMEOUT=0.5) as gateway:
        client = anthropic.Anthropic(base_url=gateway.url, api_key="dummy", max_retries=0)
        with pytest.raises(anthropic.GatewayTimeoutError):
            client.messages.create(model="claude-opus-5-5", max_tokens=10,
                                   messages=[{"role": "user", "content": "x"}])
    with running_proxy(f"127.0.0.1:{free_port()}") as gateway:
        client = anthropic.Anthropic(base_url=gateway.url, api_key="dummy", max_retries=0)
        with pytest.raises(anthropic.InternalServerError) as caught:
            client.messages.create(model="claude-opus-5-5", max_tokens=10,
                                   messages=[{"role": "user", "content": "x"}])
        assert caught.value.status_code == 502


class ClaudeCodeScript:
    """The stand-in's answers for a Claude Code conversation: `first` for the prompt, then
    `after_tool(tool_output)` once Claude Code sends a tool result back."""

    def __init__(self, first, after_tool=None):
        self.first = first
        self.after_tool = after_tool

    def __call__(self, request):
        results = latest_tool_results(request)
        if results and self.after_tool:
            return self.after_tool(results[-1]["content"])
        return self.first()


def latest_tool_results(request):
    """The tool messages after the model's latest turn (reminders may follow them as user text)."""
    results = []
    for message in reversed(request["messages"]):
        if message["role"] == "assistant":
            break
        if message["role"] == "tool":
            results.insert(0, message)
    return results


class ClaudeCodeSteps:
    """The stand-in's answers for a longer Claude Code session: reply N answers the request that
    holds N model turns, so a request Claude Code repeats gets the same answer."""

    def __init__(self, *replies, last=lambda: text_reply("done")):
        self.replies = replies
        self.last = last

    def __call__(self, request):
        turns = sum(1 for message in request["messages"] if message["role"] == "assistant")
        return self.replies[turns]() if turns < len(self.replies) else self.last()


@pytest.fixture
def claude_code(ollama, tmp_path, caplog):
    binary = claude_code_binary()
    caplog.set_level("INFO", logger="simple_api_proxy")
    workdir, home = tmp_path / "work", tmp_path / "home"
    workdir.mkdir()
    home.mkdir()

    def run(*args, settings=None, timeout=120, env_extra=None):
        with running_proxy(ollama.url, **(settings or {})) as gateway:
            env = {"PATH": os.environ["PATH"], "HOME": str(home), "TERM": "dumb",
                   "ANTHROPIC_BASE_URL": gateway.url, "ANTHROPIC_AUTH_TOKEN": "dummy",
                   "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1", **(env_extra or {})}
            result = subprocess.run([binary, "-p", *args], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                    capture_output=True, text=True, timeout=timeout)
        result.workdir = workdir
        return result

    return run


def test_claude_code_prints_the_models_answer(claude_code, ollama, caplog):
    ollama.responder = ClaudeCodeScript(lambda: text_reply("Hello from the model behind the proxy."))
    result = claude_code("say hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Hello from the model behind the proxy."
    request = ollama.chats()[0]
    assert request["model"] == MODEL and len(request["tools"]) >= 5
    assert "x-anthropic-billing-header" not in json.dumps(request["messages"])
    assert "claude-opus-5-5->qwen2.5-coder:7b 200 stream" in caplog.text


def test_claude_code_runs_a_bash_tool_loop(claude_code, ollama):
    ollama.responder = ClaudeCodeScript(
        lambda: tool_reply(("Bash", {"command": "echo proxy-$((6*7))", "description": "Print a number"})),
        lambda output: text_reply(f"The command printed: {output.strip()}"))
    result = claude_code("run the command", "--allowedTools", "Bash")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The command printed: proxy-42"
    tool_message = ollama.chats()[-1]["messages"][-1]
    assert tool_message["role"] == "tool" and tool_message["tool_name"] == "Bash"
    assert tool_message["tool_call_id"].startswith("toolu_")


def test_claude_code_write_tool_creates_the_file(claude_code, ollama, tmp_path):
    target = tmp_path / "work" / "hello.txt"
    ollama.responder = ClaudeCodeScript(
        lambda: tool_reply(("Write", {"file_path": str(target), "content": "written through the proxy\n"})),
        lambda output: text_reply("File written."))
    result = claude_code("write the file", "--allowedTools", "Write")
    assert result.returncode == 0, result.stderr
    assert target.read_text() == "written through the proxy\n" and "File written." in result.stdout


def test_claude_code_tool_call_written_as_text(claude_code, ollama):
    call = '{"name": "Bash", "arguments": {"command": "echo text-call-$((2+3))", "description": "Echo"}}'
    ollama.responder = ClaudeCodeScript(
        lambda: Reply([chunk(content=call[i:i + 7]) for i in range(0, len(call), 7)] + [final_chunk()]),
        lambda output: text_reply(f"Output was {output.strip()}"))
    result = claude_code("run it", "--allowedTools", "Bash")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Output was text-call-5"


def test_claude_code_runs_a_call_written_as_qwen_xml(claude_code, ollama):
    """qwen3-coder's own format, after a preamble, streamed in small pieces."""
    call = ("Let me run that.\n<tool_call>\n<function=Bash>\n<parameter=command>\necho xml-call-$((3+4))\n"
            "</parameter>\n<parameter=timeout>\n60000\n</parameter>\n<parameter=description>\nEcho a number\n"
            "</parameter>\n</function>\n</tool_call>")
    ollama.responder = ClaudeCodeScript(
        lambda: Reply([chunk(content=call[i:i + 5]) for i in range(0, len(call), 5)] + [final_chunk()]),
        lambda output: text_reply(f"Output was {output.strip()}"))
    result = claude_code("run it", "--allowedTools", "Bash")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Output was xml-call-7"
    assert ollama.chats()[-1]["messages"][-1]["content"].strip() == "xml-call-7"


def test_claude_code_model_names_reach_the_configured_models(claude_code, ollama, caplog):
    ollama.responder = ClaudeCodeScript(lambda: text_reply("ok"))
    settings = {"MODEL_MAP": "haiku=llama3.2:3b"}
    assert claude_code("hi", settings=settings).returncode == 0
    assert claude_code("hi", "--model", "claude-haiku-4-5", settings=settings).returncode == 0
    assert [request["model"] for request in ollama.chats()] == [MODEL, "llama3.2:3b"]
    assert "claude-opus-5-5->qwen2.5-coder:7b" in caplog.text
    assert "claude-haiku-4-5->llama3.2:3b" in caplog.text


def text_call(name, arguments):
    """A reply that writes the call as text, the way small models often do."""
    return Reply([chunk(content=f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'),
                  final_chunk()])


def test_claude_code_loads_a_deferred_tool_then_calls_it_as_text_and_structured(claude_code, ollama, tmp_path):
    notebook = tmp_path / "work" / "nb.ipynb"
    cells = [{"cell_type": "code", "id": cell_id, "metadata": {}, "execution_count": None, "outputs": [],
              "source": [source]} for cell_id, source in (("c1", "x = 1\n"), ("c2", "y = 2\n"))]
    notebook.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    ollama.responder = ClaudeCodeSteps(
        lambda: tool_reply(("ToolSearch", {"query": "select:NotebookEdit"})),
        lambda: tool_reply(("Read", {"file_path": str(notebook)})),
        lambda: text_call("NotebookEdit", {"notebook_path": str(notebook), "cell_id": "c1", "new_source": "x = 10"}),
        lambda: tool_reply(("NotebookEdit", {"notebook_path": str(notebook), "cell_id": "c2", "new_source": "y = 20"})))
    result = claude_code("edit the notebook", "--allowedTools", "ToolSearch,Read,NotebookEdit")
    assert result.returncode == 0, result.stderr
    assert [cell["source"] for cell in json.loads(notebook.read_text())["cells"]] == ["x = 10", "y = 20"]
    offered = [[tool["function"]["name"] for tool in chat["tools"]] for chat in ollama.chats()]
    assert "NotebookEdit" not in offered[0] and all(names[-1] == "NotebookEdit" for names in offered[1:])
    assert "DeferredToolPlaceholder" not in offered[-1] and len(ollama.chats()) == 5
    assert "$schema" not in json.dumps(ollama.chats()[-1]["tools"])


def write_pdf(path, text):
    """A one-page PDF with a line of text."""
    stream = f"BT /F1 12 Tf 20 100 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    data, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(data))
        data += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(data)
    data += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    data += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    data += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(data))


def test_claude_code_reads_a_pdf_and_a_240kb_file_at_the_default_window(claude_code, ollama, tmp_path, caplog):
    work = tmp_path / "work"
    write_pdf(work / "invoice.pdf", "Invoice total 42")
    big = work / "big.txt"
    big.write_text("".join(f"line {n:05d}: " + "abcdefghij" * 7 + "\n" for n in range(3000)))
    assert big.stat().st_size > 240_000
    ollama.responder = ClaudeCodeSteps(
        lambda: tool_reply(("Read", {"file_path": str(work / "invoice.pdf")})),
        lambda: tool_reply(("Read", {"file_path": str(big)})),
        lambda: tool_reply(("Edit", {"file_path": str(big), "old_string": "line 00005: abc",
                                     "new_string": "line 00005: EDITED abc"})),
        lambda: tool_reply(("Write", {"file_path": str(work / "summary.txt"), "content": "read both\n"})))
    result = claude_code("read the files", "--allowedTools", "Read,Edit,Write")
    assert result.returncode == 0, result.stderr
    assert (work / "summary.txt").read_text() == "read both\n"
    assert big.read_text().splitlines()[5].startswith("line 00005: EDITED abc")
    chats = ollama.chats()
    assert len(chats) == 5  # no request refused, none repeated
    pdf_result = latest_tool_results(chats[1])[0]["content"]
    assert "[PDF document (application/pdf, " in pdf_result and "this model can't read PDF documents" in pdf_result
    read_result = latest_tool_results(chats[2])[0]["content"]
    assert "characters cut from the middle of this tool result to fit the model's 32768-token window" in read_result
    assert read_result.startswith("1\tline 00000") and "line 00895" in read_result
    assert all(proxy.estimate_tokens(chat) <= 32768 for chat in chats)
    assert "changed for the model: [PDF document" in caplog.text


def test_claude_code_session_with_nudges_and_parallel_calls_keeps_the_prompt_prefix(claude_code, ollama, tmp_path,
                                                                                   caplog):
    work = tmp_path / "work"
    (work / "notes.txt").write_text("note\n")
    ollama.responder = ClaudeCodeSteps(
        # Read answers at once, the sleep a second later: Claude Code sends the results in that order.
        lambda: tool_reply(("Bash", {"command": "sleep 1", "description": "Wait"}),
                           ("Read", {"file_path": str(work / "notes.txt")})),
        lambda: tool_reply(("Bash", {"command": "echo one > one.txt", "description": "Write one"})),
        lambda: tool_reply(("Write", {"file_path": str(work / "two.txt"), "content": "two\n"})),
        lambda: tool_reply(("Bash", {"command": "cat one.txt two.txt > both.txt", "description": "Join"})))
    result = claude_code("do the steps", "--allowedTools", "Bash,Read,Write", settings={"LOG_BODIES": "1"},
                         env_extra={"CLAUDE_CODE_SILENT_TURN_REMINDER": "1",
                                    "CLAUDE_CODE_SILENT_TURN_REMINDER_TURNS": "1"})
    assert result.returncode == 0, result.stderr
    assert (work / "both.txt").read_text() == "one\ntwo\n"
    bodies = [json.loads(r.getMessage().split(" body: ", 1)[1]) for r in caplog.records if " body: " in r.getMessage()]
    sent = bodies[1]["messages"]
    assert [b["tool_use_id"] for b in sent[-2]["content"] if b["type"] == "tool_result"] == \
        [b["id"] for b in sent[-3]["content"]][::-1], "Claude Code sent the results in completion order"
    assert sum(1 for body in bodies for m in body["messages"] if m["role"] == "system") > len(bodies)
    chats = ollama.chats()
    calls = [call["id"] for call in [m for m in chats[1]["messages"] if m["role"] == "assistant"][-1]["tool_calls"]]
    assert [m["tool_call_id"] for m in latest_tool_results(chats[1])] == calls
    assert [m["role"] for m in chats[-1]["messages"]].count("system") == 1
    assert any(m["role"] == "user" and m["content"].startswith("<system-reminder>\nThe user hasn't heard from you")
               for m in chats[-1]["messages"])
    prompts = [ollama_prompt(chat) for chat in chats]
    for earlier, later in zip(prompts, prompts[1:]):
        assert later.startswith(earlier)


def test_claude_code_print_mode_keeps_its_thinking_across_a_tool_call(claude_code, ollama, caplog, tmp_path):
    """`-p` asks for thinking with display omitted: the reasoning comes back sealed in the block's
    signature, and the next request gives it to the model again."""
    ollama.responder = ClaudeCodeScript(
        lambda: Reply([chunk(thinking="The user wants it run. "), chunk(thinking="I will call Bash."),
                       chunk(content="Running it."),
                       chunk(tool_calls=[ollama_call("Bash", {"command": "echo think-$((6*7))", "description": "Echo"})]),
                       final_chunk()]),
        lambda output: Reply([chunk(thinking="It printed the number."), chunk(content=f"Output: {output.strip()}"),
                              final_chunk()]))
    result = claude_code("run it", "--allowedTools", "Bash",
                         settings={"OLLAMA_MODEL": "qwen3:8b", "LOG_BODIES": "1",
                                   "THINKING_KEY_FILE": tmp_path / "thinking.key"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Output: think-42" and "I will call Bash" not in result.stdout
    bodies = [json.loads(r.getMessage().split(" body: ", 1)[1]) for r in caplog.records if " body: " in r.getMessage()]
    assert bodies[0]["thinking"] == {"type": "adaptive", "display": "omitted"}
    returned = bodies[1]["messages"][-2]["content"][0]
    assert returned["type"] == "thinking" and returned["thinking"] == "" and len(returned["signature"]) > 40
    chats = ollama.chats()
    assert [m for m in chats[1]["messages"] if m["role"] == "assistant"][0]["thinking"] == \
        "The user wants it run. I will call Bash."
    assert chats[0]["think"] and "left out" not in caplog.text


def test_claude_code_web_search_reports_unavailable_and_the_session_goes_on(claude_code, ollama, caplog):
    ollama.responder = ClaudeCodeSteps(
        lambda: tool_reply(("ToolSearch", {"query": "select:WebSearch"})),
        lambda: tool_reply(("WebSearch", {"query": "latest python release"})),
        lambda: tool_reply(("Bash", {"command": "echo after-search", "description": "Echo"})),
        last=lambda: text_reply("Web search is unavailable here; the rest is done."))
    result = claude_code("search the web, then echo", "--allowedTools", "ToolSearch,WebSearch,Bash")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Web search is unavailable here; the rest is done."
    chats = ollama.chats()
    assert len(chats) == 4  # the side request never reached the model
    search_result = latest_tool_results(chats[2])[0]["content"]
    assert search_result.startswith('Web search results for query: "latest python release"')
    assert "Web search error: unavailable" in search_result
    assert latest_tool_results(chats[3])[0]["content"].strip() == "after-search"
    assert "web_search is a server tool this proxy cannot run: answered unavailable" in caplog.text


def test_claude_code_at_a_window_the_proxy_warns_about_is_refused_before_the_model_runs(claude_code, ollama):
    """What the start-up warning for OLLAMA_NUM_CTX=8192 says: Claude Code's first request with all
    its tools does not fit, and the session ends before anything is done."""
    assert proxy.small_window_warning(8192)
    ollama.responder = ClaudeCodeScript(lambda: text_reply("never"))
    result = claude_code("say hello", settings={"OLLAMA_NUM_CTX": "8192"})
    assert result.returncode == 1 and result.stdout.startswith("Prompt is too long · the request is ~")
    assert int(result.stdout.split("~", 1)[1].split()[0]) > 13000 and ollama.chats() == []
