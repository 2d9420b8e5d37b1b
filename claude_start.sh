#!/usr/bin/env bash
# claude_start.sh - start Claude Code (the `claude` CLI) against simple_api_proxy.py.
#
# The proxy speaks the Anthropic Messages API and forwards to Ollama. This is the
# laptop side:
#   remote (default)  the proxy runs on a GPU box: check it over ssh, open an ssh
#                     tunnel 127.0.0.1:LOCAL -> box:127.0.0.1:REMOTE, run claude
#                     through it, and close that tunnel (and only it) on exit.
#   --local           the proxy runs on this machine: use the one that answers, or
#                     start simple_api_proxy.py and stop it again on exit.
#   --check           report each hop as ok/failed and exit.
# Settings: flag > environment > config file (KEY=VALUE lines) > default.
# Run `claude_start.sh --help` for every flag and variable.
#
# Written for bash 3.2 too (macOS laptops): no associative arrays, no ${x,,},
# and empty arrays are expanded as ${a[@]+"${a[@]}"} because of `set -u`.

set -euo pipefail

readonly PROG=claude_start
readonly DEFAULT_MODEL=qwen2.5-coder:7b
# Matches the proxy's default OLLAMA_NUM_CTX, so Claude Code compacts before
# Ollama silently truncates the prompt.
readonly DEFAULT_CONTEXT_TOKENS=32768
readonly DEFAULT_MAX_OUTPUT_TOKENS=8192
readonly DEFAULT_API_TIMEOUT_MS=600000
readonly DEFAULT_REMOTE_PORT=8000
readonly DEFAULT_LOCAL_PORT=8001
readonly DEFAULT_HEALTH_WAIT=30
# Placeholder token: Claude Code refuses to start without one; the proxy only
# checks it when PROXY_API_KEY is set on its side.
readonly DUMMY_AUTH_TOKEN=simple-api-proxy
readonly PORT_TRIES=20
readonly SSH_ALIVE_INTERVAL=30
readonly SSH_CONNECT_TIMEOUT=10
readonly CONFIG_KEYS=" CLAUDE_START_SSH CLAUDE_START_SSH_PORT CLAUDE_START_REMOTE_PORT \
CLAUDE_START_LOCAL_PORT CLAUDE_START_MODEL CLAUDE_START_CONTEXT_TOKENS \
CLAUDE_START_MAX_OUTPUT_TOKENS API_TIMEOUT_MS PROXY_API_KEY CLAUDE_START_PROXY_SCRIPT \
CLAUDE_START_HEALTH_WAIT "

# Health probe used both here and, as a fallback for curl, on the GPU box.
# It prints the HTTP status, or 000 when nothing answers. No single quotes in
# it: it travels inside a single-quoted word of the remote command.
# The empty ProxyHandler ignores http_proxy: these URLs are always loopback.
readonly PY_HEALTH='import sys, urllib.request, urllib.error
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    print(opener.open(sys.argv[1], timeout=float(sys.argv[2])).getcode())
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")'

# Filled by parse_args / resolve_settings.
MODE=remote
CHECK=0
OPT_SSH='' OPT_SSH_PORT='' OPT_REMOTE_PORT='' OPT_LOCAL_PORT='' OPT_MODEL='' OPT_CONFIG=''
CLAUDE_ARGS=()
SSH_HOST='' SSH_PORT='' REMOTE_PORT='' LOCAL_PORT='' MODEL='' CONTEXT_TOKENS=''
MAX_OUTPUT_TOKENS='' TIMEOUT_MS='' PROXY_SCRIPT='' HEALTH_WAIT='' CONFIG_FILE=''
# What this run started, so that the exit trap stops exactly that and nothing else.
TUNNEL_PID='' PROXY_PID=''
# Set by the step functions for their callers.
PORT='' HEALTH_CODE='' FAIL_REASON='' NOTE='' OLLAMA_WARNED=0

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
    say "$*"
    exit 1
}
usage_error() {
    say "$* (see --help)"
    exit 2
}
have() { command -v "$1" >/dev/null 2>&1; }

