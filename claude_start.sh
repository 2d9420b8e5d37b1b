#!/usr/bin/env bash
# claude_start.sh - start Claude Code (the `claude` CLI) against simple_api_proxy.py.
#
# The proxy speaks the Anthropic Messages API and forwards to Ollama. This is the
# laptop side:
#   remote (default)  the proxy runs on a GPU box: check it over ssh, open an ssh
#                     tunnel 127.0.0.1:LOCAL -> box:127.0.0.1:REMOTE, run claude
#                     through it (reopening the tunnel if it drops), and close
#                     that tunnel (and only it) on exit.
#   several --ssh     each box runs Ollama only; one tunnel per box, and the proxy
#                     runs here with OLLAMA_HOST listing the tunnels.
#   --local           the proxy runs on this machine: use the one that answers, or
#                     start simple_api_proxy.py and stop it again on exit.
#   --deploy          (with remote) first set the box up: copy simple_api_proxy.py to
#                     ~/.simple_api_proxy/, start or install Ollama, pull the models,
#                     start the proxy detached; a repeat leaves a running proxy alone.
#   --stop [--all]    stop the box's proxy (--all: also the ollama serve it started).
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
readonly SSH_ALIVE_INTERVAL=15
readonly SSH_CONNECT_TIMEOUT=10
readonly DEFAULT_OLLAMA_INSTALL='curl -fsSL https://ollama.com/install.sh | sh'
readonly DEFAULT_INSTALL_TIMEOUT=900
readonly DEFAULT_OLLAMA_WAIT=60
readonly DEFAULT_PULL_TIMEOUT=3600
# Seconds for box calls that only look or stop (the deploy call gets the sum of its steps').
readonly BOX_CALL_TIMEOUT=60
readonly TUNNEL_TRIES=5
# The proxy's own settings: taken from the environment or the config file and written, by
# --deploy, to a mode-0600 env file on the box (a command line would show them in ps).
# All of simple_api_proxy.py's SETTINGS but API_HOST, API_PORT and LOG_FILE, which the
# launcher decides itself (a test keeps the two lists equal).
readonly PROXY_SETTINGS="OLLAMA_HOST OLLAMA_MODEL MODEL_MAP OLLAMA_TIMEOUT OLLAMA_FIRST_TOKEN_TIMEOUT \
OLLAMA_NUM_CTX OLLAMA_KEEP_ALIVE DEFAULT_MAX_TOKENS OLLAMA_WARMUP PING_INTERVAL CACHE CACHE_TTL \
CACHE_MAX_ENTRIES CACHE_MAX_BYTES REDIS_URL REDIS_HOST REDIS_PORT REDIS_PASSWORD REDIS_SSL REDIS_DB \
REDIS_TIMEOUT TOOL_CALL_RECOVERY THINKING_KEY_FILE PROXY_API_KEY ALLOWED_ORIGINS MAX_BODY_BYTES MAX_CONCURRENT \
MAX_CONNECTIONS CLIENT_TIMEOUT SHUTDOWN_GRACE LOG_LEVEL LOG_BODIES"
readonly CONFIG_KEYS=" CLAUDE_START_SSH CLAUDE_START_SSH_PORT CLAUDE_START_REMOTE_PORT \
CLAUDE_START_LOCAL_PORT CLAUDE_START_MODEL CLAUDE_START_CONTEXT_TOKENS \
CLAUDE_START_MAX_OUTPUT_TOKENS API_TIMEOUT_MS CLAUDE_START_PROXY_SCRIPT \
CLAUDE_START_HEALTH_WAIT CLAUDE_START_OLLAMA_INSTALL CLAUDE_START_INSTALL_TIMEOUT \
CLAUDE_START_OLLAMA_WAIT CLAUDE_START_PULL_TIMEOUT $PROXY_SETTINGS "

# Health probe for a laptop without curl: prints the body of /health, then the
# HTTP status on a line of its own (000 when nothing answers).
# The empty ProxyHandler ignores http_proxy: these URLs are always loopback.
readonly PY_HEALTH='import sys, urllib.request, urllib.error
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    r = opener.open(sys.argv[1], timeout=float(sys.argv[2]))
    print(r.read().decode("utf-8", "replace")); print(r.getcode())
except urllib.error.HTTPError as e:
    print(e.read().decode("utf-8", "replace")); print(e.code)
except Exception:
    print(); print("000")'

# Filled by parse_args / resolve_settings.
MODE=remote
CHECK=0 DEPLOY=0 STOP=0 STOP_ALL=0 LEAN=0
LAUNCH_ARGS=() OPT_SSHS=() SSH_HOSTS=()
OPT_SSH='' OPT_SSH_PORT='' OPT_REMOTE_PORT='' OPT_LOCAL_PORT='' OPT_MODEL='' OPT_CONFIG=''
CLAUDE_ARGS=()
SSH_HOST='' SSH_PORT='' REMOTE_PORT='' LOCAL_PORT='' MODEL='' CONTEXT_TOKENS=''
MAX_OUTPUT_TOKENS='' TIMEOUT_MS='' PROXY_SCRIPT='' HEALTH_WAIT='' CONFIG_FILE=''
OLLAMA_INSTALL='' INSTALL_TIMEOUT='' OLLAMA_WAIT='' PULL_TIMEOUT=''
# What this run started, so that the exit trap stops exactly that and nothing else.
TUNNEL_PID='' PROXY_PID='' KEEPER_PID='' CLAUDE_PID='' RUN_DIR='' SOCKET_DIR='' CONTROL='' MASTER_OPEN=0
# Set by the step functions for their callers.
PORT='' HEALTH_CODE='' HEALTH_INSTANCE='' FAIL_REASON='' NOTE='' OLLAMA_WARNED=0
# What the box said in its last call (see box_call).
BOX_STATUS=0 BOX_FAIL='' BOX_NEED='' BOX_READY='' BOX_HEALTH='' BOX_INSTANCE='' BOX_OLLAMA=''
BOX_HOPS=()
# What a tunnel forwards to on the box, and what answers through it once it is up.
TUNNEL_TARGET='' TUNNEL_PROBE=/health
# Several boxes (--ssh more than once): one tunnel and keeper per box.
TUNNEL_PIDS=() TUNNEL_PORTS=() TUNNEL_TARGETS=() KEEPER_PIDS=()

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
                       [--deploy | --stop [--all] | --local | --check] [--lean]
                       [-- CLAUDE_ARGS...]

Start Claude Code against simple_api_proxy.py (Anthropic Messages API -> Ollama).

Modes:
  (default)           remote: check the proxy on the GPU box over ssh, open
                      ssh -N -L LOCAL:127.0.0.1:REMOTE, wait for /health through
                      it (the same proxy instance as on the box), run claude,
                      reopen the tunnel if it drops, close it on exit
  --deploy            remote, after setting the box up over one ssh connection:
                      copy simple_api_proxy.py to ~/.simple_api_proxy/ (if it
                      changed), start Ollama (install it if missing), pull the
                      models it lacks, start the proxy detached with the proxy
                      settings below in a mode-0600 env file, wait for /health.
                      Same file and settings: the running proxy is left alone.
  --stop              stop the proxy on the box (--stop --all: also the
                      ollama serve that --deploy started)
  --local             no ssh: use the proxy on 127.0.0.1:LOCAL, or start
                      simple_api_proxy.py in the background (stopped on exit)
  --check             print each hop (ssh reachable, remote proxy health, Ollama
                      as the proxy sees it, each model, Redis if set, tunnel,
                      local health, claude on PATH) as ok/failed/warning, then
                      exit (status 1 if any failed); combine with --local to
                      check the local setup

Options (each has a variable; flag > environment > config file > default):
  --ssh USER@HOST     CLAUDE_START_SSH            ssh destination (no default);
                                                  ssh://USER@HOST:PORT works too.
                                                  Given more than once (or
                                                  several words in CLAUDE_START_SSH):
                                                  several boxes, each running only Ollama
                                                  (--deploy readies it and the models),
                                                  one tunnel per box, and the proxy here
                                                  with OLLAMA_HOST listing the tunnels
  --ssh-port P        CLAUDE_START_SSH_PORT       default: ~/.ssh/config, else 22
  --remote-port P     CLAUDE_START_REMOTE_PORT    proxy port on the GPU box (8000)
  --local-port P      CLAUDE_START_LOCAL_PORT     port on 127.0.0.1 here (8001);
                                                  the next free one is used if taken
  --model NAME        CLAUDE_START_MODEL          model for claude ($DEFAULT_MODEL)
  --config FILE       CLAUDE_START_CONFIG         settings file (default
                                                  ~/.config/simple_api_proxy/claude_start.env)
  --lean              leave out Claude Code tools a local model rarely uses well
                      (agents, skills, workflows, scheduling, web, notebooks,
                      worktrees): a prompt about a third the size; see README
  -h, --help          show this help
  --                  everything after it is passed to claude

