"""Request bodies and request factories for the benchmark.

A factory is a callable returning the bytes of the next request. Fixed requests are encoded once;
"unique" ones carry a running number in the prompt, so that every one is a cache miss, and are built
by joining pre-encoded pieces around the number.

claude_code_request() is a ~47 KB Messages API request shaped like one Claude Code 2.1 sends:
system as three text blocks (the per-request billing header first), a role "system" message,
12 tools with JSON schemas carrying $schema and additionalProperties, metadata, adaptive thinking,
context_management and output_config, sent to /v1/messages?beta=true with Claude Code's headers.
"""

from __future__ import annotations

import itertools
import json

from load import http_request

CLIENT_MODEL = "claude-opus-5-5"
NUMBER = "@@N@@"  # where a unique request's running number goes
# One sequence for every factory: the cache key ignores "stream" and the path, so two factories
# counting from 1 each would send the same prompts and turn misses into hits.
RUNNING_NUMBERS = itertools.count(1)
JSON_HEADERS = (("Content-Type", "application/json"), ("anthropic-version", "2023-06-01"),
                ("x-api-key", "bench"))
CLAUDE_CODE_HEADERS = (
    ("Accept", "application/json"),
    ("X-Stainless-Retry-Count", "0"),
    ("X-Stainless-Timeout", "600"),
    ("X-Stainless-Lang", "js"),
    ("X-Stainless-Package-Version", "0.70.0"),
    ("X-Stainless-OS", "Linux"),
    ("X-Stainless-Arch", "x64"),
    ("X-Stainless-Runtime", "node"),
    ("X-Stainless-Runtime-Version", "v22.19.0"),
    ("anthropic-dangerous-direct-browser-access", "true"),
    ("anthropic-version", "2023-06-01"),
    ("x-api-key", "bench"),
    ("x-app", "cli"),
    ("User-Agent", "claude-cli/2.1.332 (external, cli)"),
    ("Content-Type", "application/json"),
    ("anthropic-beta", "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27"),
    ("accept-language", "*"),
    ("sec-fetch-mode", "cors"),
    ("accept-encoding", "gzip, deflate"),
)


