"""Fuzzing: bad input never gets a 5xx, a traceback, or a dead server; broken Ollama replies
are the upstream's failure, never the proxy's.
"""

import http.client
import http.server
import json
import socket

import pytest

import simple_api_proxy as proxy

from standins.ollama import chunk, final_chunk, MODEL, ollama_wire, RawOllama, StandInOllama
from standins.proxy import (
    assert_threads_freed, assert_valid_stream, BASH_CALL, parse_sse, raw_exchange, request_body,
    running_proxy, text_calls, TOOLS, translate,
)
from standins.support import need


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # the fuzz tests below skip (fail under CI) without it
    given = None


FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(HealthCheck) if given else ())


class FuzzClient:
    """One keep-alive connection to the proxy, reopened whenever the proxy closes it."""

    def __init__(self, port):
        self.port = port
        self.connection = None
        self.answers = 0

    def send(self, method, path, body, headers):
        for attempt in range(2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                self.connection.request(method, path, body=body, headers=headers)
                response = self.connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException):
                self.connection.close()
                self.connection = None
                if attempt:
                    raise
                continue
            if response.will_close:
                self.connection.close()
                self.connection = None
            self.answers += 1
            return response.status, data
        raise AssertionError("unreachable")


def check_answer(status, data, method="POST"):
    assert status < 500, data[:300]
    assert b"Traceback" not in data and b'File "' not in data
    if status >= 400 and method != "HEAD":
        body = json.loads(data)
        assert body["type"] == "error" and body["error"]["type"] and body["request_id"].startswith("req_")


@pytest.fixture(scope="module")
def fuzz_target():
    if given is None:
        need(False, "hypothesis is not installed (pip install hypothesis)")
    stand_in = StandInOllama()
    with running_proxy(stand_in.url, OLLAMA_NUM_CTX=4000, CLIENT_TIMEOUT=5) as gateway:
        yield gateway, FuzzClient(gateway.port)
    stand_in.stop()