Variables (environment or config file):
  CLAUDE_START_CONTEXT_TOKENS     CLAUDE_CODE_MAX_CONTEXT_TOKENS ($DEFAULT_CONTEXT_TOKENS, the proxy's OLLAMA_NUM_CTX)
  CLAUDE_START_MAX_OUTPUT_TOKENS  CLAUDE_CODE_MAX_OUTPUT_TOKENS ($DEFAULT_MAX_OUTPUT_TOKENS)
  API_TIMEOUT_MS                  Claude Code request timeout in ms ($DEFAULT_API_TIMEOUT_MS)
  PROXY_API_KEY                   sent as ANTHROPIC_AUTH_TOKEN (default: a dummy token)
  CLAUDE_START_PROXY_SCRIPT       simple_api_proxy.py for --local, --deploy and several
                                  boxes (default: next to this script)
  CLAUDE_START_HEALTH_WAIT        seconds to wait for /health ($DEFAULT_HEALTH_WAIT)
  CLAUDE_START_OLLAMA_INSTALL     command --deploy runs on a box without Ollama
                                  ($DEFAULT_OLLAMA_INSTALL)
  CLAUDE_START_INSTALL_TIMEOUT    seconds for that install ($DEFAULT_INSTALL_TIMEOUT)
  CLAUDE_START_OLLAMA_WAIT        seconds for a started Ollama to answer ($DEFAULT_OLLAMA_WAIT)
  CLAUDE_START_PULL_TIMEOUT       seconds for pulling one model ($DEFAULT_PULL_TIMEOUT)

Proxy settings that --deploy writes to ~/.simple_api_proxy/proxy.env on the box
(see python3 simple_api_proxy.py --help; OLLAMA_MODEL defaults to --model):
  $PROXY_SETTINGS

The config file holds KEY=VALUE lines with the variable names above
(blank lines, # comments and a leading "export " are allowed).

Claude Code gets ANTHROPIC_BASE_URL=http://127.0.0.1:PORT, ANTHROPIC_AUTH_TOKEN,
ANTHROPIC_MODEL and ANTHROPIC_DEFAULT_{HAIKU,SONNET,OPUS}_MODEL (and
ANTHROPIC_SMALL_FAST_MODEL) = the model, CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1,
DISABLE_TELEMETRY=1, CLAUDE_CODE_ATTRIBUTION_HEADER=0, API_TIMEOUT_MS,
CLAUDE_CODE_MAX_CONTEXT_TOKENS and CLAUDE_CODE_MAX_OUTPUT_TOKENS, and, unless already
set, output limits: a quarter of the window in tokens for a file read and an MCP result
(CLAUDE_CODE_FILE_READ_MAX_OUTPUT_TOKENS, MAX_MCP_OUTPUT_TOKENS), three quarters of it
in characters for command output (BASH_MAX_OUTPUT_LENGTH), and runs as
  claude --model MODEL [--disallowedTools ... with --lean] [CLAUDE_ARGS...]
Its exit status is returned.

Examples:
  claude_start.sh --ssh me@gpu-box
  claude_start.sh --ssh root@ssh4.vast.ai --ssh-port 31234 --deploy
  claude_start.sh --ssh me@gpu-box --ssh-port 2222 -- --continue
  claude_start.sh --ssh me@gpu-box --stop --all
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
            --deploy) DEPLOY=1 ;;
            --stop) STOP=1 ;;
            --all) STOP_ALL=1 ;;
            --lean) LEAN=1 ;;
            --ssh | --ssh-port | --remote-port | --local-port | --model | --config | \
                --ssh=* | --ssh-port=* | --remote-port=* | --local-port=* | --model=* | --config=*)
                if [[ $flag == *=* ]]; then
                    value=${flag#*=}
                    flag=${flag%%=*}
                else
                    (($# >= 2)) || usage_error "$flag needs a value"
                    value=$2
                    LAUNCH_ARGS+=("$flag")
                    shift
                fi
                [[ -n $value ]] || usage_error "$flag needs a non-empty value"
                case $flag in
                    --ssh) OPT_SSH=$value
                        OPT_SSHS+=("$value") ;;
                    --ssh-port) OPT_SSH_PORT=$value ;;
                    --remote-port) OPT_REMOTE_PORT=$value ;;
                    --local-port) OPT_LOCAL_PORT=$value ;;
                    --model) OPT_MODEL=$value ;;
                    --config) OPT_CONFIG=$value ;;
                esac ;;
            *) usage_error "unknown option '$flag' (arguments for claude go after --)" ;;
        esac
        [[ $flag == --deploy ]] || LAUNCH_ARGS+=("$1")
        shift
    done
}

