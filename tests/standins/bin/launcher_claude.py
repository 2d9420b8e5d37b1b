#!/usr/bin/env python3
# Stand-in for Claude Code: records argv, the variables the launcher exports, and
# what /health answers through ANTHROPIC_BASE_URL while it runs.
import json, os, sys, time, urllib.error, urllib.request
names = sorted(k for k in os.environ
               if k.startswith(("ANTHROPIC_", "CLAUDE_CODE_"))
               or k in ("API_TIMEOUT_MS", "DISABLE_TELEMETRY", "BASH_MAX_OUTPUT_LENGTH", "MAX_MCP_OUTPUT_TOKENS"))
record = {"argv": sys.argv[1:], "env": {k: os.environ[k] for k in names}}
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    record["health"] = opener.open(os.environ["ANTHROPIC_BASE_URL"] + "/health", timeout=5).getcode()
except urllib.error.HTTPError as e:
    record["health"] = e.code
except Exception as e:
    record["health"] = repr(e)
with open(os.environ["STUB_CLAUDE_OUT"], "w") as f:
    json.dump(record, f)
time.sleep(float(os.environ.get("STUB_CLAUDE_SLEEP", "0")))
sys.exit(int(os.environ.get("STUB_CLAUDE_EXIT", "0")))
