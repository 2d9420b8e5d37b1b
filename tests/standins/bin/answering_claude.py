#!/usr/bin/env python3
# Stand-in Claude Code that asks one question through ANTHROPIC_BASE_URL, as Claude Code does, and
# prints the answer's text. With STUB_CLAUDE_WAIT_LOG and STUB_CLAUDE_WAIT_TEXT it then stays until that
# file holds that text STUB_CLAUDE_WAIT_COUNT times (a session the user only reads).
import json, os, sys, time, urllib.request
token = os.environ.get("ANTHROPIC_AUTH_TOKEN", "")
body = {"model": os.environ["ANTHROPIC_MODEL"], "max_tokens": 64, "messages": [{"role": "user", "content": "hello"}]}
request = urllib.request.Request(os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json", "anthropic-version": "2023-06-01",
                                          "authorization": "Bearer " + token})
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
answer = json.load(opener.open(request, timeout=60))
print("".join(block.get("text", "") for block in answer["content"]), flush=True)
log = os.environ.get("STUB_CLAUDE_WAIT_LOG")
if log:
    deadline = time.monotonic() + 60
    while True:
        try:
            seen = open(log).read().count(os.environ["STUB_CLAUDE_WAIT_TEXT"])
        except OSError:
            seen = 0
        if seen >= int(os.environ.get("STUB_CLAUDE_WAIT_COUNT", "1")):
            break
        if time.monotonic() > deadline:
            sys.exit("stand-in claude: gave up waiting for %s" % log)
        time.sleep(0.1)
