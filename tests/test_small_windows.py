"""Small context windows with the real Claude Code CLI (CLAUDE_CODE_BIN, 2.1.332): for OLLAMA_NUM_CTX
of 8192, 12288 and 16384, Claude Code runs with the environment and the arguments the launcher
(claude_start.py) derives for that window, through a proxy with that window in front of the
stand-in Ollama: to a finished tool loop and one compaction (`/compact` in a `--continue`
session) with a turn after it, and through a session that grows past the window.

What 2.1.332 sent, as the proxy estimates it (estimate_tokens), at all three windows: the launcher
chose the lean tool set (Bash, Edit, Read, Write), the first request was about 4,400 tokens, the
one with the tool result about 4,420, the summarization request about 6,240 (its instructions add
about 1,800) and the first request after the compaction about 4,840."""

import itertools
import os
import subprocess

import pytest

import claude_start
import simple_api_proxy as proxy

from standins.ollama import text_reply, tool_reply
from standins.proxy import running_proxy
from standins.support import claude_code_binary

# Claude Code's own words: the start of its summarization prompt, and of the first message of the
# session that continues from the summary.
SUMMARY_REQUEST = "Your task is to create a detailed summary of the conversation so far"
CONTINUED = "This session is being continued from a previous conversation"
SUMMARY = "The user asked to run echo small-window; it printed small-window."


def small_window_model(request):
    """The stand-in's answers: Bash for the first prompt, the command's output once it comes back,
    a summary when asked for one, and a plain answer for any later turn."""
    last = request["messages"][-1]
    if last["role"] == "user" and SUMMARY_REQUEST in last["content"]:
        return text_reply(f"<analysis>One command ran.</analysis>\n<summary>{SUMMARY}</summary>")
    if last["role"] == "tool":
        return text_reply(f"The command printed: {last['content'].strip()}")
    if any(message["role"] == "assistant" for message in request["messages"]):
        return text_reply("Answered after the compaction.")
    return tool_reply(("Bash", {"command": "echo small-window", "description": "Print a word"}))


@pytest.fixture
def launched_claude_code(ollama, tmp_path):
    """run(window, *claude_args): Claude Code as the launcher starts it for OLLAMA_NUM_CTX=window
    (its Settings and ClaudeRun make the environment and the command line), through a proxy with
    that window; returns the finished process and the launcher's Settings."""
    binary = claude_code_binary()
    workdir, home = tmp_path / "work", tmp_path / "home"
    workdir.mkdir()
    home.mkdir()

    def run(window, *claude_args):
        arguments = claude_start.parse_args(["--local", "--", "-p", *claude_args])
        arguments.check_modes()
        settings = claude_start.Settings(arguments, {"OLLAMA_NUM_CTX": str(window), "HOME": str(home)})
        with running_proxy(ollama.url, OLLAMA_NUM_CTX=window) as gateway:
            claude = claude_start.ClaudeRun(settings, gateway.port, "dummy")
            env = claude.environment({"PATH": os.environ["PATH"], "HOME": str(home), "TERM": "dumb"})
            argv = claude.argv()
            assert argv[0] == "claude"
            result = subprocess.run([binary, *argv[1:]], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                    capture_output=True, text=True, timeout=90)
        return result, settings

    return run


@pytest.mark.parametrize("window", [8192, 12288, 16384])
def test_claude_code_at_a_small_window_finishes_a_tool_loop_and_a_compaction(launched_claude_code, ollama,
                                                                             window):
    ollama.responder = small_window_model
    result, settings = launched_claude_code(window, "run the command", "--allowedTools", "Bash")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The command printed: small-window"
    # Below the window the full prompt needs, the launcher leaves tools out by itself and says so.
    assert settings.lean and "a window of %d tokens" % window in settings.lean_notice()
    assert settings.max_output_tokens <= window // 4
    loop = ollama.chats()
    tool_message = loop[-1]["messages"][-1]
    assert len(loop) == 2 and tool_message["role"] == "tool" and tool_message["tool_name"] == "Bash"
    assert tool_message["content"].strip() == "small-window"
    offered = {tool["function"]["name"] for tool in loop[0]["tools"]}
    assert "Bash" in offered and not offered & set(claude_start.LEAN_LEFT_OUT)
    # The whole answer the launcher allows fits beside the first prompt: nothing was cut short.
    assert loop[0]["options"] == {"num_ctx": window, "num_predict": settings.max_output_tokens}
    assert proxy.estimate_tokens(loop[0]) + settings.max_output_tokens <= window

    result, _ = launched_claude_code(window, "/compact", "--continue")
    assert result.returncode == 0, result.stderr
    summarize = ollama.chats()[len(loop):]
    assert len(summarize) == 1 and SUMMARY_REQUEST in summarize[0]["messages"][-1]["content"]
    assert any(message.get("content", "").strip() == "small-window" for message in summarize[0]["messages"])
    assert proxy.estimate_tokens(summarize[0]) + summarize[0]["options"]["num_predict"] <= window

    result, _ = launched_claude_code(window, "what next?", "--continue")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Answered after the compaction."
    after = ollama.chats()[len(loop) + 1:]
    assert len(after) == 1
    continued = after[0]["messages"][1]  # after the system prompt
    assert continued["role"] == "user" and continued["content"].startswith(CONTINUED)
    assert SUMMARY in continued["content"]
    assert not any(message["role"] == "tool" for message in after[0]["messages"])  # the summary replaced them
    assert proxy.estimate_tokens(after[0]) < proxy.estimate_tokens(summarize[0])


def listing_session(steps):
    """The stand-in's answers for a longer session: `steps` Bash calls, each printing 30 lines
    (about 280 tokens), a summary whenever Claude Code asks for one, then a final answer."""
    calls = itertools.count()

    def reply(request):
        last = request["messages"][-1]
        if last["role"] == "user" and SUMMARY_REQUEST in last["content"]:
            return text_reply("<summary>The user asked for listings; several were printed.</summary>")
        step = next(calls)
        if step >= steps:
            return text_reply("All listings printed.")
        command = f"seq -f 'line %g of the listing' {step * 100} {step * 100 + 29}"
        return tool_reply(("Bash", {"command": command, "description": "Print a listing"}))

    return reply


@pytest.mark.parametrize("window,compactions", [(8192, 1), (12288, 0), (16384, 0)])
def test_claude_code_at_a_small_window_compacts_as_a_session_grows_and_finishes_it(launched_claude_code, ollama,
                                                                                 window, compactions):
    """Told the bare window, Claude Code 2.1.332's compaction point (window less output less its
    13,000-token summary buffer) is below zero at these windows: it compacted before every
    request after the first tool result and ended the session after three ("Autocompact is
    thrashing"). As the launcher tells it now, it compacts when the proxy says the prompt is too
    long, and goes on."""
    ollama.responder = listing_session(12)
    result, settings = launched_claude_code(window, "print the listings", "--allowedTools", "Bash")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "All listings printed."
    chats = ollama.chats()
    summaries = [chat for chat in chats if SUMMARY_REQUEST in str(chat["messages"][-1].get("content"))]
    assert len(summaries) == compactions
    assert len(chats) == 13 + compactions  # every listing, the answer, and each summary once
    assert all(proxy.estimate_tokens(chat) + chat["options"]["num_predict"] <= window for chat in chats)