if given:
    json_leaf = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                 | st.text(max_size=30))
    json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                              | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=10)
    any_or = lambda strategy: strategy | json_value  # noqa: E731 - a sometimes-wrong value of any type
    block = st.fixed_dictionaries(
        {"type": any_or(st.sampled_from(["text", "image", "tool_use", "tool_result", "document", "thinking",
                                         "redacted_thinking", "server_tool_use", "search_result", "tool_reference"]))},
        optional={"text": any_or(st.text(max_size=40)), "id": any_or(st.text(max_size=10)),
                  "name": any_or(st.sampled_from(["Bash", "Read"])), "input": json_value,
                  "tool_use_id": any_or(st.text(max_size=10)), "content": json_value | st.text(max_size=20),
                  "is_error": json_value, "thinking": json_value, "title": json_value,
                  "source": any_or(st.fixed_dictionaries({"type": any_or(st.sampled_from(
                      ["base64", "text", "content", "url", "file"])), "data": any_or(st.text(max_size=20)),
                      "media_type": json_value, "content": json_value})),
                  "cache_control": json_value})
    message = st.fixed_dictionaries({"role": any_or(st.sampled_from(["user", "assistant", "system"])),
                                     "content": any_or(st.text(max_size=40) | st.lists(block, max_size=4))})
    tool = st.fixed_dictionaries({"name": any_or(st.sampled_from(["Bash", "Read"]))},
                                 optional={"input_schema": any_or(st.just({"type": "object"})),
                                           "type": any_or(st.sampled_from(["custom", "bash_20250124"])),
                                           "description": json_value, "defer_loading": json_value})
    request = st.fixed_dictionaries(
        {"model": any_or(st.sampled_from(["claude-opus-5-5", MODEL, "qwen3:8b", "absent:1b"])),
         "max_tokens": any_or(st.integers(0, 5000)), "messages": any_or(st.lists(message, max_size=4))},
        optional={"system": any_or(st.text(max_size=30) | st.lists(block, max_size=3)),
                  "stream": any_or(st.booleans()), "tools": any_or(st.lists(tool, max_size=3)),
                  "tool_choice": any_or(st.fixed_dictionaries({"type": any_or(st.sampled_from(
                      ["auto", "any", "tool", "none"]))}, optional={"name": json_value})),
                  "temperature": any_or(st.floats(0, 1)), "top_p": json_value, "top_k": json_value,
                  "stop_sequences": any_or(st.lists(st.text(max_size=5), max_size=3)),
                  "thinking": any_or(st.fixed_dictionaries({"type": any_or(st.sampled_from(
                      ["enabled", "adaptive", "disabled"]))}, optional={"budget_tokens": json_value,
                                                                         "display": json_value})),
                  "output_config": any_or(st.fixed_dictionaries({}, optional={"effort": json_value,
                                                                              "format": json_value})),
                  "metadata": json_value, "context_management": json_value, "unknown": json_value})
    nested = st.integers(1, 3000).map(lambda depth: '{"model":' + "[" * depth + "]" * depth + "}")

    @settings(max_examples=800, **FUZZ_SETTINGS)  # with the others, about 2,100 examples: the suite stays under 5 min
    @given(body=request, path=st.sampled_from(["/v1/messages", "/v1/messages?beta=true",
                                                "/v1/messages/count_tokens"]))
    def test_fuzz_request_fields(fuzz_target, body, path):
        gateway, client = fuzz_target
        check_answer(*client.send("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"}))

    @settings(max_examples=300, **FUZZ_SETTINGS)
    @given(raw=st.binary(max_size=300) | nested.map(str.encode)
           | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
    def test_fuzz_raw_bodies(fuzz_target, raw):
        gateway, client = fuzz_target
        check_answer(*client.send("POST", "/v1/messages", raw, {"Content-Type": "application/json"}))

    header_value = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)

    @settings(max_examples=300, **FUZZ_SETTINGS)
    @given(method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "BREW"])
           | st.text(st.characters(min_codepoint=65, max_codepoint=90), min_size=1, max_size=8),
           path=st.sampled_from(["/", "/health", "/v1/models", "/v1/models/x%2Fy", "/v1/messages", "/%00",
                                 "/v1/models?limit=abc", "/v1/models?limit=0", "/" + "a" * 3000]),
           headers=st.dictionaries(st.sampled_from(["Cache-Control", "x-api-key", "Authorization", "Accept",
                                                    "anthropic-beta", "X-Odd"]), header_value, max_size=4))
    def test_fuzz_methods_paths_and_headers(fuzz_target, method, path, headers):
        gateway, client = fuzz_target
        body = json.dumps(request_body()).encode() if method == "POST" else None
        check_answer(*client.send(method, path, body, dict(headers, **{"Content-Type": "application/json"})), method)

    @settings(max_examples=100, **FUZZ_SETTINGS)
    @given(line=st.binary(min_size=1, max_size=200))
    def test_fuzz_raw_request_lines(fuzz_target, line):
        gateway, client = fuzz_target
        answer = raw_exchange(gateway.port, line.replace(b"\n", b" ") + b"\r\nHost: 127.0.0.1\r\n\r\n", read_timeout=10)
        if answer:
            assert answer.startswith(b"HTTP/1.1 "), answer[:100]
            head, _, body = answer.partition(b"\r\n\r\n")
            check_answer(int(head.split(b" ", 2)[1]), body, "HEAD" if not body else "POST")

    written_fragment = st.sampled_from(
        list(proxy.TAGGED_OPENERS) + ["```", "```json", "```bash", "\n", " ", "\t", "{", "}", "[", "]", ":", ",",
                                      '"name"', '"arguments"', '"args"', '"type"', '"function"', '"id"',
                                      '"tool_calls"', '"object"', '"Bash"', '"Other"', "'name'", "'Bash'", "Bash",
                                      "Other", "<parameter=command>", "</parameter>", "</function>", "</tool_call>",
                                      '<invoke name="Bash">', '<parameter name="command">', "</invoke>",
                                      "</function_calls>", "call:Bash{", 'command:<|"|>ls<|"|>', "[ARGS]", "<",
                                      "<|", "[TOOL", "<func", "<|python_end|>", "<|eot_id|>", "<tool_call|>",
                                      "ls -la", "Sure, I will", "for example", "\\", '{"command": "ls"}',
                                      BASH_CALL, "<function=Bash>\n<parameter=command>\nls\n</parameter>\n</function>"])

    @settings(max_examples=400, **FUZZ_SETTINGS)
    @given(parts=st.lists(written_fragment, max_size=14), cuts=st.lists(st.integers(1, 9), min_size=1, max_size=5))
    def test_fuzz_text_written_calls_stream_as_they_parse(parts, cuts):
        """Whatever a model writes and however it arrives, the stream ends as the parser decides."""
        text = "".join(parts)
        parsed = text_calls(text, TOOLS)
        pieces, at = [], 0
        while at < len(text):
            size = cuts[len(pieces) % len(cuts)]
            pieces.append(text[at:at + size])
            at += size
        events, translator = translate([chunk(content=piece) for piece in pieces] + [final_chunk()],
                                       tool_names=TOOLS)
        assert_valid_stream(events)
        message = translator.message
        written = "".join(block["text"] for block in message["content"] if block["type"] == "text")
        calls = [{"name": block["name"], "input": block["input"]} for block in message["content"]
                 if block["type"] == "tool_use"]
        if parsed:
            assert (written.strip(), calls) == parsed
        else:
            assert (written, calls) == (text, [])

    def responses_in(data):
        """The responses in what the proxy sent, interim 100s left out: [(status, body)]."""
        found = []
        while data.startswith(b"HTTP/1.1 "):
            head, sep, rest = data.partition(b"\r\n\r\n")
            assert sep, data[:200]
            status = int(head.split(b" ", 2)[1])
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if status != 100:
                found.append((status, rest[:length]))
            data = rest[length:]
        assert data == b"", data[:200]
        return found

    size_forms = {"hex": b"%x", "upper": b"%X", "leading zeros": b"000%x", "minus": b"-%x", "plus": b"+%x",
                  "0x": b"0x%x", "underscore": b"%x_", "space before": b" %x", "too big": b"%x0",
                  "empty": b""}
    framing_headers = [b"Transfer-Encoding: chunked", b"Transfer-Encoding: Chunked", b"Transfer-Encoding: xchunkedx",
                       b"Transfer-Encoding: gzip, chunked", b"Transfer-Encoding: chunked, chunked",
                       b"Transfer-Encoding: chunked,", b"Transfer-Encoding :chunked", b"Content-Length: @",
                       b"Content-Length: @+1", b"Content-Length: @, @", b"Content-Length: -1", b"Content-Length: 1e3",
                       b"Content-Length:  @ ", b"Expect: 100-continue", b"Host: evil.example", b"Host: localhost",
                       b"Connection: close", b" folded", b"X-A: a\x00b", b"Origin: null", b"Origin: http://localhost:3"]

    @settings(max_examples=120, **FUZZ_SETTINGS)
    @given(method=st.sampled_from([b"POST", b"GET"]), chunked=st.booleans(),
           cuts=st.lists(st.integers(1, 120), max_size=3), data=st.data(),
           headers=st.lists(st.sampled_from(framing_headers), max_size=4))
    def test_fuzz_raw_request_framing(fuzz_target, method, chunked, cuts, data, headers):
        gateway, client = fuzz_target
        body = json.dumps(request_body()).encode()
        if chunked:
            pieces, start = [], 0
            for cut in sorted(set(cuts)) + [len(body)]:
                if cut > start:
                    pieces.append(body[start:cut])
                    start = cut
            framed = b""
            for piece in pieces:
                form = data.draw(st.sampled_from(sorted(size_forms)))
                extension = data.draw(st.sampled_from([b"", b";a=b", b';n="q \\" v"', b";x=" + b"v" * 2000,
                                                       b"; bad ext", b";=", b";\x00"]))
                ending = data.draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"", b"XX"]))
                size = size_forms[form] % len(piece) if b"%" in size_forms[form] else b""
                framed += size + extension + b"\r\n" + piece + ending
            body = framed + data.draw(st.sampled_from([b"0\r\n\r\n", b"0\r\nTrailer: x\r\n\r\n", b"0\r\n", b"",
                                                       b"0;e=1\r\n\r\n"]))
        lines = [line.replace(b"@+1", b"%d" % (len(body) + 1)).replace(b"@", b"%d" % len(body)) for line in headers]
        if not any(line.lower().startswith((b"content-length", b"transfer-encoding")) for line in lines):
            body = b""  # unframed, it would only be a malformed next request
        head = b"%s /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % (method, b"".join(l + b"\r\n" for l in lines))
        follow = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as connection:
            connection.sendall(head + body + follow)
            connection.shutdown(socket.SHUT_WR)
            received = b""
            while True:
                part = connection.recv(65536)
                if not part:
                    break
                received += part
        answers = responses_in(received)
        # One answer, or two when the request after it was still found; a framing fault ends the connection.
        assert 1 <= len(answers) <= 2, received[:500]
        for status, answer in answers:
            assert status < 500 or status == 501, answer[:300]
            check_answer(min(status, 499), answer, method.decode())

    def test_fuzzed_server_still_serves(fuzz_target):
        gateway, client = fuzz_target
        assert gateway.json("GET", "/")[0] == 200
        status, _, message = gateway.messages(request_body())
        assert status == 200 and message["content"][0]["text"] == "Hello! I am the stand-in model."
        assert_threads_freed(gateway)


