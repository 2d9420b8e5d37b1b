#!/bin/sh
# claude_start.sh - start Claude Code against simple_api_proxy.py (see --help).
# The launcher is claude_start.py beside this file (python3 >= 3.8, standard library only, so
# run with -S, and imported, so that its compiled form is cached); this entry point finds a
# python3, on Linux and macOS, and hands over to it.

# Where this script really lives (following symlinks, e.g. from ~/bin).
src=$0
while [ -L "$src" ]; do
    link=$(readlink "$src")
    case $link in
        /*) src=$link ;;
        *) case $src in */*) src=${src%/*}/$link ;; *) src=$link ;; esac ;;
    esac
done
case $src in */*) here=${src%/*} ;; *) here=. ;; esac

# python3 checks its own version first thing, and hands over to a newer python3.X if it is too old.
for python in python3 python3.14 python3.13 python3.12 python3.11 python3.10 python3.9 python3.8; do
    if command -v "$python" >/dev/null 2>&1; then
        CLAUDE_START_COMMAND=$0
        export CLAUDE_START_COMMAND
        exec "$python" -S -c 'import sys; sys.path[0] = sys.argv.pop(1); import claude_start; sys.exit(claude_start.main())' "$here" "$@"
    fi
done
echo "claude_start: python3 (3.8 or newer) not found on PATH: install it (macOS: xcode-select --install, or brew install python3; Debian/Ubuntu: apt-get install python3), then run this again" >&2
exit 1