# last_line TEXT: the last non-empty line of TEXT (for quoting ssh's complaint).
last_line() {
    local line last=''
    while IFS= read -r line || [[ -n $line ]]; do
        [[ -n $line ]] && last=$line
    done <<<"$1"
    printf '%s' "$last"
}

usage() {
    cat <<EOF
Usage: claude_start.sh [--ssh USER@HOST] [--ssh-port P] [--remote-port 8000]
                       [--local-port 8001] [--model NAME] [--config FILE]
                       [--local] [--check] [-- CLAUDE_ARGS...]

Start Claude Code against simple_api_proxy.py (Anthropic Messages API -> Ollama).

Modes:
  (default)           remote: check the proxy on the GPU box over ssh, open
                      ssh -N -L LOCAL:127.0.0.1:REMOTE, wait for /health through
                      it, run claude, close that tunnel on exit
  --local             no ssh: use the proxy on 127.0.0.1:LOCAL, or start
                      simple_api_proxy.py in the background (stopped on exit)
  --check             print each hop (ssh reachable, remote proxy health, tunnel,
                      local health, claude on PATH) as ok/failed, then exit
                      (status 1 if any failed); combine with --local to check
                      the local setup

Options (each has a variable; flag > environment > config file > default):
  --ssh USER@HOST     CLAUDE_START_SSH            ssh destination (no default)
  --ssh-port P        CLAUDE_START_SSH_PORT       default: ~/.ssh/config, else 22
  --remote-port P     CLAUDE_START_REMOTE_PORT    proxy port on the GPU box (8000)
  --local-port P      CLAUDE_START_LOCAL_PORT     port on 127.0.0.1 here (8001);
                                                  the next free one is used if taken
  --model NAME        CLAUDE_START_MODEL          model for claude ($DEFAULT_MODEL)
  --config FILE       CLAUDE_START_CONFIG         settings file (default
                                                  ~/.config/simple_api_proxy/claude_start.env)
  -h, --help          show this help
  --                  everything after it is passed to claude

Variables (environment or config file):
  CLAUDE_START_CONTEXT_TOKENS     CLAUDE_CODE_MAX_CONTEXT_TOKENS ($DEFAULT_CONTEXT_TOKENS, the proxy's OLLAMA_NUM_CTX)
  CLAUDE_START_MAX_OUTPUT_TOKENS  CLAUDE_CODE_MAX_OUTPUT_TOKENS ($DEFAULT_MAX_OUTPUT_TOKENS)
  API_TIMEOUT_MS                  Claude Code request timeout in ms ($DEFAULT_API_TIMEOUT_MS)
  PROXY_API_KEY                   sent as ANTHROPIC_AUTH_TOKEN (default: a dummy token)
  CLAUDE_START_PROXY_SCRIPT       simple_api_proxy.py for --local (default: next to this script)
  CLAUDE_START_HEALTH_WAIT        seconds to wait for /health ($DEFAULT_HEALTH_WAIT)

The config file holds KEY=VALUE lines with the variable names above
(blank lines, # comments and a leading "export " are allowed).

Claude Code gets ANTHROPIC_BASE_URL=http://127.0.0.1:PORT, ANTHROPIC_AUTH_TOKEN,
ANTHROPIC_MODEL and ANTHROPIC_DEFAULT_{HAIKU,SONNET,OPUS}_MODEL (and
ANTHROPIC_SMALL_FAST_MODEL) = the model, CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1,
DISABLE_TELEMETRY=1, CLAUDE_CODE_ATTRIBUTION_HEADER=0, API_TIMEOUT_MS,
CLAUDE_CODE_MAX_CONTEXT_TOKENS and CLAUDE_CODE_MAX_OUTPUT_TOKENS, and runs as
  claude --model MODEL [CLAUDE_ARGS...]
Its exit status is returned.

Examples:
  claude_start.sh --ssh me@gpu-box
  claude_start.sh --ssh me@gpu-box --ssh-port 2222 -- --continue
  claude_start.sh --local --model qwen2.5-coder:14b
  claude_start.sh --check --ssh me@gpu-box
EOF
}

# ---------------------------------------------------------------- settings

parse_args() {
    local flag value
    while (($# > 0)); do
        flag=$1
        case $flag in
            --) shift
                CLAUDE_ARGS=("$@")
                return ;;
            -h | --help) usage
                exit 0 ;;
            --local) MODE=local ;;
            --check) CHECK=1 ;;
            --ssh | --ssh-port | --remote-port | --local-port | --model | --config | \
                --ssh=* | --ssh-port=* | --remote-port=* | --local-port=* | --model=* | --config=*)
                if [[ $flag == *=* ]]; then
                    value=${flag#*=}
                    flag=${flag%%=*}
                else
                    (($# >= 2)) || usage_error "$flag needs a value"
                    value=$2
                    shift
                fi
                [[ -n $value ]] || usage_error "$flag needs a non-empty value"
                case $flag in
                    --ssh) OPT_SSH=$value ;;
                    --ssh-port) OPT_SSH_PORT=$value ;;
                    --remote-port) OPT_REMOTE_PORT=$value ;;
                    --local-port) OPT_LOCAL_PORT=$value ;;
                    --model) OPT_MODEL=$value ;;
                    --config) OPT_CONFIG=$value ;;
                esac ;;
            *) usage_error "unknown option '$flag' (arguments for claude go after --)" ;;
        esac
        shift
    done
}