def fault_wire(status, framing, fault, lines, stray):
    """A reply to /api/chat broken on purpose in one way (or none)."""
    body = b"".join(lines)
    head = b"HTTP/1.1 %d X\r\nContent-Type: application/x-ndjson\r\n" % status
    if framing == "chunked":
        chunks = [b"%x\r\n%s\r\n" % (len(line), line) for line in lines]
        if chunks and fault == "size off by one":
            chunks[0] = b"%x\r\n%s\r\n" % (len(lines[0]) + 1, lines[0])
        elif chunks and fault == "size as -1, +5 or 0x5":
            chunks[0] = b"-1\r\n" + chunks[0].split(b"\r\n", 1)[1]
        elif chunks and fault == "chunk extension":
            chunks[0] = chunks[0].replace(b"\r\n", b";ext=1\r\n", 1)
        elif chunks and fault == "no CRLF after the data":
            chunks[0] = chunks[0][:-2] + b"XX"
        end = b"" if fault == "no last chunk" else b"0\r\n\r\n"
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(chunks) + end + stray
    if framing == "length":
        length = {"length too long": b"%d" % (len(body) + 5), "length too short": b"%d" % max(0, len(body) - 5),
                  "length not a number": b"12abc"}.get(fault, b"%d" % len(body))
        return head + b"Content-Length: " + length + b"\r\n\r\n" + body + stray
    return head + b"\r\n" + body  # framed by the close