# Flags that cannot go together are refused before anything runs.
check_modes() {
    local modes=$((DEPLOY + STOP + CHECK))
    [[ $MODE == local ]] && modes=$((modes + 1 - CHECK))
    ((modes <= 1)) || usage_error "--deploy, --stop, --check and --local go one at a time (--check --local is the one pair)"
    ((STOP_ALL == 0 || STOP == 1)) || usage_error "--all goes with --stop"
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
    # Several boxes: --ssh more than once, or CLAUDE_START_SSH with several words.
    if ((${#OPT_SSHS[@]} > 1)); then
        SSH_HOSTS=("${OPT_SSHS[@]}")
    elif [[ -n $SSH_HOST ]]; then
        read -r -a SSH_HOSTS <<<"$SSH_HOST"
    fi
    if ((${#SSH_HOSTS[@]} > 1)); then
        [[ $MODE != local ]] || usage_error "--local and several --ssh boxes do not go together"
        MODE=boxes
    fi
    SSH_HOST=${SSH_HOSTS[0]:-}
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
    OLLAMA_INSTALL=${CLAUDE_START_OLLAMA_INSTALL:-$DEFAULT_OLLAMA_INSTALL}
    INSTALL_TIMEOUT=${CLAUDE_START_INSTALL_TIMEOUT:-$DEFAULT_INSTALL_TIMEOUT}
    OLLAMA_WAIT=${CLAUDE_START_OLLAMA_WAIT:-$DEFAULT_OLLAMA_WAIT}
    PULL_TIMEOUT=${CLAUDE_START_PULL_TIMEOUT:-$DEFAULT_PULL_TIMEOUT}
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
    require_uint CLAUDE_START_INSTALL_TIMEOUT "$INSTALL_TIMEOUT" 1
    require_uint CLAUDE_START_OLLAMA_WAIT "$OLLAMA_WAIT" 1
    require_uint CLAUDE_START_PULL_TIMEOUT "$PULL_TIMEOUT" 1
    local host
    for host in ${SSH_HOSTS[@]+"${SSH_HOSTS[@]}"}; do
        [[ $host != -* ]] || usage_error "ssh destination '$host' must not start with '-'"
    done
}

no_host_message() {
    printf '%s' "no ssh host given: pass --ssh user@host or set CLAUDE_START_SSH" \
        " (environment or ${CONFIG_FILE:-the config file}), or use --local"
}

# ---------------------------------------------------------------- probes

# fetch_health URL MAX_SECONDS: sets HEALTH_CODE (000 if nothing answers) and
# HEALTH_INSTANCE (the proxy's instance_id, empty if it gave none).
fetch_health() {
    local url=$1 max=$2 out body
    if have curl; then
        # --noproxy: an http_proxy setting must not catch loopback URLs.
        out=$(curl -s -w '\n%{http_code}' --noproxy '*' --max-time "$max" "$url" 2>/dev/null) || true
    else
        # main() made sure that python3 is there when curl is not.
        out=$(python3 -c "$PY_HEALTH" "$url" "$max" 2>/dev/null) || out=$'\n000'
    fi
    HEALTH_CODE=${out##*$'\n'}
    [[ $HEALTH_CODE =~ ^[0-9]{3}$ ]] || HEALTH_CODE=000
    body=${out%$'\n'*}
    HEALTH_INSTANCE=''
    if [[ $body =~ \"instance_id\":\ *\"([0-9A-Za-z]+)\" ]]; then
        HEALTH_INSTANCE=${BASH_REMATCH[1]}
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

# wait_for_health URL SECONDS [PID [INSTANCE]]: polls until the proxy is up
# (HEALTH_CODE set, status 0), SECONDS pass (status 1), PID exits (status 2), or
# a proxy answers whose instance_id is not INSTANCE (status 3: someone else's).
wait_for_health() {
    local url=$1 wait_s=$2 pid=${3:-} instance=${4:-} start=$SECONDS
    while :; do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            return 2
        fi
        fetch_health "$url" 2
        if is_up_status "$HEALTH_CODE"; then
            [[ -z $instance || $HEALTH_INSTANCE == "$instance" ]] || return 3
            return 0
        fi
        # ">": SECONDS ticks in whole seconds, so wait at least wait_s.
        ((SECONDS - start > wait_s)) && return 1
        sleep 0.1
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

# ---------------------------------------------------------------- ssh connection

ssh_common_opts() {
    # ServerAlive*: notice a dead link within ~45 s instead of hanging.
    SSH_OPTS=(-o StrictHostKeyChecking=accept-new -o "ConnectTimeout=$SSH_CONNECT_TIMEOUT"
        -o "ServerAliveInterval=$SSH_ALIVE_INTERVAL" -o ServerAliveCountMax=3)
    if [[ -n $SSH_PORT ]]; then
        SSH_OPTS+=(-p "$SSH_PORT")
    fi
}

ssh_target() { printf '%s' "$SSH_HOST${SSH_PORT:+ (port $SSH_PORT)}"; }

# A private folder for this run (box requests, ssh errors), and one for the ssh
# control sockets, whose path must fit in ~100 bytes: /tmp when TMPDIR is long.
make_run_dir() {
    local base=${TMPDIR:-/tmp}
    RUN_DIR=$(mktemp -d "${base%/}/claude_start.XXXXXX") || die "cannot create a folder in $base: check TMPDIR"
    SOCKET_DIR=$RUN_DIR
    if ((${#RUN_DIR} > 80)); then
        SOCKET_DIR=$(mktemp -d /tmp/claude_start.XXXXXX) || die "cannot create a folder in /tmp"
    fi
    CONTROL=$SOCKET_DIR/ssh
}

# with_timeout SECONDS COMMAND...: runs COMMAND; status 124 if SECONDS pass first
# (it is then stopped). Written out because macOS has no timeout(1).
with_timeout() {
    local seconds=$1 pid watchdog rc=0 fired
    shift
    fired=$(mktemp -u "$RUN_DIR/timeout.XXXXXX")
    "$@" &
    pid=$!
    # The watchdog's own sleep is killed with it, and it holds no output pipe open.
    (
        trap 'kill "$nap" 2>/dev/null; exit 0' TERM
        sleep "$seconds" &
        nap=$!
        wait "$nap"
        : >"$fired"
        kill -TERM "$pid" 2>/dev/null
        sleep 2
        kill -KILL "$pid" 2>/dev/null
    ) </dev/null >/dev/null 2>&1 &
    watchdog=$!
    wait "$pid" || rc=$?
    kill "$watchdog" 2>/dev/null || true
    wait "$watchdog" 2>/dev/null || true
    if [[ -e $fired ]]; then
        rm -f "$fired"
        return 124
    fi
    return "$rc"
}

# The name ssh-keygen -R wants for this box: HOST, or [HOST]:PORT off port 22.
known_hosts_name() {
    local key value host='' port=22
    while IFS=' ' read -r key value; do
        case $key in hostname) host=$value ;; port) port=$value ;; esac
    done < <(ssh -G "${SSH_OPTS[@]}" -- "$SSH_HOST" 2>/dev/null || true)
    [[ -n $host ]] || host=${SSH_HOST#*@}
    if [[ $port == 22 ]]; then
        printf '%s' "$host"
    else
        printf '[%s]:%s' "$host" "$port"
    fi
}

# ssh_failure ERROR_FILE: FAIL_REASON for an ssh that exited 255.
ssh_failure() {
    local text='' last
    [[ -r $1 ]] && text=$(<"$1")
    last=$(last_line "$text")
    if [[ $text == *"IDENTIFICATION HAS CHANGED"* || $text == *"Host key verification failed"* ]]; then
        FAIL_REASON="the host key of $(ssh_target) has changed (a rebuilt or new box behind the same address, or someone in between): if you expect that, run: ssh-keygen -R '$(known_hosts_name)' and try again"
    else
        FAIL_REASON="cannot reach $(ssh_target) over ssh${last:+ ($last)}: check the host, port and your ssh key (try: ssh ${SSH_PORT:+-p $SSH_PORT }$SSH_HOST true)"
    fi
}

# One authenticated connection that every box call of this run reuses
# (ControlMaster); a passphrase or host key question comes up once, here.
open_master() {
    local rc=0
    ssh_common_opts
    with_timeout $((SSH_CONNECT_TIMEOUT + 20)) ssh "${SSH_OPTS[@]}" -M -S "$CONTROL" \
        -o ControlPersist=300 -f -N -- "$SSH_HOST" </dev/null >/dev/null 2>"$RUN_DIR/master.err" || rc=$?
    case $rc in
        0) MASTER_OPEN=1
            return 0 ;;
        124) FAIL_REASON="ssh to $(ssh_target) did not finish connecting within $((SSH_CONNECT_TIMEOUT + 20)) s: check the host and port" ;;
        *) ssh_failure "$RUN_DIR/master.err" ;;
    esac
    return 1
}

close_master() {
    if ((MASTER_OPEN)); then
        MASTER_OPEN=0
        with_timeout 5 ssh "${SSH_OPTS[@]}" -S "$CONTROL" -O exit -- "$SSH_HOST" </dev/null >/dev/null 2>&1 || true
    fi
}

# ---------------------------------------------------------------- box side
#
# Everything that runs on the GPU box is this Python program (python3 >= 3.8 is
# there for the proxy anyway): one function per step, each with its own time
# limit. It travels over ssh on stdin with each call; only the short loader below
# is on the box's command line, and it parses in a login shell of bash or sh.

BOX_PY=$(cat <<'PY'
# The GPU box side of claude_start.sh (python3 >= 3.8, standard library only). The launcher
# sends it over ssh on every call, followed by one JSON request line and the files it uploads;
# `up` also keeps a copy as ~/.simple_api_proxy/box.py, so that `python3 box.py up` brings
# Ollama and the proxy back after a reboot with the settings of the last deploy.
# Lines starting with "@" are for the launcher; every other line is shown to the user.
import hashlib
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.parse
import urllib.request

FOLDER = os.path.join(os.path.expanduser("~"), ".simple_api_proxy")
PROXY_SCRIPT = "simple_api_proxy.py"
PROXY_ENV = "proxy.env"
PROXY_PID = "proxy.pid"
PROXY_LOG = "proxy.log"
PROXY_STAMP = "proxy.stamp"
PROXY_INSTANCE = "proxy.instance"
OLLAMA_PID = "ollama.pid"
OLLAMA_LOG = "ollama.log"
INSTALL_LOG = "ollama-install.log"
OFFICIAL_INSTALLER = "ollama.com/install.sh"
LAST_DEPLOY = "deploy.json"
UPLOADS = (PROXY_SCRIPT, PROXY_ENV)
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Failed(Exception):
    """A step that cannot go on; its message says what to do."""


def path(name):
    return os.path.join(FOLDER, name)


def show(text):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def tell(tag, *words):
    show("@" + tag + " " + " ".join(str(w) for w in words))


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def read(name, default=""):
    try:
        with open(path(name)) as f:
            return f.read().strip()
    except OSError:
        return default


def write(name, data, mode=0o600):
    """Atomically, so that a dropped connection never leaves half a file."""
    temporary = path(name + ".part")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    os.chmod(temporary, mode)
    os.replace(temporary, path(name))


def last_lines(name, count=10):
    try:
        with open(path(name), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return "  (no log)"
    return "\n".join("  | " + line for line in lines[-count:]) or "  (log is empty)"


def env_settings():
    """proxy.env: KEY=VALUE lines the launcher wrote (never run by a shell)."""
    settings = {}
    for line in read(PROXY_ENV).splitlines():
        key, sep, value = line.partition("=")
        if sep:
            settings[key] = value
    return settings


def proxy_rules():
    """The box's copy of simple_api_proxy.py as a module, so that OLLAMA_HOST and model names mean
    here what they mean to the proxy; None where there is no usable copy: `ollama` and
    `ollama_probe` (several boxes) ready Ollama only and get no proxy file, and a probe may meet a
    box whose proxy was started by hand. `up` writes the file (step_files) before anything asks."""
    global PROXY_RULES
    if PROXY_RULES is None:
        PROXY_RULES = False
        try:
            spec = importlib.util.spec_from_file_location("simple_api_proxy_on_box", path(PROXY_SCRIPT))
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses look their module up there
            spec.loader.exec_module(module)
            if hasattr(module, "parse_ollama_hosts") and hasattr(module, "same_model"):
                PROXY_RULES = module
        except Exception:  # missing, or an old or broken copy: the fallbacks below apply
            sys.modules.pop("simple_api_proxy_on_box", None)
    return PROXY_RULES or None


PROXY_RULES = None


def ollama_url(settings):
    """The Ollama this box readies: the first address of OLLAMA_HOST (the rest are the user's own)."""
    value = settings.get("OLLAMA_HOST") or os.environ.get("OLLAMA_HOST") or "127.0.0.1:11434"
    try:
        rules = proxy_rules()
        if rules:
            return rules.parse_ollama_hosts(value)[0].url
        return ollama_address(value.split(",")[0])
    except ValueError as error:
        raise Failed("OLLAMA_HOST=%s: %s" % (value, error)) from None


def ollama_address(value):
    """Ollama's own rules, where the proxy's copy is not there to apply them: no scheme means
    http and 11434, a scheme without a port means 80 or 443; a bind address means loopback."""
    value = value.strip().rstrip("/")
    scheme, default_port = "http", 11434
    if "://" in value:
        scheme, value = value.split("://", 1)
        default_port = 443 if scheme == "https" else 80
    if scheme not in ("http", "https"):
        raise ValueError("the scheme must be http or https, not %r" % scheme)
    parsed = urllib.parse.urlsplit("//" + value)
    host = parsed.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return "%s://%s:%d" % (scheme, "[%s]" % host if ":" in host else host, parsed.port or default_port)


def http_json(url, timeout, headers=None):
    """(status, parsed body or None); status 0 when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with NO_PROXY.open(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    except (OSError, ValueError):
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def process_command(pid):
    """The command line of a live process, "" when it is gone (a zombie counts as gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return ""
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            # Empty for a moment while the process execs.
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip() or "pid %d" % pid
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return ""
    except PermissionError:
        pass
    return "pid %d" % pid


def pid_from(name, marker):
    """The pid in a pidfile, if that process still runs `marker`."""
    try:
        pid = int(read(name) or 0)
    except ValueError:
        return 0
    return pid if pid > 0 and marker in process_command(pid) else 0


def port_holder(port):
    """Who listens on the port: "pid N (command)", or a plain description when /proc does not say."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add("socket:[%s]" % fields[9])
        except (OSError, StopIteration, IndexError, ValueError):
            pass
    if inodes and os.path.isdir("/proc"):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                for fd in os.listdir("/proc/%s/fd" % entry):
                    if os.readlink("/proc/%s/fd/%s" % (entry, fd)) in inodes:
                        return "pid %s (%s)" % (entry, process_command(int(entry))[:120])
            except OSError:
                continue
    return "a process this user cannot see"


def port_taken(port):
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def stop_process(pid, grace):
    """SIGTERM, then SIGKILL once `grace` seconds pass; True when it is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not process_command(pid):
            return True
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    time.sleep(0.2)
    return not process_command(pid)


def start_detached(argv, log_name, env):
    """A process that outlives this ssh session: own session, no terminal, output to a log."""
    with open(path(log_name), "ab") as log:
        return subprocess.Popen(argv, cwd=FOLDER, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True).pid


def exit_status(pid):
    """How a child of this program ended, in words."""
    try:
        _, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return "exit status unknown"
    if os.WIFSIGNALED(status):
        return "killed by signal %d" % os.WTERMSIG(status)
    return "exit status %d" % os.WEXITSTATUS(status)


def installed(name, models):
    """Ollama's naming: a model without a tag is its :latest (the proxy's same_model where it is here)."""
    rules = proxy_rules()
    if rules:
        return any(rules.same_model(name, model) for model in models)
    return name in models or (":" not in name and name + ":latest" in models)


###############################################################################
# Steps of `up`, in order
###############################################################################

def step_files(request, uploads):
    """Write the uploaded files; report the ones whose hash differs and were not sent."""
    os.makedirs(FOLDER, mode=0o700, exist_ok=True)
    os.chmod(FOLDER, 0o700)
    missing = []
    for name in UPLOADS:
        want = request["hashes"][name]
        if name in uploads:
            if sha256(uploads[name]) != want:
                raise Failed("%s arrived damaged (hash mismatch): run the launcher again" % name)
            write(name, uploads[name], 0o600 if name == PROXY_ENV else 0o644)
        elif not os.path.exists(path(name)) or sha256(open(path(name), "rb").read()) != want:
            missing.append(name)
    if missing:
        tell("need", *missing)
        return False
    box = path("box.py")
    if not os.path.exists(box) or open(box).read() != BOX_SOURCE:
        write("box.py", BOX_SOURCE, 0o644)
    write(LAST_DEPLOY, json.dumps(dict(request, hashes={}, step="up")), 0o600)
    return True


def step_ollama(request, settings):
    """Ollama answers, or gets installed and started until it does."""
    url = ollama_url(settings)
    if http_json(url + "/api/version", 2)[0] == 200:
        show("Ollama answers at %s" % url)
        return url
    binary = shutil.which("ollama") or next(
        (p for p in ("/usr/local/bin/ollama", "/usr/bin/ollama") if os.access(p, os.X_OK)), None)
    if binary is None:
        command = request["install_command"]
        if OFFICIAL_INSTALLER in command and not root_or_passwordless_sudo():
            user = pwd.getpwuid(os.geteuid()).pw_name
            raise Failed("Ollama is not installed, and its official install script (%s) needs root: %s is "
                         "not root and has no passwordless sudo (there is no terminal to type a password). "
                         "Log in as root, give %s passwordless sudo, or install ollama yourself where %s's "
                         "PATH finds it (https://ollama.com/download/linux; or set CLAUDE_START_OLLAMA_INSTALL "
                         "to an install command that needs no root), then run --deploy again"
                         % (command, user, user, user))
        show("Ollama is not installed; installing it: %s (log: %s)" % (command, path(INSTALL_LOG)))
        status = run_logged(["sh", "-c", command], INSTALL_LOG, request["install_timeout"])
        binary = shutil.which("ollama") or next(
            (p for p in ("/usr/local/bin/ollama", "/usr/bin/ollama") if os.access(p, os.X_OK)), None)
        if status != 0 or binary is None:
            raise Failed("installing Ollama failed (%s); last lines of %s:\n%s\n"
                         "install it by hand (https://ollama.com/download/linux), then run --deploy again"
                         % ("exit %s" % status if status is not None else "timed out",
                            path(INSTALL_LOG), last_lines(INSTALL_LOG)))
    env = dict(os.environ)
    env["OLLAMA_HOST"] = url.split("://", 1)[1]
    pid = start_detached([binary, "serve"], OLLAMA_LOG, env)
    write(OLLAMA_PID, str(pid))
    show("started ollama serve (pid %d, log %s); waiting for it" % (pid, path(OLLAMA_LOG)))
    deadline = time.monotonic() + request["ollama_wait"]
    while time.monotonic() < deadline:
        if http_json(url + "/api/version", 2)[0] == 200:
            return url
        if not process_command(pid):
            break
        time.sleep(0.2)
    raise Failed("Ollama did not answer at %s within %s s%s; last lines of %s:\n%s"
                 % (url, request["ollama_wait"], "" if process_command(pid) else " (ollama serve exited)",
                    path(OLLAMA_LOG), last_lines(OLLAMA_LOG)))


def root_or_passwordless_sudo():
    """What Ollama's install script needs: it writes to /usr and adds a system user, through sudo
    when not root; here sudo cannot ask for a password."""
    if os.geteuid() == 0:
        return True
    if shutil.which("sudo") is None:
        return False
    try:
        return subprocess.run(["sudo", "-n", "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_logged(argv, log_name, timeout):
    """Run with output shown and kept in a log; the exit status, None on timeout."""
    deadline = time.monotonic() + timeout
    with open(path(log_name), "ab") as log:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        for line in iter(child.stdout.readline, b""):
            log.write(line)
            show("  " + line.decode("utf-8", "replace").rstrip())
            if time.monotonic() > deadline:
                break
        if time.monotonic() > deadline:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            return None
        return child.wait()


def step_models(request, url):
    """Pull each model `ollama list` lacks, showing Ollama's progress."""
    status, body = http_json(url + "/api/tags", 10)
    models = {m.get("name") for m in (body or {}).get("models", []) if isinstance(m, dict)}
    for model in request["models"]:
        if installed(model, models):
            continue
        show("pulling %s (not in `ollama list`)" % model)
        pull(url, model, request["pull_timeout"])


def pull(url, model, timeout):
    data = json.dumps({"model": model, "stream": True}).encode()
    request = urllib.request.Request(url + "/api/pull", data=data, headers={"Content-Type": "application/json"})
    deadline, last_shown, last_status = time.monotonic() + timeout, 0.0, None
    try:
        with NO_PROXY.open(request, timeout=60) as response:
            for line in response:
                if time.monotonic() > deadline:
                    raise Failed("pulling %s took over %s s: run `ollama pull %s` on the box, or raise "
                                 "CLAUDE_START_PULL_TIMEOUT" % (model, timeout, model))
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("error"):
                    raise Failed("Ollama could not pull %s: %s (check the name on https://ollama.com/library)"
                                 % (model, event["error"]))
                text = event.get("status", "")
                if event.get("total") and event.get("completed") is not None:
                    if time.monotonic() - last_shown < 2 and text == last_status:
                        continue
                    text += " %d%% of %.1f GB" % (100 * event["completed"] // event["total"], event["total"] / 1e9)
                elif text == last_status:
                    continue
                last_shown, last_status = time.monotonic(), event.get("status", "")
                show("  %s: %s" % (model, text))
    except urllib.error.HTTPError as error:
        raise Failed("Ollama refused to pull %s (HTTP %s)" % (model, error.code)) from None
    except OSError as error:
        raise Failed("pulling %s failed: %s" % (model, error)) from None


def step_proxy(request, settings):
    """The proxy runs with this file and these settings: left alone, restarted, or started."""
    port = request["port"]
    stamp = sha256((request["hashes"][PROXY_SCRIPT] + request["hashes"][PROXY_ENV]).encode())
    pid = pid_from(PROXY_PID, PROXY_SCRIPT)
    if pid and read(PROXY_STAMP) == stamp:
        show("proxy already running with this file and settings (pid %d)" % pid)
        return pid
    if pid:
        show("file or settings changed: restarting the proxy (pid %d)" % pid)
        if not stop_process(pid, float(settings.get("SHUTDOWN_GRACE") or 10) + 5):
            raise Failed("the old proxy (pid %d) did not stop: kill it on the box, then run --deploy again" % pid)
    if port_taken(port):
        raise Failed("port %d on the box is held by %s: stop it, or pick another port with --remote-port"
                     % (port, port_holder(port)))
    env = dict(os.environ)
    env.update(settings)
    pid = start_detached([sys.executable, PROXY_SCRIPT], PROXY_LOG, env)
    write(PROXY_PID, str(pid))
    write(PROXY_STAMP, stamp)
    show("started the proxy on 127.0.0.1:%d (pid %d, log %s)" % (port, pid, path(PROXY_LOG)))
    return pid


def proxy_health(port, settings, timeout=5):
    headers = {"x-api-key": settings["PROXY_API_KEY"]} if settings.get("PROXY_API_KEY") else {}
    return http_json("http://127.0.0.1:%d/health" % port, timeout, headers)


def step_wait(request, settings, pid):
    """Until /health says Ollama answers and every model is there."""
    port = request["port"]
    deadline = time.monotonic() + request["health_wait"]
    status, body = 0, None
    while time.monotonic() < deadline:
        if not process_command(pid):
            raise Failed("the proxy exited at start (%s); last lines of %s:\n%s"
                         % (exit_status(pid), path(PROXY_LOG), last_lines(PROXY_LOG)))
        status, body = proxy_health(port, settings)
        if status == 200 and isinstance(body, dict) and not missing_models(request, body):
            write(PROXY_INSTANCE, body.get("instance_id", ""), 0o644)
            redis_advice(body)
            tell("ready", body.get("instance_id", "-"), pid)
            return
        time.sleep(0.2)
    detail = "nothing answers" if status == 0 else "HTTP %d" % status
    if isinstance(body, dict) and status:
        if not body.get("ollama", {}).get("reachable", True):
            detail = "Ollama not reachable from the proxy: %s" % body["ollama"].get("error", "")
        elif missing_models(request, body):
            detail = "model(s) %s not in Ollama" % ", ".join(missing_models(request, body))
    raise Failed("the proxy's /health was not ready within %s s (%s); last lines of %s:\n%s"
                 % (request["health_wait"], detail, path(PROXY_LOG), last_lines(PROXY_LOG)))


def missing_models(request, body):
    models = body.get("ollama", {}).get("models")
    if models is None:
        return []
    return [m for m in request["models"] if not installed(m, models)]


def redis_advice(body):
    redis = body.get("cache", {}).get("redis", {})
    if "redis-py is not installed" not in str(redis.get("reason", "")):
        return
    managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
    show("warning: REDIS_URL is set but redis-py is missing on the box, so the proxy runs on its memory cache "
         "meanwhile. Install it with one of: python3 -m pip install --user redis%s | apt-get install python3-redis "
         "(Debian/Ubuntu) | python3 -m pip install --break-system-packages redis; then run --deploy again"
         % (" (this python is externally managed, PEP 668: pip may refuse)" if managed else ""))


###############################################################################
# Commands
###############################################################################

def command_up(request, uploads):
    if not step_files(request, uploads):
        return 0
    settings = env_settings()
    url = step_ollama(request, settings)
    step_models(request, url)
    pid = step_proxy(request, settings)
    step_wait(request, settings, pid)
    return 0


def command_stop(request, uploads):
    settings = env_settings()
    grace = float(settings.get("SHUTDOWN_GRACE") or 10) + 5
    pid = pid_from(PROXY_PID, PROXY_SCRIPT)
    if pid:
        show("stopping the proxy (pid %d)" % pid)
        if not stop_process(pid, grace):
            raise Failed("the proxy (pid %d) did not stop" % pid)
        show("proxy stopped")
    else:
        show("no proxy started by the launcher is running")
    for name in (PROXY_PID, PROXY_STAMP, PROXY_INSTANCE):
        if os.path.exists(path(name)):
            os.remove(path(name))
    if request.get("all"):
        pid = pid_from(OLLAMA_PID, "ollama")
        if pid:
            show("stopping ollama serve (pid %d)" % pid)
            if not stop_process(pid, 10):
                raise Failed("ollama serve (pid %d) did not stop" % pid)
            os.remove(path(OLLAMA_PID))
            show("ollama serve stopped")
        else:
            show("no ollama serve started by the launcher is running")
    return 0


def hop(name, status, detail):
    tell("hop", "%s|%s|%s" % (name, status, detail))


def command_probe(request, uploads):
    """What the proxy on the box says about itself, as hops; also its instance id."""
    settings = env_settings()
    port = request["port"]
    status, body = proxy_health(port, settings)
    where = "127.0.0.1:%d on the box" % port
    if status == 0:
        tell("health", "000")
        hop("remote proxy health", "failed", "nothing answers on %s: run the launcher with --deploy "
            "(or start `python3 simple_api_proxy.py` there with API_PORT=%d)" % (where, port))
        return 0
    if not isinstance(body, dict) or body.get("service") != "simple_api_proxy":
        tell("health", status)
        hop("remote proxy health", "failed", "%s answered /health with HTTP %d but it is not simple_api_proxy.py:"
            " check --remote-port" % (where, status))
        return 0
    tell("health", status)
    tell("instance", body.get("instance_id") or "-")
    pid = pid_from(PROXY_PID, PROXY_SCRIPT)
    hop("remote proxy health", "ok", "%s, HTTP %d%s" % (where, status, ", pid %d" % pid if pid else ""))
    ollama = body.get("ollama")
    if ollama is None:
        hop("ollama from proxy", "skipped", "/health gives details only with PROXY_API_KEY")
        return 0
    if not ollama.get("reachable"):
        hop("ollama from proxy", "failed", "Ollama not reachable from the proxy at %s (%s): start it on the box "
            "(ollama serve) or use --deploy" % (ollama.get("url"), ollama.get("error", "no answer")))
        return 0
    hop("ollama from proxy", "ok", "%s, version %s" % (ollama.get("url"), ollama.get("version")))
    for model in request["models"]:
        if installed(model, ollama.get("models") or []):
            hop("model", "ok", "%s installed" % model)
        else:
            hop("model", "failed", "model %s not installed (run: ollama pull %s, or use --deploy)" % (model, model))
    redis = body.get("cache", {}).get("redis", {})
    if redis.get("state") == "down":
        hop("redis", "warning", "Redis at %s is down (%s); the proxy serves from its memory cache"
            % (redis.get("url"), redis.get("last_error", "no answer")))
    elif "redis-py" in str(redis.get("reason", "")):
        hop("redis", "warning", "REDIS_URL is set but redis-py is missing on the box; memory cache only"
            " (see --deploy for how to install it)")
    elif redis.get("state") == "up":
        hop("redis", "ok", str(redis.get("url")))
    return 0


def command_ollama(request, uploads):
    """For several boxes behind a proxy on the laptop: only Ollama and the models on this one."""
    os.makedirs(FOLDER, mode=0o700, exist_ok=True)
    url = step_ollama(request, {})
    step_models(request, url)
    tell("ollama", url.split("://", 1)[1])
    return 0


def command_ollama_probe(request, uploads):
    url = ollama_url({})
    status, body = http_json(url + "/api/tags", 5)
    if status != 200:
        hop("ollama on box", "failed", "Ollama not answering at %s on the box: use --deploy, or start "
            "`ollama serve` there" % url)
        return 0
    tell("ollama", url.split("://", 1)[1])
    hop("ollama on box", "ok", url)
    models = {m.get("name") for m in (body or {}).get("models", []) if isinstance(m, dict)}
    for model in request["models"]:
        if installed(model, models):
            hop("model", "ok", "%s installed" % model)
        else:
            hop("model", "failed", "model %s not installed (run: ollama pull %s, or use --deploy)" % (model, model))
    return 0


COMMANDS = {"up": command_up, "stop": command_stop, "probe": command_probe, "ollama": command_ollama,
            "ollama_probe": command_ollama_probe}


def main(stream):
    request = json.loads(stream.readline())
    uploads = {}
    for name, size in request.get("sizes", {}).items():
        uploads[name] = stream.read(size)
    try:
        return COMMANDS[request["step"]](request, uploads)
    except Failed as failure:
        tell("fail", str(failure).replace("\n", "\n@more "))
        return 1


if __name__ == "__main__":
    # Run from the box itself (e.g. /root/onstart.sh): redo the last deploy.
    BOX_SOURCE = open(__file__).read()
    with open(os.path.join(FOLDER, LAST_DEPLOY)) as saved:
        last = json.load(saved)
    last["hashes"] = {name: sha256(open(path(name), "rb").read()) for name in UPLOADS}
    try:
        sys.exit(COMMANDS["up"](last, {}) if sys.argv[1:] in ([], ["up"]) else 2)
    except Failed as failure:
        show(str(failure))
        sys.exit(1)
PY
)
readonly BOX_PY

# The box's command line: check python3, then read the program's length, the
# program, and hand it the rest of stdin (a JSON request line and uploads).
readonly BOX_LOADER='command -v python3 >/dev/null 2>&1 || { echo "@fail python3 not found on the box: install python3 (3.8 or newer)"; exit 1; }
exec python3 -c "import sys
if sys.version_info < (3, 8):
    print(\"@fail python3 on the box is \" + sys.version.split()[0] + \", older than 3.8: install a newer one\")
    sys.exit(1)
b = sys.stdin.buffer
s = b.read(int(b.readline())).decode()
g = {\"__name__\": \"box\", \"BOX_SOURCE\": s}
exec(compile(s, \"box.py\", \"exec\"), g)
sys.exit(g[\"main\"](b))"'

# json_string TEXT: TEXT as a JSON string (for the few values the launcher sends).
json_string() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\r'/\\r}
    s=${s//$'\t'/\\t}
    printf '"%s"' "$s"
}

# sha256_of FILE: the hex digest, with whichever tool this laptop has.
sha256_of() {
    local out
    if have sha256sum; then
        out=$(sha256sum <"$1")
    elif have shasum; then
        out=$(shasum -a 256 <"$1")
    elif have openssl; then
        out=$(openssl dgst -sha256 <"$1")
        out=${out##* }
    else
        out=$(python3 -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())' <"$1")
    fi
    printf '%s' "${out%% *}"
}

# write_box_request FILE JSON [UPLOAD...]: the program, then one request line,
# then the named files' bytes (their sizes are in the JSON).
write_box_request() {
    local file=$1 json=$2 size LC_ALL=C
    shift 2
    size=${#BOX_PY}
    {
        printf '%s\n%s%s\n' "$size" "$BOX_PY" "$json"
        for upload in "$@"; do
            cat "$upload"
        done
    } >"$file"
}

# shellcheck disable=SC2317  # run through with_timeout
ssh_box() {
    ssh "${SSH_OPTS[@]}" -S "$CONTROL" -- "$SSH_HOST" "$BOX_LOADER" <"$1" 2>"$RUN_DIR/box.err"
}

# box_call SECONDS REQUEST_FILE: runs the box program; its "@" lines fill BOX_*,
# the rest is shown as it arrives. BOX_STATUS: 0 ok, 1 the box reported a
# failure (BOX_FAIL), 124 time out, 255 ssh failed (FAIL_REASON).
box_call() {
    local seconds=$1 request=$2 line rc=''
    BOX_FAIL='' BOX_NEED='' BOX_READY='' BOX_HEALTH='' BOX_INSTANCE='' BOX_OLLAMA=''
    BOX_HOPS=()
    while IFS= read -r line; do
        case $line in
            '@fail '*) BOX_FAIL=${line#@fail } ;;
            '@more '*) BOX_FAIL+=$'\n'${line#@more } ;;
            '@need '*) BOX_NEED=${line#@need } ;;
            '@ready '*) BOX_READY=${line#@ready } ;;
            '@health '*) BOX_HEALTH=${line#@health } ;;
            '@instance '*) BOX_INSTANCE=${line#@instance } ;;
            '@ollama '*) BOX_OLLAMA=${line#@ollama } ;;
            '@hop '*) BOX_HOPS+=("${line#@hop }") ;;
            '@status '*) rc=${line#@status } ;;
            *) say "box: $line" ;;
        esac
    done < <(
        rc=0
        with_timeout "$seconds" ssh_box "$request" || rc=$?
        printf '@status %s\n' "$rc"
    )
    BOX_STATUS=${rc:-255}
    case $BOX_STATUS in
        0) ;;
        124) FAIL_REASON="the box did not finish within $seconds s (ssh to $(ssh_target)): check the box, or the time limits in --help" ;;
        255) ssh_failure "$RUN_DIR/box.err" ;;
        *) BOX_STATUS=1
            if [[ -z $BOX_FAIL ]]; then
                BOX_FAIL="the box side failed: $(last_line "$(cat "$RUN_DIR/box.err" 2>/dev/null)")"
            fi
            FAIL_REASON=$BOX_FAIL ;;
    esac
    [[ $BOX_STATUS == 0 ]]
}

# The models the box must have: --model, MODEL_MAP's and OLLAMA_MODEL, once each.
required_models() {
    local models=" $MODEL " entry name list=()
    IFS=',' read -r -a list <<<"${MODEL_MAP:-}"
    for entry in ${list[@]+"${list[@]}"} "${OLLAMA_MODEL:-}"; do
        name=$(trim "${entry#*=}")
        [[ -z $name || $models == *" $name "* ]] || models+="$name "
    done
    printf '%s' "$models"
}

models_json() {
    local name out='' first=1
    for name in $(required_models); do
        ((first)) || out+=','
        out+=$(json_string "$name")
        first=0
    done
    printf '[%s]' "$out"
}

# The proxy's env file: the settings the user gave, and what the launcher decides.
write_proxy_env() {
    local file=$1 key value
    {
        printf 'API_HOST=127.0.0.1\nAPI_PORT=%s\nLOG_FILE=\n' "$REMOTE_PORT"
        [[ -n ${OLLAMA_MODEL:-} ]] || printf 'OLLAMA_MODEL=%s\n' "$MODEL"
        for key in $PROXY_SETTINGS; do
            value=${!key:-}
            [[ -n $value ]] || continue
            [[ $value != *$'\n'* ]] || die "$key must be one line"
            printf '%s=%s\n' "$key" "$value"
        done
    } >"$file"
}

# Sets the box up (see --help: --deploy). Sets BOX_INSTANCE.
deploy_box() {
    local env_file=$RUN_DIR/proxy.env request=$RUN_DIR/request json hashes seconds
    [[ -f $PROXY_SCRIPT ]] || die "proxy script $PROXY_SCRIPT not found: set CLAUDE_START_PROXY_SCRIPT to simple_api_proxy.py"
    (umask 077 && write_proxy_env "$env_file") || exit 1
    hashes="{\"simple_api_proxy.py\": \"$(sha256_of "$PROXY_SCRIPT")\", \"proxy.env\": \"$(sha256_of "$env_file")\"}"
    seconds=$((INSTALL_TIMEOUT + OLLAMA_WAIT + PULL_TIMEOUT * $(wc -w <<<"$(required_models)") + HEALTH_WAIT + 60))
    json="\"step\": \"up\", \"port\": $REMOTE_PORT, \"models\": $(models_json), \"hashes\": $hashes"
    json+=", \"install_command\": $(json_string "$OLLAMA_INSTALL"), \"install_timeout\": $INSTALL_TIMEOUT"
    json+=", \"ollama_wait\": $OLLAMA_WAIT, \"pull_timeout\": $PULL_TIMEOUT, \"health_wait\": $HEALTH_WAIT"
    say "deploying to $(ssh_target): ~/.simple_api_proxy/ (proxy on 127.0.0.1:$REMOTE_PORT, model(s): $(trim "$(required_models)"))"
    write_box_request "$request" "{$json, \"sizes\": {}}"
    box_call "$seconds" "$request" || die "deploy failed: $FAIL_REASON"
    if [[ -n $BOX_NEED ]]; then
        # The box lacks these files (or has other versions): send them, once.
        local sizes='' uploads=() name
        for name in $BOX_NEED; do
            case $name in
                simple_api_proxy.py) uploads+=("$PROXY_SCRIPT") ;;
                proxy.env) uploads+=("$env_file") ;;
                *) die "the box asked for an unknown file '$name'" ;;
            esac
            sizes+="${sizes:+, }\"$name\": $(wc -c <"${uploads[${#uploads[@]}-1]}" | tr -d ' ')"
            say "copying $name to the box"
        done
        write_box_request "$request" "{$json, \"sizes\": {$sizes}}" "${uploads[@]}"
        box_call "$seconds" "$request" || die "deploy failed: $FAIL_REASON"
    fi
    rm -f "$env_file" "$request"
    [[ -n $BOX_READY ]] || die "deploy failed: the box did not report the proxy ready"
    BOX_INSTANCE=${BOX_READY%% *}
    say "box ready: proxy pid ${BOX_READY#* }, instance $BOX_INSTANCE, log ~/.simple_api_proxy/proxy.log"
}

# box_step JSON: a box call that only looks or stops.
box_step() {
    write_box_request "$RUN_DIR/request" "{$1, \"port\": $REMOTE_PORT, \"models\": $(models_json), \"sizes\": {}}"
    box_call "$BOX_CALL_TIMEOUT" "$RUN_DIR/request"
}

# Asks the box how its proxy is. Sets HEALTH_CODE, BOX_INSTANCE, BOX_HOPS and
# FAIL_REASON; status 0 = proxy up, 1 = ssh or the box failed, 2 = proxy down.
probe_box() {
    box_step '"step": "probe"' || return 1
    HEALTH_CODE=$BOX_HEALTH
    is_up_status "$HEALTH_CODE" && return 0
    local hop
    for hop in ${BOX_HOPS[@]+"${BOX_HOPS[@]}"}; do
        [[ $hop == "remote proxy health|failed|"* ]] && FAIL_REASON="remote proxy down: ${hop#*|failed|}"
    done
    return 2
}

# Says what the box reported that the user should know before the session.
warn_box_hops() {
    local hop name status detail
    for hop in ${BOX_HOPS[@]+"${BOX_HOPS[@]}"}; do
        IFS='|' read -r name status detail <<<"$hop"
        case $status in failed | warning) say "warning: $detail; continuing" ;; esac
        # The same fact as a 503 through the tunnel: say it once.
        [[ $name != "ollama from proxy" || $status != failed ]] || OLLAMA_WARNED=1
    done
}

# ---------------------------------------------------------------- tunnel

tunnel_log() { printf '%s' "${TMPDIR:-/tmp}/claude_start.ssh.$1.log"; }

# start_tunnel_ssh PORT: the tunnel's own ssh (not the shared connection: the
# tunnel must be reopened alone). ExitOnForwardFailure: if it cannot hold the
# local port itself, it exits instead of running without a tunnel. Its output
# goes to a log, away from Claude Code's screen and this script's stdout.
start_tunnel_ssh() {
    ssh -N -L "$1:$TUNNEL_TARGET" -o ExitOnForwardFailure=yes -o ControlPath=none \
        "${SSH_OPTS[@]}" -- "$SSH_HOST" </dev/null >"$(tunnel_log "$1")" 2>&1 &
}

# Opens the tunnel on PORT (unless TUNNEL_PID already runs one) and waits until
# the box's own proxy (BOX_INSTANCE) answers through it; a port that another
# launcher's tunnel took first is given up for the next free one. Sets
# TUNNEL_PID and FAIL_REASON.
open_tunnel() {
    local rc tries=0 last='' log why
    ssh_common_opts
    while :; do
        log=$(tunnel_log "$PORT")
        if [[ -z $TUNNEL_PID ]]; then
            start_tunnel_ssh "$PORT"
            TUNNEL_PID=$!
        fi
        rc=0
        wait_for_health "http://127.0.0.1:$PORT$TUNNEL_PROBE" "$HEALTH_WAIT" "$TUNNEL_PID" "$BOX_INSTANCE" || rc=$?
        case $rc in
            0) return 0 ;;
            2) rc=0
                wait "$TUNNEL_PID" 2>/dev/null || rc=$?
                TUNNEL_PID=''
                last=''
                [[ -r $log ]] && last=$(last_line "$(<"$log")")
                last=${last%.}
                # ssh says "bind [127.0.0.1]:PORT: Address already in use" when another
                # process took the port since it was found free; other refusals are final.
                if [[ ! -r $log || $(<"$log") != *"Address already in use"* ]]; then
                    FAIL_REASON="ssh tunnel to $(ssh_target) exited (code $rc)${last:+: $last}; check that you can run: ssh ${SSH_PORT:+-p $SSH_PORT }-N -L $PORT:$TUNNEL_TARGET $SSH_HOST (log: $log)"
                    return 1
                fi
                why="local port $PORT was taken before the tunnel could hold it" ;;
            3) close_tunnel
                why="127.0.0.1:$PORT answers for a proxy that is not the one on $SSH_HOST (another tunnel holds the port)" ;;
            *) FAIL_REASON="${TUNNEL_PROBE#/} did not answer on http://127.0.0.1:$PORT$TUNNEL_PROBE through the tunnel within $HEALTH_WAIT s: check the proxy on $SSH_HOST, or raise CLAUDE_START_HEALTH_WAIT (ssh log: $log)"
                return 1 ;;
        esac
        tries=$((tries + 1))
        if ((tries >= TUNNEL_TRIES)) || ! PORT=$(find_free_port $((PORT + 1))); then
            FAIL_REASON="ssh tunnel to $(ssh_target) could not hold a local port ($tries tried; last: $why${last:+: $last}): pass a free --local-port (log: $log)"
            return 1
        fi
        say "$why; trying $PORT"
    done
}

# keep_tunnel (in the background while Claude Code runs): whenever the tunnel's
# ssh exits, open a new one on the same port, so Claude Code's own retries carry
# the session on; keep trying while the box is unreachable.
# shellcheck disable=SC2317  # the TERM trap
keep_tunnel() {
    local pid=$TUNNEL_PID child='' down_since rc
    trap '[[ -z $child ]] || kill "$child" 2>/dev/null; exit 0' TERM
    while :; do
        if [[ -n $child ]]; then
            wait "$child" 2>/dev/null || true
        else
            # Not this subshell's child: poll. `wait` on the nap lets TERM in at once.
            while kill -0 "$pid" 2>/dev/null; do
                sleep 0.5 &
                wait $! || true
            done
        fi
        say "tunnel to $SSH_HOST dropped (see $(tunnel_log "$PORT")); reopening 127.0.0.1:$PORT"
        down_since=$SECONDS
        while :; do
            start_tunnel_ssh "$PORT"
            child=$!
            rc=0
            wait_for_health "http://127.0.0.1:$PORT$TUNNEL_PROBE" 10 "$child" "$BOX_INSTANCE" || rc=$?
            if ((rc == 3)); then
                # Another proxy instance answers: the box's proxy restarted, or another
                # tunnel took the port. An ssh that could not bind the port exits
                # (ExitOnForwardFailure); one still running after a pause holds it.
                sleep 2 &
                wait $! || true
                fetch_health "http://127.0.0.1:$PORT$TUNNEL_PROBE" 2
                if kill -0 "$child" 2>/dev/null && is_up_status "$HEALTH_CODE"; then
                    say "the proxy on $SSH_HOST restarted (instance $HEALTH_INSTANCE, was $BOX_INSTANCE)"
                    BOX_INSTANCE=$HEALTH_INSTANCE
                    rc=0
                fi
            fi
            if ((rc == 0)); then
                say "tunnel 127.0.0.1:$PORT -> $SSH_HOST reopened after $((SECONDS - down_since)) s (ssh pid $child)"
                break
            fi
            kill "$child" 2>/dev/null || true
            wait "$child" 2>/dev/null || true
            child=''
            if (((SECONDS - down_since) % 30 < 3)); then
                say "cannot reopen the tunnel to $SSH_HOST yet ($(last_line "$(cat "$(tunnel_log "$PORT")" 2>/dev/null)")); still trying"
            fi
            sleep 2 &
            wait $! || true
        done
    done
}

start_remote() {
    [[ -n $SSH_HOST ]] || die "$(no_host_message)"
    have ssh || die "ssh not found on PATH: install the OpenSSH client, or use --local for a proxy on this machine"
    TUNNEL_TARGET=127.0.0.1:$REMOTE_PORT
    open_master || die "$FAIL_REASON"
    # The tunnel connects while the box is checked or set up.
    pick_local_port || die "$FAIL_REASON"
    start_tunnel_ssh "$PORT"
    TUNNEL_PID=$!
    if ((DEPLOY)); then
        deploy_box
    else
        local rc=0
        probe_box || rc=$?
        ((rc == 0)) || die "$FAIL_REASON"
        warn_box_hops
        warn_status "$HEALTH_CODE" "$SSH_HOST:$REMOTE_PORT"
        [[ $BOX_INSTANCE != - ]] || BOX_INSTANCE=''
    fi
    close_master
    open_tunnel || die "$FAIL_REASON"
    warn_status "$HEALTH_CODE" "127.0.0.1:$PORT"
    say "tunnel 127.0.0.1:$PORT -> $SSH_HOST:127.0.0.1:$REMOTE_PORT is up (ssh pid $TUNNEL_PID)"
}

stop_box() {
    [[ -n $SSH_HOST ]] || die "$(no_host_message)"
    have ssh || die "ssh not found on PATH: install the OpenSSH client"
    open_master || die "$FAIL_REASON"
    box_step "\"step\": \"stop\", \"all\": $( ((STOP_ALL)) && echo true || echo false)" || die "stop failed: $FAIL_REASON"
}

# ---------------------------------------------------------------- several boxes
#
# With --ssh given more than once, each box runs only Ollama and the proxy runs
# here: one tunnel per box to that box's Ollama, and OLLAMA_HOST lists the
# tunnels, so the proxy spreads requests over the boxes and fails over.

# use_box INDEX: makes box INDEX the one the single-box functions work on.
use_box() {
    SSH_HOST=${SSH_HOSTS[$1]}
    CONTROL=$SOCKET_DIR/ssh.$1
    MASTER_OPEN=0
    BOX_INSTANCE=''
}

# Readies box INDEX (with --deploy: Ollama started or installed, models pulled),
# then opens its tunnel on a free port from FROM up. Sets PORT and TUNNEL_PID.
ready_box() {
    local index=$1 from=$2 step=ollama_probe seconds=$BOX_CALL_TIMEOUT hop name status detail json
    use_box "$index"
    open_master || die "$FAIL_REASON"
    if ((DEPLOY)); then
        step=ollama
        seconds=$((INSTALL_TIMEOUT + OLLAMA_WAIT + PULL_TIMEOUT * $(wc -w <<<"$(required_models)") + 60))
        say "preparing Ollama on $(ssh_target), model(s): $(trim "$(required_models)")"
    fi
    json="\"step\": \"$step\", \"models\": $(models_json), \"sizes\": {}"
    json+=", \"install_command\": $(json_string "$OLLAMA_INSTALL"), \"install_timeout\": $INSTALL_TIMEOUT"
    json+=", \"ollama_wait\": $OLLAMA_WAIT, \"pull_timeout\": $PULL_TIMEOUT"
    write_box_request "$RUN_DIR/request" "{$json}"
    box_call "$seconds" "$RUN_DIR/request" || die "$SSH_HOST: $FAIL_REASON"
    close_master
    for hop in ${BOX_HOPS[@]+"${BOX_HOPS[@]}"}; do
        IFS='|' read -r name status detail <<<"$hop"
        [[ $status != failed ]] || die "$SSH_HOST: $detail"
    done
    [[ -n $BOX_OLLAMA ]] || die "$SSH_HOST: the box did not say where Ollama listens"
    TUNNEL_TARGET=$BOX_OLLAMA
    TUNNEL_PROBE=/api/version
    PORT=$(find_free_port "$from") || die "no free local port from $from for the tunnel to $SSH_HOST"
    TUNNEL_PID=''
    open_tunnel || die "$FAIL_REASON"
    say "tunnel 127.0.0.1:$PORT -> $SSH_HOST:$TUNNEL_TARGET (Ollama) is up (ssh pid $TUNNEL_PID)"
}

start_boxes() {
    have ssh || die "ssh not found on PATH: install the OpenSSH client"
    local i hosts='' proxy_port
    pick_local_port || die "$FAIL_REASON"
    proxy_port=$PORT
    for ((i = 0; i < ${#SSH_HOSTS[@]}; i++)); do
        ready_box "$i" $((proxy_port + 1 + i))
        TUNNEL_PIDS+=("$TUNNEL_PID")
        TUNNEL_PORTS+=("$PORT")
        TUNNEL_TARGETS+=("$TUNNEL_TARGET")
        TUNNEL_PID=''
        hosts+="${hosts:+,}127.0.0.1:$PORT"
    done
    # The proxy here gets the tunnels as its Ollama hosts.
    export OLLAMA_HOST=$hosts OLLAMA_MODEL=${OLLAMA_MODEL:-$MODEL}
    PORT=$proxy_port
    start_proxy || die "$FAIL_REASON"
    say "proxy on 127.0.0.1:$PORT spreads requests over ${#SSH_HOSTS[@]} boxes (OLLAMA_HOST=$hosts)"
}

# One keeper per box tunnel while Claude Code runs.
start_box_keepers() {
    local i proxy_port=$PORT
    ((${#TUNNEL_PIDS[@]} > 0)) || return 0
    for ((i = 0; i < ${#TUNNEL_PIDS[@]}; i++)); do
        use_box "$i"
        PORT=${TUNNEL_PORTS[i]} TUNNEL_PID=${TUNNEL_PIDS[i]} TUNNEL_TARGET=${TUNNEL_TARGETS[i]}
        TUNNEL_PROBE=/api/version
        keep_tunnel &
        KEEPER_PIDS+=($!)
    done
    TUNNEL_PID=''
    PORT=$proxy_port
}

check_box_hops() {
    local i line name status detail
    for ((i = 0; i < ${#SSH_HOSTS[@]}; i++)); do
        use_box "$i"
        if ! have ssh || ! open_master; then
            hop "ssh reachable" failed "$SSH_HOST: ${FAIL_REASON:-ssh not found on PATH}"
            continue
        fi
        hop "ssh reachable" ok "$(ssh_target)"
        if ! box_step '"step": "ollama_probe"'; then
            hop "ollama on box" failed "$SSH_HOST: $FAIL_REASON"
            close_master
            continue
        fi
        close_master
        for line in ${BOX_HOPS[@]+"${BOX_HOPS[@]}"}; do
            IFS='|' read -r name status detail <<<"$line"
            hop "$name" "$status" "$SSH_HOST: $detail"
        done
        [[ -n $BOX_OLLAMA ]] || continue
        TUNNEL_TARGET=$BOX_OLLAMA TUNNEL_PROBE=/api/version TUNNEL_PID=''
        if PORT=$(find_free_port $((LOCAL_PORT + 1 + i))) && open_tunnel; then
            hop "tunnel" ok "127.0.0.1:$PORT -> $SSH_HOST:$TUNNEL_TARGET (Ollama), ssh pid $TUNNEL_PID"
        else
            hop "tunnel" failed "$SSH_HOST: ${FAIL_REASON:-no free local port}"
        fi
        close_tunnel
    done
    if [[ -f $PROXY_SCRIPT ]] && have python3; then
        hop "local proxy" ok "$PROXY_SCRIPT starts here with the tunnels as OLLAMA_HOST"
    else
        hop "local proxy" failed "$PROXY_SCRIPT cannot be started here (missing file or python3): set CLAUDE_START_PROXY_SCRIPT"
    fi
}

stop_boxes() {
    local i failed=0
    for ((i = 0; i < ${#SSH_HOSTS[@]}; i++)); do
        use_box "$i"
        if ! open_master || ! box_step "\"step\": \"stop\", \"all\": $( ((STOP_ALL)) && echo true || echo false)"; then
            say "$SSH_HOST: stop failed: $FAIL_REASON"
            failed=1
        fi
        close_master
    done
    ((failed == 0)) || exit 1
}

# ---------------------------------------------------------------- local side

# Starts the proxy on PORT and waits for it. Sets PROXY_PID and FAIL_REASON.
start_proxy() {
    local log="${TMPDIR:-/tmp}/simple_api_proxy.$PORT.log" rc=0 key
    [[ -f $PROXY_SCRIPT ]] || {
        FAIL_REASON="proxy script $PROXY_SCRIPT not found: set CLAUDE_START_PROXY_SCRIPT to simple_api_proxy.py"
        return 1
    }
    have python3 || {
        FAIL_REASON="python3 not found on PATH: install it to run $PROXY_SCRIPT"
        return 1
    }
    # Settings from the config file too, not only the environment.
    for key in $PROXY_SETTINGS; do
        [[ -z ${!key:-} ]] || export "${key?}"
    done
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
    fetch_health "http://127.0.0.1:$LOCAL_PORT/health" 2
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
    # One file read, command output or MCP result at most about a quarter of the
    # window (Claude Code's defaults, 25k tokens a read, outgrow a 32k window);
    # command output is counted in characters, three or four to a token, hence
    # three quarters of the window in characters. Values the user set win.
    export CLAUDE_CODE_FILE_READ_MAX_OUTPUT_TOKENS="${CLAUDE_CODE_FILE_READ_MAX_OUTPUT_TOKENS:-$((CONTEXT_TOKENS / 4))}"
    export MAX_MCP_OUTPUT_TOKENS="${MAX_MCP_OUTPUT_TOKENS:-$((CONTEXT_TOKENS / 4))}"
    export BASH_MAX_OUTPUT_LENGTH="${BASH_MAX_OUTPUT_LENGTH:-$((CONTEXT_TOKENS * 3 / 4))}"
    local claude_args=(--model "$MODEL")
    if ((LEAN)); then
        claude_args+=(--disallowedTools "Agent,ListAgents,ReportFindings,ScheduleWakeup,Skill,Workflow,ToolSearch,\
CronCreate,CronDelete,CronList,EnterWorktree,ExitWorktree,Monitor,NotebookEdit,SendMessage,TaskStop,WebFetch,WebSearch")
    fi
    # Claude Code runs in the background with this terminal as its input, so
    # that `wait` returns at once when a signal comes (bash runs traps only
    # between commands) and the signal is forwarded (see on_signal). It stays in
    # the terminal's process group, so it still owns the screen and keyboard.
    # No exec: the EXIT trap must still run.
    : >"$RUN_DIR/claude.started"
    claude "${claude_args[@]}" ${CLAUDE_ARGS[@]+"${CLAUDE_ARGS[@]}"} <&0 &
    CLAUDE_PID=$!
    if [[ -n $TUNNEL_PID ]]; then
        keep_tunnel &
        KEEPER_PID=$!
    fi
    start_box_keepers
    wait "$CLAUDE_PID" || rc=$?
    CLAUDE_PID=''
    stop_keeper
    resume_hint
    if [[ $MODE == remote ]]; then
        say "the box $SSH_HOST keeps running (and billing) with the proxy on it: stop the proxy with $(launch_command stop) --stop --all, and stop or destroy the instance with your provider when done"
    elif [[ $MODE == boxes ]]; then
        say "the boxes ${SSH_HOSTS[*]} keep running (and billing) with Ollama on them: stop it with $(launch_command stop) --stop --all, and stop or destroy the instances with your provider when done"
    fi
    return "$rc"
}

# launch_command [stop]: this launcher's command line as the user gave it
# (without --deploy, or for --stop only the connection flags).
launch_command() {
    local args=() i=0 arg
    if [[ ${1:-} == stop ]]; then
        while ((i < ${#LAUNCH_ARGS[@]})); do
            arg=${LAUNCH_ARGS[i]}
            case $arg in
                --ssh | --ssh-port | --remote-port | --config) args+=("$arg" "${LAUNCH_ARGS[i + 1]}")
                    i=$((i + 1)) ;;
                --ssh=* | --ssh-port=* | --remote-port=* | --config=*) args+=("$arg") ;;
            esac
            i=$((i + 1))
        done
    else
        args=(${LAUNCH_ARGS[@]+"${LAUNCH_ARGS[@]}"})
    fi
    printf '%q' "$0"
    ((${#args[@]} == 0)) || printf ' %q' "${args[@]}"
}

# Claude Code's own resume hint (`claude --resume ID`) would bypass the proxy;
# say how to resume through this launcher instead, when the session was saved.
resume_hint() {
    local dir=${CLAUDE_CONFIG_DIR:-$HOME/.claude}/projects file newest='' id
    [[ -d $dir ]] || return 0
    while IFS= read -r file; do
        if [[ -z $newest || $file -nt $newest ]]; then
            newest=$file
        fi
    done < <(find "$dir" -name '*.jsonl' -type f -newer "$RUN_DIR/claude.started" 2>/dev/null)
    id=${newest##*/}
    id=${id%.jsonl}
    [[ $id =~ ^[0-9a-fA-F-]{36}$ ]] || return 0
    say "resume this conversation with: $(launch_command) -- --resume $id"
}

stop_keeper() {
    local pid
    for pid in $KEEPER_PID ${KEEPER_PIDS[@]+"${KEEPER_PIDS[@]}"}; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    KEEPER_PID=''
    KEEPER_PIDS=()
}

# on_signal NAME STATUS: pass the signal on to Claude Code, give it a moment to
# finish, then exit (the EXIT trap closes the tunnel).
# shellcheck disable=SC2317  # called by traps
on_signal() {
    local name=$1 status=$2 i
    trap '' INT TERM HUP
    if [[ -n $CLAUDE_PID ]] && kill "-$name" "$CLAUDE_PID" 2>/dev/null; then
        for ((i = 0; i < 30; i++)); do
            kill -0 "$CLAUDE_PID" 2>/dev/null || break
            sleep 0.1
        done
        stop_pid "$CLAUDE_PID"
    fi
    exit "$status"
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
    local remote_ok=0 skip='' rc=0 line name status detail
    if [[ -z $SSH_HOST ]]; then
        hop "ssh reachable" failed "$(no_host_message)"
        skip="no ssh host"
    elif ! have ssh; then
        hop "ssh reachable" failed "ssh not found on PATH"
        skip="no ssh"
    elif ! open_master; then
        hop "ssh reachable" failed "$FAIL_REASON"
        skip="ssh failed"
    else
        hop "ssh reachable" ok "$(ssh_target)"
        probe_box || rc=$?
        if ((rc == 1)); then
            hop "remote proxy health" failed "$FAIL_REASON"
            skip="the box check failed"
        else
            # The box's own view: the proxy, Ollama as the proxy sees it, each model, Redis.
            for line in ${BOX_HOPS[@]+"${BOX_HOPS[@]}"}; do
                IFS='|' read -r name status detail <<<"$line"
                hop "$name" "$status" "$detail"
            done
            if ((rc == 0)); then
                remote_ok=1
            else
                skip="remote proxy down"
            fi
        fi
        close_master
        [[ $BOX_INSTANCE != - ]] || BOX_INSTANCE=''
    fi
    if ((remote_ok == 0)); then
        [[ $skip == "remote proxy down" ]] || hop "remote proxy health" failed "not checked: $skip"
        hop "tunnel" failed "not tried: $skip"
        hop "local health" failed "not tried: $skip"
        return
    fi
    TUNNEL_TARGET=127.0.0.1:$REMOTE_PORT
    if pick_local_port && open_tunnel; then
        hop "tunnel" ok "127.0.0.1:$PORT -> $SSH_HOST:127.0.0.1:$REMOTE_PORT, ssh pid $TUNNEL_PID"
        status_note "$HEALTH_CODE"
        hop "local health" ok "http://127.0.0.1:$PORT/health, $NOTE${HEALTH_INSTANCE:+, instance $HEALTH_INSTANCE as on the box}"
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
    fetch_health "http://127.0.0.1:$LOCAL_PORT/health" 2
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
    elif [[ $MODE == boxes ]]; then
        check_box_hops
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
    stop_keeper
    close_tunnel
    local pid
    for pid in ${TUNNEL_PIDS[@]+"${TUNNEL_PIDS[@]}"}; do
        stop_pid "$pid"
    done
    TUNNEL_PIDS=()
    close_master
    # Only a proxy this run started; one that was already running stays.
    if [[ -n $PROXY_PID ]]; then
        stop_pid "$PROXY_PID"
        PROXY_PID=''
    fi
    [[ -z $RUN_DIR ]] || rm -rf "$RUN_DIR" "$SOCKET_DIR"
}

main() {
    trap cleanup EXIT
    trap 'on_signal INT 130' INT
    trap 'on_signal TERM 143' TERM
    trap 'on_signal HUP 129' HUP
    parse_args "$@"
    check_modes
    resolve_settings
    have curl || have python3 ||
        die "neither curl nor python3 found: install one of them (needed to check the proxy health)"
    make_run_dir
    if ((STOP)); then
        if [[ $MODE == boxes ]]; then
            stop_boxes
        else
            stop_box
        fi
        exit 0
    fi
    if ((CHECK)); then
        local status=0
        run_check || status=$?
        exit "$status"
    fi
    require_claude
    case $MODE in
        local) start_local ;;
        boxes) start_boxes ;;
        *) start_remote ;;
    esac
    local rc=0
    run_claude || rc=$?
    exit "$rc"
}

main "$@"
