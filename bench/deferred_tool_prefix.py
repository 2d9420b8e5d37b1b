#!/usr/bin/env python3
"""Prompt tokens Ollama evaluates again when Claude Code loads a deferred tool.

    python3 bench/deferred_tool_prefix.py          # needs the Claude Code CLI (CLAUDE_CODE_BIN)

Runs the real Claude Code CLI (`-p`) through the proxy, in this process, in front of the tests'
stand-in Ollama, on a scripted session: Read a file, run Bash, load NotebookEdit with ToolSearch,
edit the notebook, run Bash, load WebFetch, run Bash. Then, once with ENABLE_TOOL_SEARCH=false,
Claude Code's first request with every tool inline.

Each request the proxy sent Ollama is laid out as Ollama's qwen2.5 template renders it (system
prompt, then the tools, then the turns), and compared with the one before: the kept prefix (what
Ollama's prompt cache can reuse), what is evaluated again, and of that how much is new. Tokens are
characters / 3.5, the proxy's own estimate. Loopback only; the run ends by itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import simple_api_proxy  # noqa: E402
from standins.ollama import StandInOllama, text_reply, tool_reply  # noqa: E402
from standins.proxy import running_proxy  # noqa: E402
from standins.support import claude_code_binary  # noqa: E402


def qwen_prompt(chat):
    """An Ollama chat request as the qwen2.5 template renders it."""
    system = "\n\n".join(m["content"] for m in chat["messages"] if m["role"] == "system")
    out = f"<|im_start|>system\n{system}"
    if chat.get("tools"):
        out += ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
        out += "".join("\n" + json.dumps(tool) for tool in chat["tools"])
        out += ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                "\"arguments\": <args-json-object>}\n</tool_call>")
    out += "<|im_end|>\n"
    for message in chat["messages"]:
        if message["role"] == "tool":
            out += f"<|im_start|>user\n<tool_response>\n{message['content']}\n</tool_response><|im_end|>\n"
        elif message["role"] == "assistant":
            out += f"<|im_start|>assistant\n{message['content']}"
            for call in message.get("tool_calls", ()):
                out += "\n<tool_call>\n" + json.dumps({"name": call["function"]["name"],
                                                        "arguments": call["function"]["arguments"]}) + "\n</tool_call>"
            out += "<|im_end|>\n"
        elif message["role"] != "system":
            out += f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


def tokens(chars):
    return round(chars / simple_api_proxy.CHARS_PER_TOKEN)


class Steps:
    """Reply N answers the request that holds N model turns."""

    def __init__(self, *replies):
        self.replies = replies

    def __call__(self, request):
        turns = sum(1 for message in request["messages"] if message["role"] == "assistant")
        return self.replies[turns]() if turns < len(self.replies) else text_reply("done")


def run_claude(ollama, work, home, prompt, *args, env_extra=None):
    with running_proxy(ollama.url) as gateway:
        env = {"PATH": os.environ["PATH"], "HOME": str(home), "TERM": "dumb", "ANTHROPIC_BASE_URL": gateway.url,
               "ANTHROPIC_AUTH_TOKEN": "dummy", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
               "DISABLE_TELEMETRY": "1", **(env_extra or {})}
        result = subprocess.run([claude_code_binary(), "-p", prompt, *args], cwd=work, env=env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        sys.exit(f"Claude Code failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")


def main():
    with tempfile.TemporaryDirectory() as scratch:
        work, home = Path(scratch) / "work", Path(scratch) / "home"
        work.mkdir()
        home.mkdir()
        notebook = work / "nb.ipynb"
        notebook.write_text(json.dumps({"cells": [{"cell_type": "code", "id": "c1", "metadata": {}, "outputs": [],
                                                   "execution_count": None, "source": ["x = 1\n"]}],
                                        "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
        (work / "notes.md").write_text("".join(f"line {n}: notes about the project and what it does\n"
                                               for n in range(120)))
        ollama = StandInOllama()
        try:
            ollama.responder = Steps(
                lambda: tool_reply(("Read", {"file_path": str(work / "notes.md")})),
                lambda: tool_reply(("Bash", {"command": "ls -la", "description": "List"})),
                lambda: tool_reply(("ToolSearch", {"query": "select:NotebookEdit"})),
                lambda: tool_reply(("NotebookEdit", {"notebook_path": str(notebook), "cell_id": "c1",
                                                     "new_source": "x = 10"})),
                lambda: tool_reply(("Bash", {"command": "cat nb.ipynb", "description": "Show"})),
                lambda: tool_reply(("ToolSearch", {"query": "select:WebFetch"})),
                lambda: tool_reply(("Bash", {"command": "echo done", "description": "Echo"})))
            run_claude(ollama, work, home, "work on the notebook", "--allowedTools",
                       "Read,Bash,ToolSearch,NotebookEdit,WebFetch")
            session = ollama.chats()
            ollama.responder = Steps()
            run_claude(ollama, work, home, "hi", env_extra={"ENABLE_TOOL_SEARCH": "false"})
            inline = ollama.chats()[len(session)]
        finally:
            ollama.stop()
    print("| request | tools | prompt | kept prefix | evaluated | of which new | evaluated a second time |")
    print("|---|---|---|---|---|---|---|")
    prompts = [qwen_prompt(chat) for chat in session]
    loads = []
    for index, (chat, prompt) in enumerate(zip(session, prompts)):
        names = [tool["function"]["name"] for tool in chat.get("tools", ())]
        if index == 0:
            print(f"| 1 | {len(names)} | {tokens(len(prompt)):,} | 0 | {tokens(len(prompt)):,} | "
                  f"{tokens(len(prompt)):,} | 0 |")
            continue
        earlier = prompts[index - 1]
        kept = next((i for i, (a, b) in enumerate(zip(earlier, prompt)) if a != b), min(len(earlier), len(prompt)))
        again, new = tokens(len(prompt) - kept), tokens(len(prompt) - len(earlier))
        loaded = len(names) > len(session[index - 1].get("tools", ()))
        if loaded:
            loads.append(again - new)
        print(f"| {index + 1}{' (loads ' + names[-1] + ')' if loaded else ''} | {len(names)} | "
              f"{tokens(len(prompt)):,} | {tokens(kept):,} | {again:,} | {new:,} | {again - new:,} |")
    print(f"\nper deferred-tool load, tokens evaluated a second time: {', '.join(f'{n:,}' for n in loads)}")
    print(f"first request, tools deferred: {tokens(len(prompts[0])):,} tokens, {len(session[0]['tools'])} tools; "
          f"ENABLE_TOOL_SEARCH=false: {tokens(len(qwen_prompt(inline))):,} tokens, {len(inline['tools'])} tools")


if __name__ == "__main__":
    main()