def messages_request(prompt, *, stream, max_tokens=100):
    """A small Anthropic Messages API request."""
    return {"model": CLIENT_MODEL, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": prompt}]}


def ollama_chat_request(prompt, *, stream):
    """What a client talking to Ollama directly would send for the same prompt."""
    return {"model": "qwen2.5-coder:7b", "stream": stream, "options": {"num_predict": 100},
            "messages": [{"role": "user", "content": prompt}]}


def request_factory(method, path, host_header, body, headers=JSON_HEADERS, *, unique=False):
    """() -> request bytes. With unique, every NUMBER in the JSON body becomes the next running number."""
    encoded = json.dumps(body, separators=(",", ":")).encode()
    if not unique:
        request = http_request(method, path, host_header, encoded, headers)
        return lambda: request
    pieces = encoded.split(NUMBER.encode())
    if len(pieces) < 2:
        raise ValueError(f"a unique request body needs {NUMBER} in it")

    def next_request():
        number = next(RUNNING_NUMBERS)
        return http_request(method, path, host_header, (b"%05x" % number).join(pieces), headers)
    return next_request


# --- a Claude Code-shaped request -------------------------------------------------

# Prose to fill descriptions and prompts with text of Claude Code's flavour, cut to each length.
PROSE = (
    "Use this tool when the task needs it, and prefer the dedicated tool over a shell command when one exists. "
    "Always read a file before editing it, keep edits minimal and match the surrounding style exactly. "
    "Paths must be absolute; never guess a path, search for it first with Glob or Grep. "
    "When several independent calls are needed, make them in parallel in a single message. "
    "Report failures plainly, with the command and its output, and do not retry blindly. "
)


def prose(length):
    return (PROSE * (length // len(PROSE) + 1))[:length].rstrip() + "."


def tool(name, description_length, properties, required):
    return {
        "name": name,
        "description": prose(description_length),
        "input_schema": {
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": False,
            "$schema": "http://json-schema.org/draft-07/schema#",
        },
    }


def string(description):
    return {"type": "string", "description": description}


def claude_code_tools():
    """12 tools, described at about the length Claude Code describes its own."""
    return [
        tool("Task", 2600, {"description": string("A short (3-5 word) description of the task"),
                            "prompt": string("The task for the agent to perform"),
                            "subagent_type": string("The type of specialized agent to use")},
             ["description", "prompt", "subagent_type"]),
        tool("Bash", 4200, {"command": string("The command to execute"),
                            "timeout": {"type": "number", "description": "Optional timeout in milliseconds"},
                            "description": string("Clear, concise description of what this command does"),
                            "run_in_background": {"type": "boolean", "description": "Run in the background"}},
             ["command"]),
        tool("Glob", 700, {"pattern": string("The glob pattern to match files against"),
                           "path": string("The directory to search in")}, ["pattern"]),
        tool("Grep", 1700, {"pattern": string("The regular expression pattern to search for"),
                            "path": string("File or directory to search in"),
                            "glob": string("Glob pattern to filter files"),
                            "output_mode": {"type": "string", "enum": ["content", "files_with_matches", "count"]},
                            "-n": {"type": "boolean", "description": "Show line numbers"},
                            "head_limit": {"type": "number", "description": "Limit output to the first N lines"}},
             ["pattern"]),
        tool("Read", 1500, {"file_path": string("The absolute path to the file to read"),
                            "offset": {"type": "number", "description": "The line number to start reading from"},
                            "limit": {"type": "number", "description": "The number of lines to read"}},
             ["file_path"]),
        tool("Edit", 1100, {"file_path": string("The absolute path to the file to modify"),
                            "old_string": string("The text to replace"),
                            "new_string": string("The text to replace it with"),
                            "replace_all": {"type": "boolean", "default": False,
                                            "description": "Replace all occurences of old_string"}},
             ["file_path", "old_string", "new_string"]),
        tool("Write", 800, {"file_path": string("The absolute path to the file to write"),
                            "content": string("The content to write to the file")}, ["file_path", "content"]),
        tool("NotebookEdit", 600, {"notebook_path": string("The absolute path to the Jupyter notebook"),
                                   "cell_id": string("The ID of the cell to edit"),
                                   "new_source": string("The new source for the cell"),
                                   "edit_mode": {"type": "string", "enum": ["replace", "insert", "delete"]}},
             ["notebook_path", "new_source"]),
        tool("WebFetch", 1200, {"url": {"type": "string", "format": "uri", "description": "The URL to fetch"},
                                "prompt": string("The prompt to run on the fetched content")}, ["url", "prompt"]),
        tool("TodoWrite", 5200, {"todos": {"type": "array", "description": "The updated todo list", "items": {
            "type": "object", "additionalProperties": False,
            "properties": {"content": {"type": "string", "minLength": 1},
                           "status": {"type": "string", "enum": ["pending", "in_progress", "completed"]},
                           "activeForm": {"type": "string", "minLength": 1}},
            "required": ["content", "status", "activeForm"]}}}, ["todos"]),
        tool("WebSearch", 900, {"query": {"type": "string", "minLength": 2, "description": "The search query"},
                                "allowed_domains": {"type": "array", "items": {"type": "string"}}}, ["query"]),
        tool("BashOutput", 400, {"bash_id": string("The ID of the background shell"),
                                 "filter": string("Optional regular expression to filter the output lines")},
             ["bash_id"]),
    ]


def claude_code_request(number_marker=NUMBER, system_prompt_length=11100):
    """The body, with number_marker in the billing header's cch and in the last user turn."""
    reminder = "<system-reminder>\n" + prose(1400) + "\n</system-reminder>"
    return {
        "model": CLIENT_MODEL,
        "max_tokens": 32000,
        "stream": True,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332; cc_entrypoint=cli; "
                                     f"cch={number_marker};"},
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
             "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": prose(system_prompt_length), "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [
            {"role": "system", "content": "As you answer the user's questions, you can use the following context:\n"
                                          + prose(1800)},
            {"role": "user", "content": [
                {"type": "text", "text": reminder},
                {"type": "text", "text": "Look at simple_api_proxy.py and tell me what the cache key covers.",
                 "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "I'll read the file first."},
                {"type": "tool_use", "id": "toolu_01BenchRead", "name": "Read",
                 "input": {"file_path": "/work/main/simple_api_proxy.py", "limit": 200}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01BenchRead", "content": prose(6000)},
                {"type": "text", "text": f"Now summarise it in one paragraph (turn {number_marker})."}]},
        ],
        "tools": claude_code_tools(),
        "metadata": {"user_id": "user_5f1c0b6f9e2a4d7c8b3e1a0f6d2c9b8e7a5f4d3c2b1a0e9f8d7c6b5a4e3d2c1b0_account_"
                                "_session_6b0f3c2e-4a1d-4e8b-9c7f-2d5e8a1b3c6f"},
        "thinking": {"type": "adaptive", "display": "omitted"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
    }