trim() {
    local s=$1
    s=${s#"${s%%[![:space:]]*}"}
    s=${s%"${s##*[![:space:]]}"}
    printf '%s' "$s"
}

# Reads KEY=VALUE lines without sourcing the file: a settings file must not be
# able to run commands, and only known keys may be set.
load_config_file() {
    local file=$1 line key value n=0
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        line=$(trim "${line%$'\r'}")
        [[ -z $line || $line == \#* ]] && continue
        [[ $line == "export "* ]] && line=$(trim "${line#export }")
        if [[ $line != *=* ]]; then
            say "warning: $file:$n: not a KEY=VALUE line, ignored"
            continue
        fi
        key=$(trim "${line%%=*}")
        value=$(trim "${line#*=}")
        if [[ $value == \"*\" || $value == \'*\' ]] && ((${#value} >= 2)); then
            value=${value:1:${#value}-2}
        fi
        if [[ $CONFIG_KEYS != *" $key "* ]]; then
            say "warning: $file:$n: unknown setting '$key', ignored"
            continue
        fi
        # The environment wins over the file.
        if [[ -z ${!key:-} ]]; then
            printf -v "$key" '%s' "$value"
        fi
    done <"$file"
}

# Where this script really lives (following symlinks, e.g. from ~/bin), so that
# the default proxy script is the simple_api_proxy.py shipped beside it.
script_dir() {
    local src=${BASH_SOURCE[0]} dir
    while [[ -L $src ]]; do
        case $src in */*) dir=${src%/*} ;; *) dir=. ;; esac
        src=$(readlink "$src")
        [[ $src == /* ]] || src=$dir/$src
    done
    case $src in */*) dir=${src%/*} ;; *) dir=. ;; esac
    (cd -P "$dir" && pwd)
}

require_uint() {
    local name=$1 value=$2 min=$3 max=${4:-}
    if [[ $value =~ ^[0-9]{1,9}$ ]] && ((10#$value >= min)) && { [[ -z $max ]] || ((10#$value <= max)); }; then
        return 0
    fi
    usage_error "$name must be a whole number >= $min${max:+ and <= $max}, got '$value'"
}

resolve_settings() {
    if [[ -n $OPT_CONFIG ]]; then
        CONFIG_FILE=$OPT_CONFIG
    elif [[ -n ${CLAUDE_START_CONFIG:-} ]]; then
        CONFIG_FILE=$CLAUDE_START_CONFIG
    elif [[ -n ${HOME:-} ]]; then
        CONFIG_FILE=$HOME/.config/simple_api_proxy/claude_start.env
    fi
    if [[ -n $CONFIG_FILE && -f $CONFIG_FILE ]]; then
        [[ -r $CONFIG_FILE ]] || die "config file $CONFIG_FILE is not readable: fix its permissions"
        load_config_file "$CONFIG_FILE"
    elif [[ -n $OPT_CONFIG || -n ${CLAUDE_START_CONFIG:-} ]]; then
        # Only an explicitly named file must exist; the default one is optional.
        die "config file $CONFIG_FILE not found: fix --config / CLAUDE_START_CONFIG"
    fi

    SSH_HOST=${OPT_SSH:-${CLAUDE_START_SSH:-}}
    # No default port: an explicit -p would override a Port in ~/.ssh/config.
    SSH_PORT=${OPT_SSH_PORT:-${CLAUDE_START_SSH_PORT:-}}
    REMOTE_PORT=${OPT_REMOTE_PORT:-${CLAUDE_START_REMOTE_PORT:-$DEFAULT_REMOTE_PORT}}
    LOCAL_PORT=${OPT_LOCAL_PORT:-${CLAUDE_START_LOCAL_PORT:-$DEFAULT_LOCAL_PORT}}
    MODEL=${OPT_MODEL:-${CLAUDE_START_MODEL:-$DEFAULT_MODEL}}
    CONTEXT_TOKENS=${CLAUDE_START_CONTEXT_TOKENS:-$DEFAULT_CONTEXT_TOKENS}
    MAX_OUTPUT_TOKENS=${CLAUDE_START_MAX_OUTPUT_TOKENS:-$DEFAULT_MAX_OUTPUT_TOKENS}
    TIMEOUT_MS=${API_TIMEOUT_MS:-$DEFAULT_API_TIMEOUT_MS}
    HEALTH_WAIT=${CLAUDE_START_HEALTH_WAIT:-$DEFAULT_HEALTH_WAIT}
    PROXY_SCRIPT=${CLAUDE_START_PROXY_SCRIPT:-}
    if [[ -z $PROXY_SCRIPT ]]; then
        PROXY_SCRIPT=$(script_dir)/simple_api_proxy.py
    fi

    [[ -z $SSH_PORT ]] || require_uint "ssh port" "$SSH_PORT" 1 65535
    require_uint "remote port" "$REMOTE_PORT" 1 65535
    require_uint "local port" "$LOCAL_PORT" 1 65535
    require_uint CLAUDE_START_CONTEXT_TOKENS "$CONTEXT_TOKENS" 1
    require_uint CLAUDE_START_MAX_OUTPUT_TOKENS "$MAX_OUTPUT_TOKENS" 1
    require_uint API_TIMEOUT_MS "$TIMEOUT_MS" 1
    require_uint CLAUDE_START_HEALTH_WAIT "$HEALTH_WAIT" 1
    if [[ $SSH_HOST == -* ]]; then
        usage_error "ssh destination '$SSH_HOST' must not start with '-'"
    fi
}

no_host_message() {
    printf '%s' "no ssh host given: pass --ssh user@host or set CLAUDE_START_SSH" \
        " (environment or ${CONFIG_FILE:-the config file}), or use --local"
}

# ---------------------------------------------------------------- probes

# probe_health URL MAX_SECONDS: prints the HTTP status of URL, 000 if nothing answers.
probe_health() {
    local url=$1 max=$2
    if have curl; then
        # --noproxy: an http_proxy setting must not catch loopback URLs.
        curl -s -o /dev/null -w '%{http_code}' --noproxy '*' --max-time "$max" "$url" \
            2>/dev/null || true
    else
        # main() made sure that python3 is there when curl is not.
        python3 -c "$PY_HEALTH" "$url" "$max" 2>/dev/null || echo 000
    fi
}

# A status that proves the proxy process is alive (503 = up, Ollama not reachable;
# 401/403 = up, but /health wants the API key).
is_up_status() {
    case $1 in 2[0-9][0-9] | 503 | 401 | 403) return 0 ;; esac
    return 1
}

# Warn once per run: the remote check and the tunnel check see the same 503.
warn_status() {
    local status=$1 where=$2
    case $status in
        503) if ((OLLAMA_WARNED == 0)); then
                say "warning: proxy at $where is up but Ollama is not reachable (HTTP 503); continuing, the model may still be loading"
                OLLAMA_WARNED=1
            fi ;;
        401 | 403) say "warning: proxy at $where answered /health with HTTP $status; continuing (check PROXY_API_KEY)" ;;
    esac
}

# wait_for_health URL SECONDS [PID]: polls until the proxy is up (HEALTH_CODE set,
# status 0), SECONDS pass (status 1) or PID exits (status 2).
wait_for_health() {
    local url=$1 wait_s=$2 pid=${3:-} start=$SECONDS
    while :; do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            return 2
        fi
        HEALTH_CODE=$(probe_health "$url" 2)
        is_up_status "$HEALTH_CODE" && return 0
        # ">": SECONDS ticks in whole seconds, so wait at least wait_s.
        ((SECONDS - start > wait_s)) && return 1
        sleep 0.2
    done
}

# find_free_port START: prints the first port from START upward (PORT_TRIES of
# them) on which nothing listens on 127.0.0.1; status 1 if there is none.
find_free_port() {
    local start=$1 port last
    last=$((start + PORT_TRIES - 1))
    ((last <= 65535)) || last=65535
    if have python3; then
        # Bind like ssh does (SO_REUSEADDR) and also try to connect, so both a
        # listener and a bound-but-idle socket count as taken.
        python3 - "$start" "$last" <<'PY'
import socket, sys
for port in range(int(sys.argv[1]), int(sys.argv[2]) + 1):
    probe = socket.socket()
    probe.settimeout(1)
    try:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            continue
    finally:
        probe.close()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    print(port)
    sys.exit(0)
sys.exit(1)
PY
        return
    fi
    for ((port = start; port <= last; port++)); do
        if ! (: <"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    return 1
}

# Sets PORT to a free local port, telling the user when it is not the asked one.
pick_local_port() {
    PORT=$(find_free_port "$LOCAL_PORT") || PORT=''
    if [[ -z $PORT ]]; then
        FAIL_REASON="no free local port in $LOCAL_PORT-$((LOCAL_PORT + PORT_TRIES - 1)): free one or pass --local-port"
        return 1
    fi
    if [[ $PORT != "$LOCAL_PORT" ]]; then
        say "local port $LOCAL_PORT is in use; using $PORT"
    fi
}

# ---------------------------------------------------------------- remote side

ssh_common_opts() {
    SSH_OPTS=(-o StrictHostKeyChecking=accept-new -o "ConnectTimeout=$SSH_CONNECT_TIMEOUT")
    if [[ -n $SSH_PORT ]]; then
        SSH_OPTS+=(-p "$SSH_PORT")
    fi
}

ssh_target() { printf '%s' "$SSH_HOST${SSH_PORT:+ (port $SSH_PORT)}"; }

# The command run on the GPU box (any POSIX sh): print the /health status,
# 000 when nothing answers. curl is tried first; a fresh box may only have python3,
# which the proxy needs anyway.
remote_health_command() {
    local url="http://127.0.0.1:$REMOTE_PORT/health"
    printf '%s' "if command -v curl >/dev/null 2>&1; then" \
        " curl -s -o /dev/null -w '%{http_code}' --noproxy '*' --max-time 5 $url || true;" \
        " else python3 -c '$PY_HEALTH' $url 5; fi"
}

# Runs the health command over ssh. Sets HEALTH_CODE and FAIL_REASON;
# status 0 = proxy up, 1 = ssh failed, 2 = proxy down or not the proxy.
check_remote() {
    local out rc=0 last
    ssh_common_opts
    # stderr is merged so that ssh's own complaint can be quoted in one line;
    # the status code is always the last line of a successful run.
    out=$(ssh "${SSH_OPTS[@]}" -- "$SSH_HOST" "$(remote_health_command)" 2>&1 </dev/null) || rc=$?
    last=$(last_line "$out")
    if ((rc == 255)); then
        FAIL_REASON="cannot reach $(ssh_target) over ssh${last:+ ($last)}: check the host, port and your ssh key (try: ssh ${SSH_PORT:+-p $SSH_PORT }$SSH_HOST true)"
        return 1
    fi
    HEALTH_CODE=$last
    if is_up_status "$HEALTH_CODE"; then
        return 0
    fi
    case $HEALTH_CODE in
        000) FAIL_REASON="remote proxy down: nothing answers on 127.0.0.1:$REMOTE_PORT on $SSH_HOST; start it with \`python3 simple_api_proxy.py\` on the GPU box (API_PORT=$REMOTE_PORT)" ;;
        [0-9][0-9][0-9]) FAIL_REASON="127.0.0.1:$REMOTE_PORT on $SSH_HOST answered /health with HTTP $HEALTH_CODE, so it is not simple_api_proxy.py: check --remote-port" ;;
        *) FAIL_REASON="remote health check on $SSH_HOST failed (exit $rc${last:+: $last}): it needs curl or python3 on the GPU box" ;;
    esac
    return 2
}

# Opens the tunnel on PORT and waits for /health through it. Sets TUNNEL_PID
# and FAIL_REASON; status 0 = proxy answers through the tunnel.
open_tunnel() {
    local log="${TMPDIR:-/tmp}/claude_start.ssh.$PORT.log" rc=0 last
    ssh_common_opts
    # ExitOnForwardFailure: a port we cannot bind must end ssh, not leave a
    # tunnel-less connection. ServerAlive*: notice a dead link instead of hanging.
    # Output goes to a log so ssh's later messages do not land in Claude Code's
    # screen, and so that ssh does not hold this script's stdout open.
    ssh -N -L "$PORT:127.0.0.1:$REMOTE_PORT" \
        -o ExitOnForwardFailure=yes \
        -o "ServerAliveInterval=$SSH_ALIVE_INTERVAL" -o ServerAliveCountMax=3 \
        "${SSH_OPTS[@]}" -- "$SSH_HOST" </dev/null >"$log" 2>&1 &
    TUNNEL_PID=$!
    wait_for_health "http://127.0.0.1:$PORT/health" "$HEALTH_WAIT" "$TUNNEL_PID" || rc=$?
    case $rc in
        0) return 0 ;;
        2) rc=0
            wait "$TUNNEL_PID" 2>/dev/null || rc=$?
            TUNNEL_PID=''
            last=''
            [[ -r $log ]] && last=$(last_line "$(<"$log")")
            last=${last%.}
            FAIL_REASON="ssh tunnel to $(ssh_target) exited (code $rc)${last:+: $last}; check that you can run: ssh ${SSH_PORT:+-p $SSH_PORT }-N -L $PORT:127.0.0.1:$REMOTE_PORT $SSH_HOST (log: $log)" ;;
        *) FAIL_REASON="proxy did not answer http://127.0.0.1:$PORT/health through the tunnel within $HEALTH_WAIT s: check the proxy on $SSH_HOST, or raise CLAUDE_START_HEALTH_WAIT (ssh log: $log)" ;;
    esac
    return 1
}

start_remote() {
    [[ -n $SSH_HOST ]] || die "$(no_host_message)"
    have ssh || die "ssh not found on PATH: install the OpenSSH client, or use --local for a proxy on this machine"
    check_remote || die "$FAIL_REASON"
    warn_status "$HEALTH_CODE" "$SSH_HOST:$REMOTE_PORT"
    pick_local_port || die "$FAIL_REASON"
    open_tunnel || die "$FAIL_REASON"
    warn_status "$HEALTH_CODE" "127.0.0.1:$PORT"
    say "tunnel 127.0.0.1:$PORT -> $SSH_HOST:127.0.0.1:$REMOTE_PORT is up (ssh pid $TUNNEL_PID)"
}

# ---------------------------------------------------------------- local side

# Starts the proxy on PORT and waits for it. Sets PROXY_PID and FAIL_REASON.
start_proxy() {
    local log="${TMPDIR:-/tmp}/simple_api_proxy.$PORT.log" rc=0
    [[ -f $PROXY_SCRIPT ]] || {
        FAIL_REASON="proxy script $PROXY_SCRIPT not found: set CLAUDE_START_PROXY_SCRIPT to simple_api_proxy.py"
        return 1
    }
    have python3 || {
        FAIL_REASON="python3 not found on PATH: install it to run $PROXY_SCRIPT"
        return 1
    }
    if [[ -n ${PROXY_API_KEY:-} ]]; then
        export PROXY_API_KEY
    fi
    API_PORT=$PORT API_HOST=127.0.0.1 python3 "$PROXY_SCRIPT" </dev/null >"$log" 2>&1 &
    PROXY_PID=$!
    say "started $PROXY_SCRIPT on 127.0.0.1:$PORT (pid $PROXY_PID, log $log)"
    wait_for_health "http://127.0.0.1:$PORT/health" "$HEALTH_WAIT" "$PROXY_PID" || rc=$?
    case $rc in
        0) return 0 ;;
        2) rc=0
            wait "$PROXY_PID" 2>/dev/null || rc=$?
            PROXY_PID=''
            FAIL_REASON="$PROXY_SCRIPT exited (code $rc) before answering /health: see $log" ;;
        *) FAIL_REASON="$PROXY_SCRIPT did not answer http://127.0.0.1:$PORT/health within $HEALTH_WAIT s: see $log, or raise CLAUDE_START_HEALTH_WAIT" ;;
    esac
    return 1
}

start_local() {
    HEALTH_CODE=$(probe_health "http://127.0.0.1:$LOCAL_PORT/health" 2)
    if is_up_status "$HEALTH_CODE"; then
        PORT=$LOCAL_PORT
        say "using the proxy already running on 127.0.0.1:$PORT"
    else
        pick_local_port || die "$FAIL_REASON"
        start_proxy || die "$FAIL_REASON"
    fi
    warn_status "$HEALTH_CODE" "127.0.0.1:$PORT"
}

# ---------------------------------------------------------------- claude

require_claude() {
    have claude || die "claude not found on PATH: install Claude Code (npm install -g @anthropic-ai/claude-code) or fix PATH"
}

run_claude() {
    local rc=0
    export ANTHROPIC_BASE_URL="http://127.0.0.1:$PORT"
    export ANTHROPIC_AUTH_TOKEN="${PROXY_API_KEY:-$DUMMY_AUTH_TOKEN}"
    # A real Anthropic key in the environment would make Claude Code ask which
    # credential to use, and would be sent to the proxy.
    unset ANTHROPIC_API_KEY
    export ANTHROPIC_MODEL="$MODEL"
    export ANTHROPIC_DEFAULT_HAIKU_MODEL="$MODEL"
    export ANTHROPIC_DEFAULT_SONNET_MODEL="$MODEL"
    export ANTHROPIC_DEFAULT_OPUS_MODEL="$MODEL"
    export ANTHROPIC_SMALL_FAST_MODEL="$MODEL"
    export CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1
    export DISABLE_TELEMETRY=1
    # The attribution header changes per request and would defeat the local
    # model's prompt cache.
    export CLAUDE_CODE_ATTRIBUTION_HEADER=0
    export API_TIMEOUT_MS="$TIMEOUT_MS"
    export CLAUDE_CODE_MAX_CONTEXT_TOKENS="$CONTEXT_TOKENS"
    export CLAUDE_CODE_MAX_OUTPUT_TOKENS="$MAX_OUTPUT_TOKENS"
    # Ctrl-C belongs to Claude Code while it runs; a trap (not an ignore) is
    # reset in the child, and keeps this script alive to return claude's status
    # and close the tunnel. No exec: the EXIT trap must still run.
    trap ':' INT
    claude --model "$MODEL" ${CLAUDE_ARGS[@]+"${CLAUDE_ARGS[@]}"} || rc=$?
    trap 'exit 130' INT
    return "$rc"
}

# ---------------------------------------------------------------- --check

CHECK_FAILED=0
hop() {
    local name=$1 status=$2 detail=${3:-}
    printf '%-20s %s%s\n' "$name:" "$status" "${detail:+ ($detail)}"
    if [[ $status == failed ]]; then
        CHECK_FAILED=$((CHECK_FAILED + 1))
    fi
}

status_note() {
    case $1 in
        503) NOTE="HTTP 503: proxy up, Ollama not reachable - the model may be loading" ;;
        401 | 403) NOTE="HTTP $1: proxy up, /health wants the API key" ;;
        *) NOTE="HTTP $1" ;;
    esac
}

check_remote_hops() {
    local remote_ok=0 skip=''
    if [[ -z $SSH_HOST ]]; then
        hop "ssh reachable" failed "$(no_host_message)"
        skip="no ssh host"
    elif ! have ssh; then
        hop "ssh reachable" failed "ssh not found on PATH"
        skip="no ssh"
    else
        local rc=0
        check_remote || rc=$?
        if ((rc == 1)); then
            hop "ssh reachable" failed "$FAIL_REASON"
            skip="ssh failed"
        else
            hop "ssh reachable" ok "$(ssh_target)"
            if ((rc == 0)); then
                status_note "$HEALTH_CODE"
                hop "remote proxy health" ok "127.0.0.1:$REMOTE_PORT on $SSH_HOST, $NOTE"
                remote_ok=1
            else
                hop "remote proxy health" failed "$FAIL_REASON"
                skip="remote proxy down"
            fi
        fi
    fi
    if ((remote_ok == 0)); then
        [[ $skip == "remote proxy down" ]] || hop "remote proxy health" failed "not checked: $skip"
        hop "tunnel" failed "not tried: $skip"
        hop "local health" failed "not tried: $skip"
        return
    fi
    if pick_local_port && open_tunnel; then
        hop "tunnel" ok "127.0.0.1:$PORT -> $SSH_HOST:127.0.0.1:$REMOTE_PORT, ssh pid $TUNNEL_PID"
        status_note "$HEALTH_CODE"
        hop "local health" ok "http://127.0.0.1:$PORT/health, $NOTE"
    elif [[ -n $TUNNEL_PID ]]; then
        # ssh is still up, only /health stayed silent.
        hop "tunnel" ok "127.0.0.1:$PORT -> $SSH_HOST:127.0.0.1:$REMOTE_PORT, ssh pid $TUNNEL_PID"
        hop "local health" failed "$FAIL_REASON"
    else
        hop "tunnel" failed "$FAIL_REASON"
        hop "local health" failed "not tried: no tunnel"
    fi
    close_tunnel
}

check_local_hops() {
    hop "ssh reachable" skipped "--local"
    hop "remote proxy health" skipped "--local"
    hop "tunnel" skipped "--local"
    HEALTH_CODE=$(probe_health "http://127.0.0.1:$LOCAL_PORT/health" 2)
    if is_up_status "$HEALTH_CODE"; then
        status_note "$HEALTH_CODE"
        hop "local health" ok "http://127.0.0.1:$LOCAL_PORT/health, $NOTE"
    elif [[ -f $PROXY_SCRIPT ]] && have python3; then
        hop "local health" ok "nothing answers on 127.0.0.1:$LOCAL_PORT yet; --local will start $PROXY_SCRIPT"
    else
        hop "local health" failed "nothing answers on 127.0.0.1:$LOCAL_PORT and $PROXY_SCRIPT cannot be started (missing file or python3)"
    fi
}

run_check() {
    if [[ $MODE == local ]]; then
        check_local_hops
    else
        check_remote_hops
    fi
    if have claude; then
        hop "claude on PATH" ok "$(command -v claude)"
    else
        hop "claude on PATH" failed "install Claude Code (npm install -g @anthropic-ai/claude-code) or fix PATH"
    fi
    if ((CHECK_FAILED > 0)); then
        say "$CHECK_FAILED check(s) failed"
        return 1
    fi
    say "all checks passed"
}

# ---------------------------------------------------------------- cleanup

# stop_pid PID: TERM, then KILL if it has not gone within ~3 s.
stop_pid() {
    local pid=$1 i
    kill "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 30; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    # Reap it quietly (bash would otherwise report "Terminated").
    wait "$pid" 2>/dev/null || true
}

close_tunnel() {
    if [[ -n $TUNNEL_PID ]]; then
        stop_pid "$TUNNEL_PID"
        TUNNEL_PID=''
    fi
}

# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    close_tunnel
    # Only a proxy this run started; one that was already running stays.
    if [[ -n $PROXY_PID ]]; then
        stop_pid "$PROXY_PID"
        PROXY_PID=''
    fi
}

main() {
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
    parse_args "$@"
    resolve_settings
    have curl || have python3 ||
        die "neither curl nor python3 found: install one of them (needed to check the proxy health)"
    if ((CHECK)); then
        local status=0
        run_check || status=$?
        exit "$status"
    fi
    require_claude
    if [[ $MODE == local ]]; then
        start_local
    else
        start_remote
    fi
    local rc=0
    run_claude || rc=$?
    exit "$rc"
}

main "$@"