@pytest.fixture(scope="module")
def upstream_fuzz_target():
    if given is None:
        need(False, "hypothesis is not installed (pip install hypothesis)")
    stand_in = RawOllama()
    with running_proxy(stand_in.url, OLLAMA_TIMEOUT=2, OLLAMA_FIRST_TOKEN_TIMEOUT=2) as gateway:
        yield gateway, stand_in
    stand_in.stop()


if given:
    token_line = st.text(max_size=8).map(lambda text: json.dumps(chunk(content=text)).encode() + b"\n")
    deep_line = st.integers(150, 3000).map(lambda depth: (
        '{"message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"Bash","arguments":'
        + '{"a":' * depth + "1" + "}" * depth + "}}]},\"done\":false}\n").encode())
    garbage_line = st.binary(max_size=30).map(lambda raw: raw.replace(b"\n", b"") + b"\n")
    final_line = json.dumps(final_chunk()).encode() + b"\n"
    reply_lines = st.tuples(st.lists(st.one_of(token_line, token_line, deep_line, garbage_line), max_size=4),
                            st.booleans()).map(lambda drawn: drawn[0] + [final_line] * drawn[1])
    framing_fault = st.sampled_from([None, None, "size off by one", "size as -1, +5 or 0x5", "chunk extension",
                                     "no CRLF after the data", "no last chunk", "length too long",
                                     "length too short", "length not a number"])
    stray_bytes = st.sampled_from([b"", b"", b"\r\n", b"HTTP/1.1 200 OK\r\n",
                                   ollama_wire([chunk(content="STRAY"), final_chunk()])])

    @settings(max_examples=40, **FUZZ_SETTINGS)
    @given(status=st.sampled_from([200, 200, 200, 200, 301, 302, 307]),
           framing=st.sampled_from(["chunked", "chunked", "length", "close"]), fault=framing_fault,
           lines=reply_lines, stray=stray_bytes, stream=st.booleans(), keep=st.booleans())
    def test_fuzz_upstream_replies(upstream_fuzz_target, status, framing, fault, lines, stray, stream, keep):
        """Whatever Ollama sends, the client gets a 200 message, a 502/504 or an error event: never a
        500, never a 4xx blaming its request; and the next request is answered right, on a clean connection."""
        gateway, ollama = upstream_fuzz_target
        ollama.script((fault_wire(status, framing, fault, lines, stray), None if keep else "close"))
        tools = [{"name": "Bash", "input_schema": {"type": "object"}}]
        answer, _, raw = gateway.call("POST", "/v1/messages", request_body(tools=tools, stream=stream))
        assert b"Traceback" not in raw
        if answer == 200 and stream:
            events = parse_sse(raw)
            assert events[-1][0] in ("message_stop", "error"), events[-1]
            if events[-1][0] == "error":
                assert events[-1][1]["error"]["type"] in ("api_error", "timeout_error"), events[-1]
        elif answer == 200:
            assert json.loads(raw)["type"] == "message"
        else:
            assert answer in (502, 504), raw[:300]
            assert json.loads(raw)["error"]["type"] in ("api_error", "timeout_error")
        status, _, message = gateway.messages(request_body())
        assert status == 200 and message["content"][0]["text"] == "Hello! I am the stand-in model.", message
