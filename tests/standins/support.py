"""What every test file and bench/ script may need: where things are, need() (skip on a laptop
that lacks a real part, fail under CI), the optional modules, and waiting on a condition.
"""

import contextlib
import os
import shutil
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]
LAUNCHER_SCRIPT = ROOT / "claude_start.sh"
STANDIN_BIN = Path(__file__).resolve().parent / "bin"  # the stand-in programs, as files
IN_CI = os.environ.get("CI", "").lower() == "true"


def need(condition, reason):
    """Skip on a laptop that lacks a real part; under CI the part must be there."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must provide this: {reason}")
    pytest.skip(reason)


def anthropic_module():
    try:
        import anthropic
    except ImportError:
        need(False, "the anthropic SDK is not installed (pip install anthropic)")
    return anthropic


def redis_module():
    try:
        import redis
    except ImportError:
        need(False, "redis-py is not installed (pip install redis)")
    return redis


def wait_for(condition, what, timeout=15):
    """Poll a condition the proxy reaches by itself (a background check, a request arriving)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


CLAUDE_CODE_VERSION = "2.1.332"


def claude_code_binary():
    cached = Path.home() / f".cache/simple_api_proxy/claude-code-{CLAUDE_CODE_VERSION}/node_modules/.bin/claude"
    for candidate in (os.environ.get("CLAUDE_CODE_BIN"), str(cached), shutil.which("claude")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    need(False, f"Claude Code CLI not found: set CLAUDE_CODE_BIN, or run "
                f"npm install @anthropic-ai/claude-code@{CLAUDE_CODE_VERSION} (.ci/run does)")


def wait_until(predicate, timeout=10, what="a condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def pid_alive(pid):
    """True while pid runs (a zombie counts as gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def poll_until(predicate, timeout=5.0):
    """True once predicate holds, False if it still does not after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def process_command(pid):
    """A process's command line, its words joined by spaces; "" once it is gone."""
    with contextlib.suppress(OSError):
        return Path("/proc/%d/cmdline" % pid).read_bytes().replace(b"\0", b" ").decode()
    return ""


def descendants(pid):
    """Every process below pid, found through /proc (the launcher's tunnels run under their keepers)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                parent = int(Path("/proc/%s/stat" % entry).read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
