#!/bin/sh
# Claude Code stand-in for the runs where only the launcher matters: records its pid, then waits.
echo $$ > "$STUB_CLAUDE_PIDFILE"
exec sleep "${STUB_CLAUDE_SLEEP:-0}"
