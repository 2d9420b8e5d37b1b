#!/usr/bin/env python3
"""claude_start: start Claude Code (the `claude` CLI) against simple_api_proxy.py.

The proxy speaks the Anthropic Messages API and forwards to Ollama. This is the laptop side,
run through ./claude_start.sh (standard library only, python3 >= 3.8):
  remote (default)  the proxy runs on a GPU box: check it over ssh, open an ssh tunnel
                    127.0.0.1:LOCAL -> box:127.0.0.1:REMOTE, run claude through it (reopening
                    the tunnel if it drops), and close that tunnel (and only it) on exit.
  several --ssh     each box runs Ollama only; one tunnel per box, and the proxy runs here
                    with OLLAMA_HOST listing the tunnels.
  --local           the proxy runs on this machine: use the one that answers, or start
                    simple_api_proxy.py and stop it again on exit.
  --deploy          (with remote) first set the box up (claude_box.py, sent over ssh).
  --stop [--all]    stop the box's proxy (--all: also the ollama serve it started).
  --check           report each hop as ok/failed and exit.
  --vast            the box is our vast.ai instance: found by its label, started or rented, then
                    deployed as with --deploy; the provider is claude_vast.py beside this file.
Settings: flag > environment > config file (KEY=VALUE lines) > default.

The proxy's setting names, its OLLAMA_HOST address rules and Ollama's model naming come from the
simple_api_proxy.py beside this file, never from a copy.

Sections, each using only those above it: messages; settings; the run folder; probes (health,
free ports); the SSH connection; a box; the tunnel and its keeper; the local proxy; the Claude
Code run; --check; the launcher; main().
"""

import os
import shutil
import sys

if sys.version_info < (3, 8):  # before anything newer is parsed or imported: a newer one, or what to do
    for newer in ("python3.14", "python3.13", "python3.12", "python3.11", "python3.10", "python3.9", "python3.8"):
        if shutil.which(newer) and not os.environ.get("CLAUDE_START_OLD_PYTHON"):
            os.environ["CLAUDE_START_OLD_PYTHON"] = sys.version.split()[0]
            os.execvp(newer, [newer, "-S", os.path.abspath(__file__)] + sys.argv[1:])
    sys.stderr.write("claude_start: python3 is %s here, older than 3.8: install python3 3.8 or newer (macOS: "
                     "brew install python3; Debian/Ubuntu: apt-get install python3), then run this again\n"
                     % os.environ.get("CLAUDE_START_OLD_PYTHON", sys.version.split()[0]))
    sys.exit(1)

import dataclasses  # noqa: E402 (after the version check)
import functools
import hashlib
import inspect
import json
import logging
import queue
import re
import shlex
import signal
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import simple_api_proxy as proxy  # noqa: E402  (the proxy beside this file: its settings and rules)
import claude_vast  # noqa: E402  (renting the box on vast.ai: --vast)

PROG = "claude_start"
log = logging.getLogger(PROG)
log.setLevel(logging.INFO)

DEFAULT_MODEL = "qwen2.5-coder:7b"
# Matches the proxy's default OLLAMA_NUM_CTX, so Claude Code compacts before Ollama silently
# truncates the prompt.
DEFAULT_CONTEXT_TOKENS = 32768
DEFAULT_MAX_OUTPUT_TOKENS = 8192
# Claude Code (2.1.332) compacts once the conversation reaches its window less its output limit
# (at most 20,000) less a 13,000-token buffer kept for the summary.
CLAUDE_CODE_SUMMARY_BUFFER = 13000
CLAUDE_CODE_OUTPUT_RESERVE_CAP = 20000
DEFAULT_API_TIMEOUT_MS = 600000
DEFAULT_REMOTE_PORT = 8000
DEFAULT_LOCAL_PORT = 8001
DEFAULT_HEALTH_WAIT = 30
# Placeholder token: Claude Code refuses to start without one; the proxy only checks it when
# PROXY_API_KEY is set on its side.
DUMMY_AUTH_TOKEN = "simple-api-proxy"
PORT_TRIES = 20
SSH_ALIVE_INTERVAL = 15
SSH_CONNECT_TIMEOUT = 10
DEFAULT_OLLAMA_INSTALL = "curl -fsSL https://ollama.com/install.sh | sh"
DEFAULT_INSTALL_TIMEOUT = 900
DEFAULT_OLLAMA_WAIT = 60
DEFAULT_PULL_TIMEOUT = 3600
# Seconds for box calls that only look or stop (the deploy call gets the sum of its steps').
BOX_CALL_TIMEOUT = 60
TUNNEL_TRIES = 5
# Seconds a process gets between SIGTERM and SIGKILL when the launcher stops it.
STOP_GRACE = 3
BOX_PROGRAM = HERE / "claude_box.py"
BOX_FOLDER = "~/.simple_api_proxy"

# The proxy's own settings: taken from the environment or the config file and sent, by --deploy,
# as JSON to a mode-0600 file on the box (a command line would show them in ps). All of the
# proxy's SETTINGS but the ones the launcher decides itself.
LAUNCHER_OWNED_SETTINGS = ("API_HOST", "API_PORT", "LOG_FILE")
PROXY_SETTINGS = tuple(name for name, *_ in proxy.SETTINGS if name not in LAUNCHER_OWNED_SETTINGS)
LAUNCHER_VARIABLES = (
    "CLAUDE_START_SSH", "CLAUDE_START_SSH_PORT", "CLAUDE_START_REMOTE_PORT", "CLAUDE_START_LOCAL_PORT",
    "CLAUDE_START_MODEL", "CLAUDE_START_CONTEXT_TOKENS", "CLAUDE_START_MAX_OUTPUT_TOKENS", "API_TIMEOUT_MS",
    "CLAUDE_START_PROXY_SCRIPT", "CLAUDE_START_HEALTH_WAIT", "CLAUDE_START_OLLAMA_INSTALL",
    "CLAUDE_START_INSTALL_TIMEOUT", "CLAUDE_START_OLLAMA_WAIT", "CLAUDE_START_PULL_TIMEOUT",
)
CONFIG_KEYS = LAUNCHER_VARIABLES + PROXY_SETTINGS
# Claude Code tools a local model rarely uses well (--lean).
LEAN_LEFT_OUT = ("Agent", "ListAgents", "ReportFindings", "ScheduleWakeup", "Skill", "Workflow", "ToolSearch",
                 "CronCreate", "CronDelete", "CronList", "EnterWorktree", "ExitWorktree", "Monitor", "NotebookEdit",
                 "SendMessage", "TaskStop", "WebFetch", "WebSearch")


###############################################################################
# Messages
###############################################################################

class Failure(Exception):
    """The launcher cannot go on: one message that says what to do, and the exit status."""

    status = 1

    def __init__(self, message):
        super().__init__(message)
        self.message = message


class UsageError(Failure):
    """Flags or settings that cannot work, refused before anything runs."""

    status = 2

    def __init__(self, message):
        super().__init__(message + " (see --help)")


class Interrupted(Exception):
    """A signal ended the run; the exit status is 128 + its number."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


def setup_logging():
    """Every message goes to stderr as "claude_start: ...", away from Claude Code's stdout."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(PROG + ": %(message)s"))
        log.addHandler(handler)


def say(text):
    log.info("%s", text)


def last_line(text):
    """The last non-empty line of text (for quoting ssh's complaint)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def read_text(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


###############################################################################
# Settings
###############################################################################

USAGE = """\
Usage: claude_start.sh [--ssh USER@HOST] [--ssh-port P] [--remote-port 8000]
                       [--local-port 8001] [--model NAME] [--config FILE]
                       [--deploy | --stop [--all] | --local | --check] [--lean]
                       [-- CLAUDE_ARGS...]
       claude_start.sh --vast [--gpu NAMES] [--max-price USD] [--disk GB] [--model NAME]
                       [--idle-stop 30m] [--on-exit keep|stop|destroy] [-- CLAUDE_ARGS...]
       claude_start.sh --vast --status | --stop | --destroy [--yes] | --check

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
                      settings below in a mode-0600 file (and, unless you set
                      PROXY_API_KEY, a random key made for that box), wait for
                      /health. Same file and settings: the running proxy is left alone.
  --stop              stop the proxy on the box (--stop --all: also the
                      ollama serve that --deploy started)
  --local             no ssh: use the proxy on 127.0.0.1:LOCAL, or start
                      simple_api_proxy.py in the background (stopped on exit)
  --check             print each hop (ssh reachable, remote proxy health, Ollama
                      as the proxy sees it, each model, Redis if set, tunnel,
                      local health, claude on PATH) as ok/failed/warning, then
                      exit (status 1 if any failed); combine with --local to
                      check the local setup

Rent the box on vast.ai (key: VAST_API_KEY or ~/.config/vastai/vast_api_key; API: VAST_URL):
  --vast              use our instance (label --vast-label): a running one, else start
                      a stopped one, else rent the cheapest offer that fits; wait for
                      it, then --deploy and run claude as above. A rental not usable
                      within --boot-timeout is destroyed
  --vast --status     our instances (state, GPU, $/h, uptime, cost, idle time), credit
  --vast --stop       stop them; --vast --destroy destroys them (asks unless --yes)
  --vast --check      the checks above, on our running instance
  --gpu "RTX 4090,RTX 3090"  GPUs to rent (default: any)
  --max-price USD     at most this per hour, the disk's storage included
  --disk GB           disk to rent (40)
  --idle-stop 30m     the box stops itself after this long without requests and
                      without a launcher attached ("off": never)
  --idle-action stop|destroy   what the idle box does (stop)
  --on-exit keep|stop|destroy  what this run does to the box at exit (keep)
  --boot-timeout 10m  how long a rented or started instance may take to be usable
  --vast-label NAME   the label that marks our instances (simple_api_proxy)
  CLAUDE_START_VAST_POLL, CLAUDE_START_VAST_HEARTBEAT, CLAUDE_START_VAST_WATCHDOG_TICK:
                      seconds between looks at a starting instance (3), heartbeats
                      to the box (15) and the box watchdog's looks (30);
                      CLAUDE_START_VAST_IMAGE: the image to rent (ollama/ollama:latest)

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
  --model NAME        CLAUDE_START_MODEL          model for claude ({model})
  --config FILE       CLAUDE_START_CONFIG         settings file (default
                                                  ~/.config/simple_api_proxy/claude_start.env)
  --lean              leave out Claude Code tools a local model rarely uses well
                      (agents, skills, workflows, scheduling, web, notebooks,
                      worktrees): a prompt about a third the size; see README.
                      Chosen by itself when the window cannot hold the full prompt
                      (about {full_prompt} tokens) and the output limit
  --full-tools        keep every tool, whatever the window
  -h, --help          show this help
  --                  everything after it is passed to claude

Variables (environment or config file):
  CLAUDE_START_CONTEXT_TOKENS     the window (default: the proxy setting OLLAMA_NUM_CTX if
                                  you set it, else {context}), as CLAUDE_CODE_MAX_CONTEXT_TOKENS
                                  (13000 more where Claude Code would otherwise compact
                                  before every request)
  CLAUDE_START_MAX_OUTPUT_TOKENS  CLAUDE_CODE_MAX_OUTPUT_TOKENS (a quarter of the window, at
                                  most {output})
  API_TIMEOUT_MS                  Claude Code request timeout in ms ({timeout})
  PROXY_API_KEY                   sent as ANTHROPIC_AUTH_TOKEN (default: the key --deploy
                                  made for the box, else a dummy token)
  CLAUDE_START_PROXY_SCRIPT       simple_api_proxy.py for --local, --deploy and several
                                  boxes (default: next to this script)
  CLAUDE_START_HEALTH_WAIT        seconds to wait for /health ({health})
  CLAUDE_START_OLLAMA_INSTALL     command --deploy runs on a box without Ollama
                                  ({install})
  CLAUDE_START_INSTALL_TIMEOUT    seconds for that install ({install_timeout})
  CLAUDE_START_OLLAMA_WAIT        seconds for a started Ollama to answer ({ollama_wait})
  CLAUDE_START_PULL_TIMEOUT       seconds for pulling one model ({pull_timeout})

Proxy settings that --deploy writes to ~/.simple_api_proxy/proxy.json on the box
(see python3 simple_api_proxy.py --help; OLLAMA_MODEL defaults to --model):
{proxy_settings}

The config file holds KEY=VALUE lines with the variable names above
(blank lines, # comments and a leading "export " are allowed).

Claude Code gets ANTHROPIC_BASE_URL=http://127.0.0.1:PORT, ANTHROPIC_AUTH_TOKEN,
ANTHROPIC_MODEL and ANTHROPIC_DEFAULT_{{HAIKU,SONNET,OPUS}}_MODEL (and
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
"""


def usage():
    return USAGE.format(
        model=DEFAULT_MODEL, context=DEFAULT_CONTEXT_TOKENS, output=DEFAULT_MAX_OUTPUT_TOKENS,
        timeout=DEFAULT_API_TIMEOUT_MS, health=DEFAULT_HEALTH_WAIT, install=DEFAULT_OLLAMA_INSTALL,
        full_prompt=proxy.CLAUDE_CODE_PROMPT_TOKENS, install_timeout=DEFAULT_INSTALL_TIMEOUT,
        ollama_wait=DEFAULT_OLLAMA_WAIT, pull_timeout=DEFAULT_PULL_TIMEOUT,
        proxy_settings=textwrap.fill(" ".join(PROXY_SETTINGS), 88, initial_indent="  ", subsequent_indent="  "))


VALUE_FLAGS = ("--ssh", "--ssh-port", "--remote-port", "--local-port", "--model", "--config")
VAST_FLAGS = ("--gpu", "--max-price", "--disk", "--vast-label", "--idle-stop", "--idle-action", "--on-exit",
              "--boot-timeout")


@dataclasses.dataclass
class Arguments:
    """What the command line says, before the environment and the config file are consulted."""

    help: bool = False
    local: bool = False
    check: bool = False
    deploy: bool = False
    stop: bool = False
    stop_all: bool = False
    lean: bool = False
    full_tools: bool = False
    vast: bool = False
    status: bool = False
    destroy: bool = False
    yes: bool = False
    values: dict = dataclasses.field(default_factory=dict)  # --flag -> its last value
    ssh: list = dataclasses.field(default_factory=list)  # every --ssh, in order
    claude_args: list = dataclasses.field(default_factory=list)
    launch_args: list = dataclasses.field(default_factory=list)  # as given, without --deploy

    def check_modes(self):
        """Flags that cannot go together are refused before anything runs."""
        modes = self.deploy + self.stop + self.check + (self.local and not self.check)
        if modes > 1:
            raise UsageError("--deploy, --stop, --check and --local go one at a time (--check --local is the one pair)")
        if self.stop_all and not self.stop:
            raise UsageError("--all goes with --stop")
        if self.lean and self.full_tools:
            raise UsageError("--lean and --full-tools do not go together")
        if not self.vast:
            given = [flag for flag in VAST_FLAGS if flag in self.values] + [
                flag for flag, name in (("--status", "status"), ("--destroy", "destroy")) if getattr(self, name)]
            if given:
                raise UsageError("%s goes with --vast" % given[0])
            return
        if self.local or self.ssh or "--ssh-port" in self.values:
            raise UsageError("--vast finds or rents the box itself: leave out --ssh, --ssh-port and --local")
        if self.deploy:
            raise UsageError("--vast deploys by itself: leave out --deploy")
        if self.status + self.stop + self.destroy + self.check > 1:
            raise UsageError("--status, --stop, --destroy and --check go one at a time")


SWITCHES = {"--local": "local", "--check": "check", "--deploy": "deploy", "--stop": "stop", "--all": "stop_all",
            "--lean": "lean", "--full-tools": "full_tools", "--vast": "vast", "--status": "status",
            "--destroy": "destroy", "--yes": "yes"}


def parse_args(argv):
    arguments = Arguments()
    index = 0
    while index < len(argv):
        word = argv[index]
        if word == "--":
            arguments.claude_args = list(argv[index + 1:])
            break
        if word in ("-h", "--help"):
            arguments.help = True
            return arguments
        flag, has_value, value = word.partition("=")
        if word in SWITCHES:
            setattr(arguments, SWITCHES[word], True)
            if word != "--deploy":
                arguments.launch_args.append(word)
        elif flag in VALUE_FLAGS or flag in VAST_FLAGS:
            if has_value:
                arguments.launch_args.append(word)
            else:
                if index + 1 >= len(argv):
                    raise UsageError("%s needs a value" % flag)
                index += 1
                value = argv[index]
                arguments.launch_args += [flag, value]
            if not value:
                raise UsageError("%s needs a non-empty value" % flag)
            arguments.values[flag] = value
            if flag == "--ssh":
                arguments.ssh.append(value)
        else:
            raise UsageError("unknown option '%s' (arguments for claude go after --)" % word)
        index += 1
    return arguments


def read_config_file(path):
    """KEY=VALUE lines, read without running them: a settings file must not be able to run
    commands, and only known keys may be set."""
    values = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r").strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].strip()
        if "=" not in line:
            say("warning: %s:%d: not a KEY=VALUE line, ignored" % (path, number))
            continue
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if key not in CONFIG_KEYS:
            say("warning: %s:%d: unknown setting '%s', ignored" % (path, number, key))
            continue
        values[key] = value
    return values


def whole_number(name, value, least, most=None):
    if re.fullmatch(r"[0-9]{1,9}", value) and int(value) >= least and (most is None or int(value) <= most):
        return int(value)
    raise UsageError("%s must be a whole number >= %d%s, got '%s'"
                     % (name, least, " and <= %d" % most if most is not None else "", value))


@dataclasses.dataclass(frozen=True)
class SshDestination:
    """Where a box is reached: what ssh is given (user@host, a Host of ~/.ssh/config, or
    ssh://user@host:port), a port ("" lets ~/.ssh/config decide) and a known_hosts file ("" for
    ssh's own). A provider that rents boxes makes these with of()."""

    target: str
    port: str = ""
    known_hosts: str = ""
    identity: str = ""  # the key a provider registered for the box ("": ssh's own choice)

    @classmethod
    def of(cls, user, host, port, known_hosts="", identity=""):
        return cls("%s@%s" % (user, host), str(port), str(known_hosts), str(identity))

    def options(self):
        # ServerAlive*: notice a dead link within ~45 s instead of hanging.
        options = ["-o", "StrictHostKeyChecking=accept-new", "-o", "ConnectTimeout=%d" % SSH_CONNECT_TIMEOUT,
                   "-o", "ServerAliveInterval=%d" % SSH_ALIVE_INTERVAL, "-o", "ServerAliveCountMax=3"]
        if self.known_hosts:
            options += ["-o", "UserKnownHostsFile=%s" % self.known_hosts]
        if self.identity:
            options += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        if self.port:
            options += ["-p", self.port]
        return options

    def __str__(self):
        return self.target + (" (port %s)" % self.port if self.port else "")

    def command(self, *words):
        """The ssh command line a user can try by hand."""
        return " ".join(["ssh"] + (["-p", self.port] if self.port else []) + list(words) + [self.target])


class VastChoices:
    """What --vast rents and how the box's life goes: the offer filters, the label, the idle stop,
    the exit. The API key and URL are the provider's (claude_vast.VastProvider.from_environment).
    CLAUDE_START_VAST_POLL, _HEARTBEAT and _WATCHDOG_TICK (seconds) set how often the launcher
    looks at a starting instance, beats its heartbeat and the box's watchdog looks."""

    def __init__(self, arguments, environ):
        flag = arguments.values.get
        self.label = flag("--vast-label") or claude_vast.DEFAULT_LABEL
        try:
            max_price = float(flag("--max-price")) if flag("--max-price") else None
            self.idle_stop = claude_vast.parse_duration(flag("--idle-stop") or "30m")
            self.boot_timeout = claude_vast.parse_duration(flag("--boot-timeout") or "10m")
            self.poll = float(environ.get("CLAUDE_START_VAST_POLL") or 3)
            self.heartbeat = float(environ.get("CLAUDE_START_VAST_HEARTBEAT") or 15)
            self.watchdog_tick = float(environ.get("CLAUDE_START_VAST_WATCHDOG_TICK") or 30)
        except ValueError as error:
            raise UsageError(str(error)) from None
        if max_price is not None and max_price <= 0:
            raise UsageError("--max-price must be a number of dollars per hour above 0")
        if not self.boot_timeout:
            raise UsageError("--boot-timeout needs a duration such as 10m")
        disk = whole_number("--disk", flag("--disk") or str(claude_vast.DEFAULT_DISK_GB), 10, 10000)
        self.query = claude_vast.OfferQuery(gpus=(flag("--gpu") or "").split(","), max_price=max_price, disk_gb=disk)
        self.idle_action = flag("--idle-action") or "stop"
        self.on_exit = flag("--on-exit") or "keep"
        if self.idle_action not in ("stop", "destroy"):
            raise UsageError("--idle-action is stop or destroy, not '%s'" % self.idle_action)
        if self.on_exit not in ("keep", "stop", "destroy"):
            raise UsageError("--on-exit is keep, stop or destroy, not '%s'" % self.on_exit)
        self.image = environ.get("CLAUDE_START_VAST_IMAGE") or claude_vast.DEFAULT_IMAGE


class Settings:
    """Every setting of one run, from flags, the environment, the config file and defaults (in
    that order). `values` holds what the environment and the config file say (non-empty only)."""

    def __init__(self, arguments, environ):
        self.arguments = arguments
        self.environ = environ
        self.config_file = self.find_config_file()
        self.values = self.read_values()
        flag = arguments.values.get
        self.mode = "local" if arguments.local else "remote"
        self.vast = VastChoices(arguments, environ) if arguments.vast else None
        if self.vast:
            self.mode = "vast"  # the destination comes when the instance is found or rented
        self.destinations = [] if self.vast else self.read_destinations()
        if len(self.destinations) > 1:
            if arguments.local:
                raise UsageError("--local and several --ssh boxes do not go together")
            self.mode = "boxes"
        ssh_port = flag("--ssh-port") or self.value("CLAUDE_START_SSH_PORT")
        if ssh_port:
            whole_number("ssh port", ssh_port, 1, 65535)
        self.destinations = [SshDestination(target, ssh_port) for target in self.destinations]
        self.remote_port = whole_number("remote port", flag("--remote-port") or self.value(
            "CLAUDE_START_REMOTE_PORT", DEFAULT_REMOTE_PORT), 1, 65535)
        self.local_port = whole_number("local port", flag("--local-port") or self.value(
            "CLAUDE_START_LOCAL_PORT", DEFAULT_LOCAL_PORT), 1, 65535)
        self.model = flag("--model") or self.value("CLAUDE_START_MODEL", DEFAULT_MODEL)
        number = self.number
        self.context_tokens = self.window()
        # At most a quarter of the window for one answer, unless the user says otherwise.
        self.max_output_tokens = number("CLAUDE_START_MAX_OUTPUT_TOKENS",
                                        min(DEFAULT_MAX_OUTPUT_TOKENS, max(1, self.context_tokens // 4)))
        # Claude Code's full prompt (as the proxy counts it) and an answer must fit in the window;
        # else the lean tool set (about 4,500 tokens).
        self.lean = arguments.lean or (not arguments.full_tools and self.context_tokens
                                       < proxy.CLAUDE_CODE_PROMPT_TOKENS + self.max_output_tokens)
        self.claude_code_window = self.compacting_window()
        self.timeout_ms = number("API_TIMEOUT_MS", DEFAULT_API_TIMEOUT_MS)
        self.health_wait = number("CLAUDE_START_HEALTH_WAIT", DEFAULT_HEALTH_WAIT)
        self.install_timeout = number("CLAUDE_START_INSTALL_TIMEOUT", DEFAULT_INSTALL_TIMEOUT)
        self.ollama_wait = number("CLAUDE_START_OLLAMA_WAIT", DEFAULT_OLLAMA_WAIT)
        self.pull_timeout = number("CLAUDE_START_PULL_TIMEOUT", DEFAULT_PULL_TIMEOUT)
        self.ollama_install = self.value("CLAUDE_START_OLLAMA_INSTALL", DEFAULT_OLLAMA_INSTALL)
        self.proxy_script = Path(self.value("CLAUDE_START_PROXY_SCRIPT") or HERE / "simple_api_proxy.py")
        for destination in self.destinations:
            if destination.target.startswith("-"):
                raise UsageError("ssh destination '%s' must not start with '-'" % destination.target)

    def compacting_window(self):
        """The window Claude Code is told. Where its compaction point (window less output less
        its summary buffer) would leave less room than one answer, a summary of that size would
        have it compact again before every request, and after three in a row it ends the session
        ("Autocompact is thrashing"): told the buffer more, it compacts when the proxy answers
        `prompt is too long`, which the proxy does at the real window."""
        reserve = min(self.max_output_tokens, CLAUDE_CODE_OUTPUT_RESERVE_CAP) + CLAUDE_CODE_SUMMARY_BUFFER
        if self.context_tokens - reserve < self.max_output_tokens:
            return self.context_tokens + CLAUDE_CODE_SUMMARY_BUFFER
        return self.context_tokens

    def lean_notice(self):
        """What the user is told when the window, not --lean, chose the lean tool set; else None."""
        if not self.lean or self.arguments.lean:
            return None
        return ("a window of %d tokens cannot hold Claude Code's full prompt (about %d tokens) and %d output tokens: "
                "leaving out the tools --lean leaves out (--full-tools keeps them)"
                % (self.context_tokens, proxy.CLAUDE_CODE_PROMPT_TOKENS, self.max_output_tokens))

    def find_config_file(self):
        named = self.arguments.values.get("--config") or self.environ.get("CLAUDE_START_CONFIG")
        if named:
            return named
        home = self.environ.get("HOME")
        return os.path.join(home, ".config", "simple_api_proxy", "claude_start.env") if home else ""

    def read_values(self):
        values = {}
        path = self.config_file
        if path and os.path.isfile(path):
            if not os.access(path, os.R_OK):
                raise Failure("config file %s is not readable: fix its permissions" % path)
            values = read_config_file(path)
        elif self.arguments.values.get("--config") or self.environ.get("CLAUDE_START_CONFIG"):
            # Only an explicitly named file must exist; the default one is optional.
            raise Failure("config file %s not found: fix --config / CLAUDE_START_CONFIG" % path)
        # The environment wins over the file; an empty value counts as unset.
        values.update({key: self.environ[key] for key in CONFIG_KEYS if self.environ.get(key)})
        return {key: value for key, value in values.items() if value}

    def window(self):
        """The context window: CLAUDE_START_CONTEXT_TOKENS, else the proxy's OLLAMA_NUM_CTX."""
        for key in ("CLAUDE_START_CONTEXT_TOKENS", "OLLAMA_NUM_CTX"):
            if key in self.values:
                return self.number(key, 0)
        return DEFAULT_CONTEXT_TOKENS

    def value(self, key, default=""):
        return self.values.get(key, str(default))

    def number(self, key, default):
        return whole_number(key, self.value(key, default), 1)

    def read_destinations(self):
        """Several boxes: --ssh more than once, or CLAUDE_START_SSH with several words."""
        if len(self.arguments.ssh) > 1:
            return list(self.arguments.ssh)
        return (self.arguments.values.get("--ssh") or self.value("CLAUDE_START_SSH")).split()

    def proxy_values(self):
        """The proxy settings the user gave (environment or config file)."""
        return {key: self.values[key] for key in PROXY_SETTINGS if key in self.values}

    def box_proxy_settings(self):
        """The box proxy's settings file: the settings the user gave, and what the launcher
        decides, as JSON (no value can add a setting, whatever characters it holds)."""
        values = {"API_HOST": "127.0.0.1", "API_PORT": str(self.remote_port), "LOG_FILE": "",
                  "OLLAMA_MODEL": self.model}
        values.update(self.proxy_values())
        return json.dumps(values, sort_keys=True).encode()

    def required_models(self):
        """The models the box must have: --model, MODEL_MAP's and OLLAMA_MODEL, once each."""
        try:
            mapped = list(proxy.parse_model_map(self.value("MODEL_MAP")).values())
        except ValueError as error:
            raise UsageError(str(error)) from None
        models = []
        for name in [self.model] + mapped + [self.value("OLLAMA_MODEL")]:
            if name and name not in models:
                models.append(name)
        return models

    def no_host_message(self):
        return ("no ssh host given: pass --ssh user@host or set CLAUDE_START_SSH (environment or %s), "
                "or use --local" % (self.config_file or "the config file"))

    def launch_command(self, stop=False):
        """This launcher's command line as the user gave it (without --deploy), or for --stop
        only the flags that say which box."""
        args = self.arguments.launch_args
        if stop:
            kept, index = [], 0
            while index < len(args):
                word = args[index]
                if word in ("--ssh", "--ssh-port", "--remote-port", "--config"):
                    kept += args[index:index + 2]
                    index += 1
                elif word.partition("=")[0] in ("--ssh", "--ssh-port", "--remote-port", "--config") and "=" in word:
                    kept.append(word)
                index += 1
            args = kept
        command = self.environ.get("CLAUDE_START_COMMAND") or "claude_start.sh"
        return " ".join(shlex.quote(word) for word in [command] + args)


###############################################################################
# The run folder
###############################################################################

class RunFolder:
    """This run's private folder (mode 0700) for logs, requests and the ssh control sockets,
    whose path must fit in ~100 bytes: /tmp when TMPDIR is long. Removed at the end unless
    the run failed, so that the logs a failure message names are still there."""

    def __init__(self, environ):
        base = environ.get("TMPDIR") or tempfile.gettempdir()
        try:
            self.path = Path(tempfile.mkdtemp(prefix="claude_start.", dir=base))
            self.sockets = self.path
            if len(str(self.path)) > 80:
                self.sockets = Path(tempfile.mkdtemp(prefix="claude_start.", dir="/tmp"))
        except OSError as error:
            raise Failure("cannot create a private folder in %s (%s): check TMPDIR" % (base, error)) from None

    def __truediv__(self, name):
        return self.path / name

    def remove(self):
        for folder in {self.path, self.sockets}:
            shutil.rmtree(folder, ignore_errors=True)


class KeyStore:
    """The API keys --deploy made for boxes, kept here too (mode 0600) so that Claude Code and
    the user can reach the box's proxy: ~/.config/simple_api_proxy/keys/<destination>."""

    def __init__(self, environ):
        home = environ.get("HOME")
        self.folder = Path(home, ".config", "simple_api_proxy", "keys") if home else None

    def path(self, destination):
        name = re.sub(r"[^A-Za-z0-9@._-]", "_", destination.target) + (
            "_%s" % destination.port if destination.port else "")
        return self.folder / name

    def keep(self, destination, key):
        if not self.folder or not key:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.folder, 0o700)
            path = self.path(destination)
            fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key + "\n")
            os.chmod(path, 0o600)
        except OSError as error:
            say("warning: cannot keep the box's API key in %s (%s)" % (self.folder, error))


###############################################################################
# Probes: health and free ports
###############################################################################

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # these URLs are loopback


@dataclasses.dataclass(frozen=True)
class Health:
    """What /health answered: its status (0 when nothing answers) and the proxy's instance id."""

    status: int = 0
    instance: str = ""

    @property
    def up(self):
        """A status that proves the proxy process is alive (503 = up, Ollama not reachable;
        401/403 = up, but /health wants the API key)."""
        return 200 <= self.status < 300 or self.status in (503, 401, 403)

    def note(self):
        if self.status == 503:
            return "HTTP 503: proxy up, Ollama not reachable - the model may be loading"
        if self.status in (401, 403):
            return "HTTP %d: proxy up, /health wants the API key" % self.status
        return "HTTP %d" % self.status


def fetch_health(url, timeout):
    try:
        with NO_PROXY.open(url, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    except (OSError, ValueError):
        return Health()
    try:
        answer = json.loads(body)
        instance = answer.get("instance_id") if isinstance(answer, dict) else ""
    except ValueError:
        instance = ""
    return Health(status, instance if isinstance(instance, str) and instance.isalnum() else "")


def find_free_port(start):
    """The first port from start upward (PORT_TRIES of them) on which nothing listens on
    127.0.0.1; None if there is none. A listener and a bound-but-idle socket both count as taken."""
    for port in range(start, min(start + PORT_TRIES - 1, 65535) + 1):
        with socket.socket() as probe:
            probe.settimeout(1)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                continue
        with socket.socket() as held:
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ssh binds
            try:
                held.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    return None


def stop_child(process, grace=STOP_GRACE):
    """SIGTERM, then SIGKILL, to a child of this process. A child is only signalled while it is
    unreaped (poll() is None), so its pid cannot have been given to another process."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        if process.poll() is None:
            process.kill()
        process.wait()


###############################################################################
# The SSH connection
###############################################################################

class SshConnection:
    """One authenticated connection to a box (ControlMaster) that every box call of this run
    reuses; a passphrase or host key question comes up once, when it opens."""

    def __init__(self, destination, run_folder, name="ssh"):
        self.destination = destination
        self.run_folder = run_folder
        self.control = str(run_folder.sockets / name)
        self.errors = run_folder / (name + ".err")
        self.is_open = False

    def ssh(self, *words):
        return ["ssh"] + self.destination.options() + list(words)

    def open(self):
        limit = SSH_CONNECT_TIMEOUT + 20
        try:
            with open(self.errors, "wb") as errors:
                status = subprocess.run(
                    self.ssh("-M", "-S", self.control, "-o", "ControlPersist=300", "-f", "-N", "--",
                             self.destination.target),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            raise Failure("ssh to %s did not finish connecting within %d s: check the host and port"
                          % (self.destination, limit)) from None
        if status != 0:
            raise Failure(self.failure_reason(read_text(self.errors)))
        self.is_open = True

    def close(self):
        if self.is_open:
            self.is_open = False
            try:
                subprocess.run(self.ssh("-S", self.control, "-O", "exit", "--", self.destination.target),
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def failure_reason(self, text):
        """What an ssh that exited 255 means, and what to do."""
        if "IDENTIFICATION HAS CHANGED" in text or "Host key verification failed" in text:
            return ("the host key of %s has changed (a rebuilt or new box behind the same address, or someone in "
                    "between): if you expect that, run: ssh-keygen -R '%s' and try again"
                    % (self.destination, self.known_hosts_name()))
        last = last_line(text)
        return ("cannot reach %s over ssh%s: check the host, port and your ssh key (try: %s)"
                % (self.destination, " (%s)" % last if last else "", self.destination.command("true")))

    def known_hosts_name(self):
        """The name ssh-keygen -R wants for this box: HOST, or [HOST]:PORT off port 22."""
        host, port = "", "22"
        try:
            out = subprocess.run(["ssh", "-G"] + self.destination.options() + ["--", self.destination.target],
                                 stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        for line in out.splitlines():
            key, _, value = line.partition(" ")
            if key == "hostname":
                host = value
            elif key == "port":
                port = value
        host = host or self.destination.target.rpartition("@")[2]
        return host if port == "22" else "[%s]:%s" % (host, port)

    def run(self, command, data, timeout, on_line):
        """Runs command on the box with data on its stdin, calling on_line with each line of its
        output as it comes. Its exit status (124 when timeout seconds passed first: it is then
        stopped) and what it wrote to stderr."""
        errors_path = self.run_folder / "box.err"
        with open(errors_path, "wb") as errors:
            process = subprocess.Popen(self.ssh("-S", self.control, "--", self.destination.target, command),
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors)
        timed_out = threading.Event()

        def expire():
            timed_out.set()
            stop_child(process, 2)

        watchdog = threading.Timer(timeout, expire)
        writer = threading.Thread(target=self.feed, args=(process.stdin, data), daemon=True)
        watchdog.start()
        writer.start()
        try:
            for raw in process.stdout:
                on_line(raw.decode("utf-8", "replace").rstrip("\r\n"))
            process.wait()
        finally:
            watchdog.cancel()
            stop_child(process, 2)
            process.stdout.close()
        return (124 if timed_out.is_set() else process.returncode), read_text(errors_path)

    @staticmethod
    def feed(stream, data):
        try:
            stream.write(data)
            stream.close()
        except OSError:  # the box stopped reading: its answer says why
            pass


###############################################################################
# A box
###############################################################################

# The box's command line: check python3, then read the program's length, the program, and hand
# it the rest of stdin (a JSON request line and uploads). It parses in a login shell of bash or sh.
BOX_LOADER = '''command -v python3 >/dev/null 2>&1 || {
    echo '{"event": "fail", "message": "python3 not found on the box: install python3 (3.8 or newer)"}'; exit 1; }
exec python3 -S -c "import sys, json
if sys.version_info < (3, 8):
    print(json.dumps({'event': 'fail', 'message': 'python3 on the box is %s, older than 3.8: install a newer one'
                                                  % sys.version.split()[0]}))
    sys.exit(1)
b = sys.stdin.buffer
s = b.read(int(b.readline())).decode()
g = {'__name__': 'claude_box'}
exec(compile(s, 'claude_box.py', 'exec'), g)
sys.exit(g['main'](b, s))"'''


@functools.lru_cache(maxsize=None)
def rules_source():
    """What the box applies as the proxy does: OLLAMA_HOST's address rules and Ollama's model
    naming, sent as their source with each request (see claude_box.Rules): each a top-level
    block of simple_api_proxy.py, decorators included."""
    lines = inspect.getsource(proxy).splitlines()
    blocks = []
    for name in ("OllamaAddress", "parse_ollama_host", "parse_ollama_hosts", "same_model"):
        start = next(index for index, line in enumerate(lines) if re.match(r"(class|def) %s\b" % name, line))
        first, last = start, start + 1
        while lines[first - 1].startswith("@"):
            first -= 1
        while last < len(lines) and (not lines[last].strip() or lines[last][0] in " \t"):
            last += 1
        blocks.append("\n".join(lines[first:last]).rstrip())
    return "import dataclasses\nimport urllib.parse\n\n\n" + "\n\n\n".join(blocks) + "\n"


class BoxAnswer:
    """What the box program said in one call (its JSON lines); lines that are not its events
    (a login script's chatter) are shown as they come, like its "say" events."""

    def __init__(self):
        self.status = 0
        self.fail = ""
        self.need = []
        self.ready = None
        self.health = None
        self.hops = []
        self.ollama = ""

    def take(self, line):
        try:
            event = json.loads(line)
            kind = event["event"]
        except (ValueError, TypeError, KeyError):
            if line.strip():
                say("box: " + line)
            return
        if kind == "say":
            say("box: " + str(event.get("text", "")))
        elif kind == "fail":
            self.fail = str(event.get("message", ""))
        elif kind == "need":
            self.need = list(event.get("files", []))
        elif kind == "ready":
            self.ready = event
        elif kind == "health":
            self.health = event
        elif kind == "hop":
            self.hops.append((event.get("name", ""), event.get("status", ""), event.get("detail", "")))
        elif kind == "ollama":
            self.ollama = str(event.get("address", ""))

    def hop_detail(self, name, status):
        return next((detail for hop, state, detail in self.hops if hop == name and state == status), "")


class Box:
    """One GPU box as the box program (claude_box.py) sees it: each call sends that program over
    the box's SSH connection with one request; see claude_box.py for the steps."""

    def __init__(self, connection, settings):
        self.connection = connection
        self.settings = settings
        self.destination = connection.destination

    def call(self, step, timeout, files=None, **fields):
        """One call of the box program. files: name -> bytes the step needs there; their hashes go
        first, and the box asks for those it lacks (a second call sends them)."""
        files = files or {}
        request = dict(fields, step=step, rules=rules_source(), hashes={
            name: hashlib.sha256(data).hexdigest() for name, data in files.items()})
        answer = self.send(request, {}, timeout)
        if answer.need:
            unknown = [name for name in answer.need if name not in files]
            if unknown:
                raise Failure("the box asked for an unknown file '%s'" % unknown[0])
            for name in answer.need:
                say("copying %s to the box" % name)
            answer = self.send(request, {name: files[name] for name in answer.need}, timeout)
        return answer

    def send(self, request, uploads, timeout):
        try:
            program = BOX_PROGRAM.read_bytes()
        except OSError:
            raise Failure("%s not found: it belongs beside claude_start.py" % BOX_PROGRAM) from None
        request = dict(request, sizes={name: len(data) for name, data in uploads.items()})
        data = b"%d\n%s%s\n%s" % (len(program), program, json.dumps(request).encode(), b"".join(uploads.values()))
        answer = BoxAnswer()
        status, errors = self.connection.run(BOX_LOADER, data, timeout, answer.take)
        answer.status = status
        if status == 124:
            raise Failure("the box did not finish within %d s (ssh to %s): check the box, or the time limits in "
                          "--help" % (timeout, self.destination))
        if status == 255:
            raise Failure(self.connection.failure_reason(errors))
        if status != 0:
            raise Failure(answer.fail or "the box side failed: %s" % last_line(errors))
        return answer

    def models_request(self):
        settings = self.settings
        return dict(models=settings.required_models(), install_command=settings.ollama_install,
                    install_timeout=settings.install_timeout, ollama_wait=settings.ollama_wait,
                    pull_timeout=settings.pull_timeout)

    def deploy(self):
        """Sets the box up (see --help: --deploy); the box's "ready" event."""
        settings = self.settings
        try:
            script = settings.proxy_script.read_bytes()
        except OSError:
            raise Failure("proxy script %s not found: set CLAUDE_START_PROXY_SCRIPT to simple_api_proxy.py"
                          % settings.proxy_script) from None
        models = settings.required_models()
        timeout = (settings.install_timeout + settings.ollama_wait + settings.pull_timeout * len(models)
                   + settings.health_wait + 60)
        say("deploying to %s: %s/ (proxy on 127.0.0.1:%d, model(s): %s)"
            % (self.destination, BOX_FOLDER, settings.remote_port, " ".join(models)))
        try:
            files = {"simple_api_proxy.py": script, "proxy.json": settings.box_proxy_settings()}
            answer = self.call("up", timeout, files,
                               port=settings.remote_port, health_wait=settings.health_wait,
                               generate_key=not settings.value("PROXY_API_KEY"), **self.models_request())
        except Failure as failure:
            raise Failure("deploy failed: " + failure.message) from None
        if not answer.ready:
            raise Failure("deploy failed: the box did not report the proxy ready")
        say("box ready: proxy pid %s, instance %s, log %s/proxy.log"
            % (answer.ready.get("pid"), answer.ready.get("instance"), BOX_FOLDER))
        return answer.ready

    def probe(self):
        """How the box's proxy is: the answer, with its "health" event and hops."""
        return self.call("probe", BOX_CALL_TIMEOUT, port=self.settings.remote_port,
                         models=self.settings.required_models())

    def stop(self, everything):
        return self.call("stop", BOX_CALL_TIMEOUT, all=everything)

    def ready_ollama(self, deploy):
        """Several boxes: Ollama (with deploy: started or installed, models pulled) on this box."""
        if deploy:
            models = self.settings.required_models()
            say("preparing Ollama on %s, model(s): %s" % (self.destination, " ".join(models)))
            timeout = (self.settings.install_timeout + self.settings.ollama_wait
                       + self.settings.pull_timeout * len(models) + 60)
            return self.call("ollama", timeout, **self.models_request())
        return self.call("ollama_probe", BOX_CALL_TIMEOUT, models=self.settings.required_models())


###############################################################################
# The tunnel and its keeper
###############################################################################

class TunnelSilent(Failure):
    """The tunnel's ssh ran, but nothing answered through it in time."""

    def __init__(self, message, ssh_was_up):
        super().__init__(message)
        self.ssh_was_up = ssh_was_up


class Tunnel:
    """ssh -N -L 127.0.0.1:port -> target on the box, run by its keeper: a child process
    (TunnelKeeper) that starts the tunnel's ssh at once, reports when the box's proxy answers
    through it, and once told to keep it reopens it whenever it drops. The keeper's stdin is its
    lifeline: when it closes (close(), or this launcher killed) the keeper closes the tunnel's
    current ssh and exits."""

    def __init__(self, destination, target, probe, run_folder, health_wait):
        self.destination, self.target, self.probe = destination, target, probe
        self.run_folder, self.health_wait = run_folder, health_wait
        self.port = None
        self.keeper = None
        self.ssh_pid = None
        self.events = queue.Queue()

    @property
    def log(self):
        return self.run_folder / ("tunnel.%d.log" % self.port)

    def start(self, port, connect=True):
        """Starts the keeper; connect=False: its ssh waits for connect(), so that the keeper's
        own start overlaps with the box's SSH connection, and the tunnel's ssh, which connects
        while the box is checked or set up, asks for nothing that connection asks."""
        self.port = port
        spec = dict(destination=dataclasses.asdict(self.destination), port=port, target=self.target,
                    probe=self.probe, log=str(self.log), health_wait=self.health_wait, connect=connect)
        self.keeper = subprocess.Popen(
            [sys.executable, "-S", "-c", "import sys; sys.path.insert(0, sys.argv[1]); import claude_start; "
             "sys.exit(claude_start.TunnelKeeper.main(sys.argv[2]))", str(HERE), json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.events = queue.Queue()
        threading.Thread(target=self.read_events, args=(self.keeper, self.events), daemon=True).start()

    @staticmethod
    def read_events(keeper, events):
        for line in keeper.stdout:
            try:
                events.put(json.loads(line))
            except ValueError:
                continue
        events.put({"event": "gone"})

    def open(self, instance, retry=True):
        """Waits until the box's own proxy (instance, when known) answers through the tunnel; a
        port that another launcher's tunnel took first is given up for the next free one. The
        Health seen through it."""
        tries = 0
        while True:
            self.order(instance=instance)
            event = self.events.get()
            if event["event"] == "gone":
                self.close()
                raise Failure("the keeper of the tunnel to %s ended unexpectedly: see the messages above"
                              % self.destination)
            if event["event"] == "up":
                self.ssh_pid = event["pid"]
                return Health(event["status"], event["instance"])
            self.ssh_pid = event.get("pid")
            self.close()
            last = event.get("last", "")
            if event.get("why") == "exited" and "Address already in use" not in event.get("log", ""):
                raise Failure("ssh tunnel to %s exited (code %s)%s; check that you can run: %s (log: %s)"
                              % (self.destination, event.get("code"), ": " + last if last else "",
                                 self.destination.command("-N", "-L", "%d:%s" % (self.port, self.target)), self.log))
            if event.get("why") == "exited":
                why = "local port %d was taken before the tunnel could hold it" % self.port
            elif event.get("why") == "foreign":
                why = ("127.0.0.1:%d answers for a proxy that is not the one on %s (another tunnel holds the port)"
                       % (self.port, self.destination.target))
            else:
                raise TunnelSilent("%s did not answer on http://127.0.0.1:%d%s through the tunnel within %d s: "
                                   "check the proxy on %s, or raise CLAUDE_START_HEALTH_WAIT (ssh log: %s)"
                                   % (self.probe.lstrip("/"), self.port, self.probe, self.health_wait,
                                      self.destination.target, self.log), event.get("why") == "silent")
            tries += 1
            port = find_free_port(self.port + 1) if tries < TUNNEL_TRIES and retry else None
            if port is None:
                raise Failure("ssh tunnel to %s could not hold a local port (%d tried; last: %s%s): pass a free "
                              "--local-port (log: %s)" % (self.destination, tries, why, ": " + last if last else "",
                                                          self.log))
            say("%s; trying %d" % (why, port))
            self.start(port)

    def order(self, **order):
        try:
            self.keeper.stdin.write(json.dumps(order) + "\n")
            self.keeper.stdin.flush()
            return True
        except OSError:  # the keeper is gone: its "gone" event says so
            return False

    def connect(self):
        self.order(connect=True)

    def keep(self):
        """From now on the keeper reopens the tunnel whenever it drops (while Claude Code runs)."""
        if not self.order(keep=True):
            say("warning: the keeper of the tunnel to %s is gone: a dropped tunnel will not be reopened"
                % self.destination)

    def close(self):
        """The keeper closes the tunnel's current ssh and exits."""
        keeper, self.keeper = self.keeper, None
        if keeper is None:
            return
        try:
            keeper.stdin.close()
        except OSError:
            pass
        try:
            keeper.wait(STOP_GRACE + 5)
        except subprocess.TimeoutExpired:
            stop_child(keeper)


class TunnelKeeper:
    """The keeper process of one tunnel (see Tunnel). Its stdin carries {"instance": ID} (report
    whether the box's proxy answers) and {"keep": true} (reopen on drops from now on); EOF there
    means close. Its stdout carries one JSON event a line for the launcher; what it tells the
    user goes to stderr, as the launcher's own messages do."""

    def __init__(self, spec):
        self.destination = SshDestination(**spec["destination"])
        self.port, self.target, self.probe = spec["port"], spec["target"], spec["probe"]
        self.log, self.health_wait, self.connect = spec["log"], spec["health_wait"], spec["connect"]
        self.url = "http://127.0.0.1:%d%s" % (self.port, self.probe)
        self.ssh = None
        self.instance = ""
        self.orders = queue.Queue()
        self.closing = threading.Event()

    @classmethod
    def main(cls, spec):
        setup_logging()
        # Ctrl-C and a hangup reach the launcher, which closes this keeper; its ssh inherits the
        # ignored SIGINT and keeps it ignored.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        keeper = cls(json.loads(spec))
        signal.signal(signal.SIGTERM, lambda *_: keeper.closing.set())
        threading.Thread(target=keeper.listen, daemon=True).start()
        try:
            keeper.run()
        finally:
            keeper.stop_ssh()
        return 0

    def listen(self):
        for line in sys.stdin:
            try:
                self.orders.put(json.loads(line))
            except ValueError:
                continue
        self.closing.set()  # the launcher closed our stdin, or is gone
        self.orders.put({})

    def tell(self, event, **fields):
        fields["event"] = event
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    def start_ssh(self):
        """The tunnel's own ssh (not the shared connection: it must be reopened alone).
        ExitOnForwardFailure: if it cannot hold the local port itself, it exits instead of running
        without a tunnel. Its output goes to a log, away from Claude Code's screen."""
        with open(self.log, "wb") as log_file:
            self.ssh = subprocess.Popen(
                ["ssh", "-N", "-L", "%d:%s" % (self.port, self.target), "-o", "ExitOnForwardFailure=yes",
                 "-o", "ControlPath=none"] + self.destination.options() + ["--", self.destination.target],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)

    def stop_ssh(self):
        stop_child(self.ssh)

    def next_order(self, name):
        while not self.closing.is_set():
            try:
                order = self.orders.get(timeout=0.5)
            except queue.Empty:
                continue
            if name in order:
                return order[name]
        return None

    def wait_for_health(self, seconds, instance):
        """up, exited (the ssh), foreign (another proxy instance answers), silent (time is up) or
        closing; and the Health last seen."""
        deadline = time.monotonic() + seconds
        health = Health()
        while not self.closing.is_set():
            if self.ssh.poll() is not None:
                return "exited", health
            health = fetch_health(self.url, 2)
            if health.up:
                return ("foreign" if instance and health.instance != instance else "up"), health
            if time.monotonic() > deadline:
                return "silent", health
            self.closing.wait(0.1)
        return "closing", health

    def run(self):
        if not self.connect and self.next_order("connect") is None:
            return
        self.start_ssh()
        instance = self.next_order("instance")
        if instance is None:
            return
        self.instance = instance
        why, health = self.wait_for_health(self.health_wait, instance)
        if why != "up":
            log_text = read_text(self.log)
            if why == "exited":
                self.ssh.wait()
            self.tell("down", why=why, pid=self.ssh.pid, code=self.ssh.poll(), log=log_text,
                      last=last_line(log_text).rstrip("."))
            return
        self.tell("up", pid=self.ssh.pid, status=health.status, instance=health.instance)
        if self.next_order("keep") is None:
            return
        while not self.closing.is_set():
            if self.ssh.poll() is None:
                self.closing.wait(0.5)
                continue
            say("tunnel to %s dropped (see %s); reopening 127.0.0.1:%d" % (self.destination.target, self.log,
                                                                            self.port))
            self.reopen()

    def reopen(self):
        """Opens a new ssh on the same port until the box's proxy answers through it again, while
        the box is unreachable too, so that Claude Code's own retries carry the session on."""
        down_since = time.monotonic()
        while not self.closing.is_set():
            self.start_ssh()
            why, health = self.wait_for_health(10, self.instance)
            if why == "foreign":
                # Another proxy instance answers: the box's proxy restarted, or another tunnel took
                # the port. An ssh that could not bind the port exits (ExitOnForwardFailure); one
                # still running after a pause holds it.
                self.closing.wait(2)
                health = fetch_health(self.url, 2)
                if self.ssh.poll() is None and health.up:
                    say("the proxy on %s restarted (instance %s, was %s)"
                        % (self.destination.target, health.instance, self.instance))
                    self.instance, why = health.instance, "up"
            if why == "up":
                say("tunnel 127.0.0.1:%d -> %s reopened after %d s (ssh pid %d)"
                    % (self.port, self.destination.target, time.monotonic() - down_since, self.ssh.pid))
                return
            self.stop_ssh()
            if why == "closing":
                return
            if (time.monotonic() - down_since) % 30 < 3:
                say("cannot reopen the tunnel to %s yet (%s); still trying"
                    % (self.destination.target, last_line(read_text(self.log))))
            self.closing.wait(2)


###############################################################################
# The local proxy
###############################################################################

class LocalProxy:
    """simple_api_proxy.py started on this machine for this run (--local, several boxes), with its
    log in the run folder, never in the folder Claude Code works on; stopped at the end."""

    def __init__(self, settings, run_folder, port, extra_settings=None):
        self.settings, self.port = settings, port
        self.log = run_folder / ("simple_api_proxy.%d.log" % port)
        self.cwd = run_folder.path
        self.extra_settings = extra_settings or {}
        self.process = None

    def start(self):
        script = self.settings.proxy_script
        if not script.is_file():
            raise Failure("proxy script %s not found: set CLAUDE_START_PROXY_SCRIPT to simple_api_proxy.py" % script)
        env = dict(self.settings.environ)
        env.update(self.settings.proxy_values())  # the config file's too, not only the environment's
        env.update(self.extra_settings)
        env.update(API_PORT=str(self.port), API_HOST="127.0.0.1", LOG_FILE="")
        with open(self.log, "wb") as log_file:
            self.process = subprocess.Popen([sys.executable, str(script)], env=env, cwd=self.cwd,
                                            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
        say("started %s on 127.0.0.1:%d (pid %d, log %s)" % (script, self.port, self.process.pid, self.log))
        deadline = time.monotonic() + self.settings.health_wait
        while True:
            if self.process.poll() is not None:
                code, self.process = self.process.returncode, None
                raise Failure("%s exited (code %d) before answering /health: see %s" % (script, code, self.log))
            health = fetch_health("http://127.0.0.1:%d/health" % self.port, 2)
            if health.up:
                return health
            if time.monotonic() > deadline:
                raise Failure("%s did not answer http://127.0.0.1:%d/health within %d s: see %s, or raise "
                              "CLAUDE_START_HEALTH_WAIT" % (script, self.port, self.settings.health_wait, self.log))
            time.sleep(0.1)

    def stop(self):
        stop_child(self.process)
        self.process = None


###############################################################################
# The Claude Code run
###############################################################################

class ClaudeRun:
    """Claude Code against the proxy on 127.0.0.1:port: its environment, its command line, the
    process, and the resume hint after it."""

    def __init__(self, settings, port, auth_token):
        self.settings, self.port, self.auth_token = settings, port, auth_token
        self.process = None
        self.started = None

    def environment(self, environ):
        settings, model = self.settings, self.settings.model
        env = dict(environ)
        # A real Anthropic key would make Claude Code ask which credential to use, and would be
        # sent to the proxy.
        env.pop("ANTHROPIC_API_KEY", None)
        env.update({
            "ANTHROPIC_BASE_URL": "http://127.0.0.1:%d" % self.port,
            "ANTHROPIC_AUTH_TOKEN": self.auth_token,
            "ANTHROPIC_MODEL": model,
            "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
            "ANTHROPIC_DEFAULT_SONNET_MODEL": model,
            "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
            "ANTHROPIC_SMALL_FAST_MODEL": model,
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_TELEMETRY": "1",
            # The attribution header changes per request and would defeat the model's prompt cache.
            "CLAUDE_CODE_ATTRIBUTION_HEADER": "0",
            "API_TIMEOUT_MS": str(settings.timeout_ms),
            "CLAUDE_CODE_MAX_CONTEXT_TOKENS": str(settings.claude_code_window),
            "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(settings.max_output_tokens),
        })
        # One file read, command output or MCP result at most about a quarter of the window
        # (Claude Code's defaults, 25k tokens a read, outgrow a 32k window); command output is
        # counted in characters, three or four to a token, hence three quarters of the window in
        # characters. Values the user set win.
        window = settings.context_tokens
        for name, value in (("CLAUDE_CODE_FILE_READ_MAX_OUTPUT_TOKENS", window // 4),
                            ("MAX_MCP_OUTPUT_TOKENS", window // 4), ("BASH_MAX_OUTPUT_LENGTH", window * 3 // 4)):
            env[name] = environ.get(name) or str(value)
        return env

    def argv(self):
        argv = ["claude", "--model", self.settings.model]
        if self.settings.lean:
            argv += ["--disallowedTools", ",".join(LEAN_LEFT_OUT)]
        return argv + self.settings.arguments.claude_args

    def start(self, environ):
        """Claude Code keeps this terminal: the same process group, stdin, stdout and stderr."""
        self.started = time.time()
        self.process = subprocess.Popen(self.argv(), env=self.environment(environ))

    def wait(self):
        status = self.process.wait()
        return 128 - status if status < 0 else status

    def forward(self, signum):
        """Pass a signal on (finish() gives Claude Code its moment to end)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def finish(self):
        """After a signal: a moment to finish, then SIGKILL."""
        try:
            self.process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()

    def resume_hint(self, environ):
        """Claude Code's own resume hint (`claude --resume ID`) would bypass the proxy: say how to
        resume through this launcher instead, when the session was saved."""
        folder = Path(environ.get("CLAUDE_CONFIG_DIR") or Path(environ.get("HOME", "~"), ".claude")) / "projects"
        newest, newest_time = None, self.started
        for path in folder.glob("**/*.jsonl") if folder.is_dir() else ():
            try:
                modified = path.stat().st_mtime
            except OSError:
                continue
            if modified >= newest_time:
                newest, newest_time = path, modified
        if newest is not None and re.fullmatch(r"[0-9a-fA-F-]{36}", newest.stem):
            say("resume this conversation with: %s -- --resume %s" % (self.settings.launch_command(), newest.stem))


###############################################################################
# --check
###############################################################################

class CheckReport:
    """--check's output: one line a hop on stdout, "name: ok|failed|warning|skipped (detail)"."""

    def __init__(self):
        self.failed = 0

    def hop(self, name, status, detail=""):
        sys.stdout.write("%-20s %s%s\n" % (name + ":", status, " (%s)" % detail if detail else ""))
        sys.stdout.flush()
        if status == "failed":
            self.failed += 1


###############################################################################
# The launcher
###############################################################################

class Launcher:
    """One run: the main flow per mode, and everything it started, so that the end stops exactly
    that and nothing else. Parts: run() (signals, the exit); stop / check / start_* per mode;
    run_vast() (--vast: the rental, its watchdog and heartbeat, settle_rental() at the end);
    run_claude(); close()."""

    def __init__(self, settings, environ):
        self.settings, self.environ = settings, environ
        self.run_folder = None
        self.connections = []
        self.tunnels = []
        self.local_proxy = None
        self.claude = None
        self.keys = KeyStore(environ)
        self.ollama_warned = False
        self.rental = None  # --vast: the instance this run uses, and what it costs
        self.attachment = None  # --vast: this launcher's heartbeat on the box
        self.watchdog_armed = True

    # ------------------------------------------------------------ the run

    def run(self):
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self.on_signal)
        failed = True
        try:
            self.run_folder = RunFolder(self.environ)
            status = self.run_mode()
            failed = False
            return status
        except Interrupted as interrupted:
            failed = False
            return interrupted.status
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN)
            self.close(keep_logs=failed)

    def on_signal(self, signum, frame):
        """Pass the signal on to Claude Code, give it a moment to finish, then end the run
        (close() closes the tunnels)."""
        for each in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(each, signal.SIG_IGN)
        if self.claude is not None:
            self.claude.forward(signum)
        raise Interrupted(128 + signum)

    def run_mode(self):
        settings = self.settings
        if settings.mode == "vast":
            try:
                return self.run_vast()
            except claude_vast.VastError as error:
                raise Failure(str(error)) from None
        if settings.arguments.stop:
            return self.stop_boxes() if settings.mode == "boxes" else self.stop_box()
        if settings.arguments.check:
            return self.check()
        if shutil.which("claude") is None:
            raise Failure("claude not found on PATH: install Claude Code (npm install -g @anthropic-ai/claude-code) "
                          "or fix PATH")
        start = {"local": self.start_local, "boxes": self.start_boxes, "remote": self.start_remote}[settings.mode]
        port, token = start()
        return self.run_claude(port, token)

    def close(self, keep_logs=False):
        if self.claude is not None and self.claude.process is not None:
            self.claude.finish()
        if self.attachment is not None:  # a session that ended by a signal: settle the box as at an exit
            self.settle_rental()
        elif self.rental is not None and self.rental.rented_now and self.rental.started_at is None:
            self.abandon_rental()
        for tunnel in self.tunnels:
            tunnel.close()
        for connection in self.connections:
            connection.close()
        if self.local_proxy is not None:
            self.local_proxy.stop()  # only a proxy this run started; one that was already running stays
        if self.run_folder is not None and not keep_logs:
            self.run_folder.remove()

    # ------------------------------------------------------------ parts

    def connect(self, destination, index=0):
        connection = SshConnection(destination, self.run_folder, "ssh.%d" % index)
        self.connections.append(connection)
        connection.open()
        return connection

    def new_tunnel(self, destination, target, probe):
        tunnel = Tunnel(destination, target, probe, self.run_folder, self.settings.health_wait)
        self.tunnels.append(tunnel)
        return tunnel

    def require_ssh(self, advice=""):
        if shutil.which("ssh") is None:
            raise Failure("ssh not found on PATH: install the OpenSSH client" + advice)

    def pick_local_port(self):
        asked = self.settings.local_port
        port = find_free_port(asked)
        if port is None:
            raise Failure("no free local port in %d-%d: free one or pass --local-port"
                          % (asked, asked + PORT_TRIES - 1))
        if port != asked:
            say("local port %d is in use; using %d" % (asked, port))
        return port

    def warn_status(self, health, where):
        """Warn once per run: the box check and the tunnel check see the same 503."""
        if health.status == 503 and not self.ollama_warned:
            say("warning: proxy at %s is up but Ollama is not reachable (HTTP 503); continuing, the model may "
                "still be loading" % where)
            self.ollama_warned = True
        elif health.status in (401, 403):
            say("warning: proxy at %s answered /health with HTTP %d; continuing (check PROXY_API_KEY)"
                % (where, health.status))

    def warn_box_hops(self, answer):
        """Says what the box reported that the user should know before the session."""
        for name, status, detail in answer.hops:
            if status in ("failed", "warning"):
                say("warning: %s; continuing" % detail)
            if name == "ollama from proxy" and status == "failed":
                self.ollama_warned = True  # the same fact as a 503 through the tunnel: say it once

    def auth_token(self, destination, box_key):
        """The user's PROXY_API_KEY, else the key the box's proxy was given by --deploy."""
        if self.settings.value("PROXY_API_KEY"):
            return self.settings.value("PROXY_API_KEY")
        if box_key:
            self.keys.keep(destination, box_key)
            return box_key
        return DUMMY_AUTH_TOKEN

    # ------------------------------------------------------------ remote

    def start_remote(self):
        settings = self.settings
        if not settings.destinations:
            raise Failure(settings.no_host_message())
        self.require_ssh(", or use --local for a proxy on this machine")
        destination = settings.destinations[0]
        tunnel = self.new_tunnel(destination, "127.0.0.1:%d" % settings.remote_port, "/health")
        tunnel.start(self.pick_local_port(), connect=False)
        connection = self.connect(destination)
        tunnel.connect()
        box = Box(connection, settings)
        if settings.arguments.deploy:
            ready = box.deploy()
            instance, key = ready.get("instance", ""), ready.get("key", "")
        else:
            answer = box.probe()
            health = Health(int((answer.health or {}).get("status") or 0))
            if not health.up:
                raise Failure("remote proxy down: %s" % answer.hop_detail("remote proxy health", "failed"))
            self.warn_box_hops(answer)
            self.warn_status(health, "%s:%d" % (destination.target, settings.remote_port))
            instance, key = answer.health.get("instance", ""), answer.health.get("key", "")
        connection.close()
        health = tunnel.open(instance)
        self.warn_status(health, "127.0.0.1:%d" % tunnel.port)
        say("tunnel 127.0.0.1:%d -> %s:127.0.0.1:%d is up (ssh pid %s)"
            % (tunnel.port, destination.target, settings.remote_port, tunnel.ssh_pid))
        return tunnel.port, self.auth_token(destination, key)

    def stop_box(self):
        if not self.settings.destinations:
            raise Failure(self.settings.no_host_message())
        self.require_ssh()
        connection = self.connect(self.settings.destinations[0])
        try:
            Box(connection, self.settings).stop(self.settings.arguments.stop_all)
        except Failure as failure:
            raise Failure("stop failed: " + failure.message) from None
        return 0

    # ------------------------------------------------------------ several boxes
    #
    # With --ssh given more than once, each box runs only Ollama and the proxy runs here: one
    # tunnel per box to that box's Ollama, and OLLAMA_HOST lists the tunnels, so the proxy
    # spreads requests over the boxes and fails over.

    def ready_box(self, index, destination, first_port):
        """Readies one box, then opens its tunnel on a free port from first_port up."""
        connection = self.connect(destination, index)
        try:
            answer = Box(connection, self.settings).ready_ollama(self.settings.arguments.deploy)
        except Failure as failure:
            raise Failure("%s: %s" % (destination.target, failure.message)) from None
        connection.close()
        for _, status, detail in answer.hops:
            if status == "failed":
                raise Failure("%s: %s" % (destination.target, detail))
        if not answer.ollama:
            raise Failure("%s: the box did not say where Ollama listens" % destination.target)
        port = find_free_port(first_port)
        if port is None:
            raise Failure("no free local port from %d for the tunnel to %s" % (first_port, destination.target))
        tunnel = self.new_tunnel(destination, answer.ollama, "/api/version")
        tunnel.start(port)
        tunnel.open("")
        say("tunnel 127.0.0.1:%d -> %s:%s (Ollama) is up (ssh pid %s)"
            % (tunnel.port, destination.target, answer.ollama, tunnel.ssh_pid))
        return tunnel

    def start_boxes(self):
        self.require_ssh()
        port = self.pick_local_port()
        tunnels = [self.ready_box(index, destination, port + 1 + index)
                   for index, destination in enumerate(self.settings.destinations)]
        hosts = ",".join("127.0.0.1:%d" % tunnel.port for tunnel in tunnels)
        # The proxy here gets the tunnels as its Ollama hosts.
        self.local_proxy = LocalProxy(self.settings, self.run_folder, port, {
            "OLLAMA_HOST": hosts, "OLLAMA_MODEL": self.settings.value("OLLAMA_MODEL") or self.settings.model})
        self.local_proxy.start()
        say("proxy on 127.0.0.1:%d spreads requests over %d boxes (OLLAMA_HOST=%s)"
            % (port, len(tunnels), hosts))
        return port, self.settings.value("PROXY_API_KEY") or DUMMY_AUTH_TOKEN

    def stop_boxes(self):
        failed = False
        for index, destination in enumerate(self.settings.destinations):
            try:
                connection = self.connect(destination, index)
                Box(connection, self.settings).stop(self.settings.arguments.stop_all)
                connection.close()
            except Failure as failure:
                say("%s: stop failed: %s" % (destination.target, failure.message))
                failed = True
        return 1 if failed else 0

    # ------------------------------------------------------------ local

    def start_local(self):
        settings = self.settings
        health = fetch_health("http://127.0.0.1:%d/health" % settings.local_port, 2)
        if health.up:
            port = settings.local_port
            say("using the proxy already running on 127.0.0.1:%d" % port)
        else:
            port = self.pick_local_port()
            self.local_proxy = LocalProxy(settings, self.run_folder, port)
            health = self.local_proxy.start()
        self.warn_status(health, "127.0.0.1:%d" % port)
        return port, settings.value("PROXY_API_KEY") or DUMMY_AUTH_TOKEN

    # ------------------------------------------------------------ Claude Code

    def run_claude(self, port, token):
        settings = self.settings
        notice = settings.lean_notice()
        if notice:
            say(notice)
        claude = self.claude = ClaudeRun(settings, port, token)
        claude.start(self.environ)
        for tunnel in self.tunnels:
            tunnel.keep()
        status = claude.wait()
        self.claude = None
        for tunnel in self.tunnels:
            tunnel.close()
        claude.resume_hint(self.environ)
        self.billing_notice()
        return status

    def billing_notice(self):
        settings = self.settings
        if settings.mode == "remote":
            say("the box %s keeps running (and billing) with the proxy on it: stop the proxy with %s --stop --all, "
                "and stop or destroy the instance with your provider when done"
                % (settings.destinations[0].target, settings.launch_command(stop=True)))
        elif settings.mode == "boxes":
            say("the boxes %s keep running (and billing) with Ollama on them: stop it with %s --stop --all, and "
                "stop or destroy the instances with your provider when done"
                % (" ".join(d.target for d in settings.destinations), settings.launch_command(stop=True)))
        elif settings.mode == "vast":
            self.settle_rental()

    def abandon_rental(self):
        """A rental this run made and left before it was usable (a signal while it was created or
        booted): it has no watchdog yet, so it is destroyed here rather than left billing."""
        try:
            destroyed = self.rental.abandon()
        except claude_vast.VastError as error:
            say("could not destroy what this run rented (%s): run %s --vast --destroy" % (
                error, self.environ.get("CLAUDE_START_COMMAND") or "claude_start.sh"))
            return
        for instance_id in destroyed:
            say("destroyed instance %s, rented by this run and not set up yet, so that nothing keeps billing"
                % instance_id)

    def settle_rental(self):
        """Detach (from now on the box's idle clock runs), apply --on-exit, and say what the
        session cost and what keeps billing until when."""
        self.attachment.close()
        self.attachment = None
        choices = self.settings.vast
        try:
            lines = self.rental.summary(choices.on_exit, choices.idle_stop if self.watchdog_armed else None)
        except claude_vast.VastError as error:
            lines = ["could not settle instance %s at exit: %s" % (self.rental.instance.id, error)]
        for line in lines:
            say(line)

    # ------------------------------------------------------------ vast.ai
    #
    # --vast: the box is our instance on vast.ai, found by its label, started or rented, then
    # deployed as with --deploy; its watchdog stops it when idle, and this run's heartbeat keeps
    # it from doing so while the session lasts.

    def new_rental(self):
        choices, environ = self.settings.vast, self.environ
        cache = environ.get("XDG_CACHE_HOME") or os.path.join(environ.get("HOME") or "~", ".cache")
        provider = claude_vast.VastProvider.from_environment(environ)
        return claude_vast.Rental(provider, label=choices.label, query=choices.query, image=choices.image,
                                  boot_timeout=choices.boot_timeout, poll=choices.poll,
                                  state_dir=os.path.join(cache, "simple_api_proxy", "vast"), say=say,
                                  vast_url=provider.api.url, home=environ.get("HOME"))

    @staticmethod
    def vast_destination(target):
        return SshDestination.of(target.user, target.host, target.port, target.known_hosts, target.identity)

    @staticmethod
    def on_box(destination):
        """ssh_command(remote) for claude_vast's calls to the box."""
        return lambda remote: ["ssh"] + destination.options() + ["-o", "BatchMode=yes", "--", destination.target,
                                                                  remote]

    def confirm_destroy(self, instance):
        if self.settings.arguments.yes:
            return True
        sys.stderr.write("%s: destroy instance %s (%s, %s)? Its disk and everything on it goes. [y/N] "
                         % (PROG, instance.id, instance.gpu, instance.state))
        sys.stderr.flush()
        answer = sys.stdin.readline()
        if not sys.stdin.isatty():
            sys.stderr.write(answer if answer.endswith("\n") else answer + "\n")  # as a terminal would echo it
        return answer.strip().lower() in ("y", "yes")

    def run_vast(self):
        arguments, choices = self.settings.arguments, self.settings.vast
        rental = self.rental = self.new_rental()
        if arguments.status:
            for line in rental.status_lines(rental.idle_of):
                say(line)
            return 0
        if arguments.stop:
            stopped = rental.stop_all()
            say("stopped instance(s) %s: their disks still bill a little; --vast --destroy ends that"
                % ", ".join(map(str, stopped)) if stopped else "no running instance labelled %s" % choices.label)
            return 0
        if arguments.destroy:
            destroyed = rental.destroy_all(self.confirm_destroy)
            say("destroyed instance(s) %s: nothing of them bills any more" % ", ".join(map(str, destroyed))
                if destroyed else "nothing destroyed")
            return 0
        self.require_ssh()
        if arguments.check:
            running = [i for i in rental.provider.list_by_label(choices.label) if i.state == "running"]
            if not running:
                raise Failure("no running instance labelled %s: see --vast --status, or start one with --vast"
                              % choices.label)
            self.settings.destinations = [self.vast_destination(rental.target_of(running[-1]))]
            self.settings.mode = "remote"
            return self.check()
        if shutil.which("claude") is None:  # before anything is rented
            raise Failure("claude not found on PATH: install Claude Code (npm install -g @anthropic-ai/claude-code) "
                          "or fix PATH")
        destination = self.vast_destination(rental.acquire())
        self.settings.destinations = [destination]
        self.settings.arguments.deploy = True
        try:
            claude_vast.arm_watchdog(self.on_box(destination), rental.watchdog_settings(
                choices.idle_stop, choices.idle_action, self.settings.remote_port, choices.watchdog_tick))
        except claude_vast.VastError as error:
            say("warning: %s: nothing will stop this box when idle; stop it yourself with --vast --stop" % error)
            self.watchdog_armed = False
        # From here on, however the run ends, close() settles the box (--on-exit) and says what it costs.
        self.attachment = claude_vast.Attachment(self.on_box(destination), choices.heartbeat).start()
        port, token = self.start_remote()
        return self.run_claude(port, token)

    # ------------------------------------------------------------ --check

    def check(self):
        report = CheckReport()
        {"local": self.check_local, "boxes": self.check_boxes, "remote": self.check_remote}[self.settings.mode](report)
        claude = shutil.which("claude")
        if claude:
            report.hop("claude on PATH", "ok", claude)
        else:
            report.hop("claude on PATH", "failed", "install Claude Code (npm install -g @anthropic-ai/claude-code) "
                       "or fix PATH")
        if report.failed:
            say("%d check(s) failed" % report.failed)
            return 1
        say("all checks passed")
        return 0

    def check_remote(self, report):
        settings = self.settings
        answer, skip = None, ""
        if not settings.destinations:
            report.hop("ssh reachable", "failed", settings.no_host_message())
            skip = "no ssh host"
        elif shutil.which("ssh") is None:
            report.hop("ssh reachable", "failed", "ssh not found on PATH")
            skip = "no ssh"
        else:
            destination = settings.destinations[0]
            try:
                connection = self.connect(destination)
            except Failure as failure:
                report.hop("ssh reachable", "failed", failure.message)
                skip = "ssh failed"
            else:
                report.hop("ssh reachable", "ok", str(destination))
                try:
                    answer = Box(connection, settings).probe()
                except Failure as failure:
                    report.hop("remote proxy health", "failed", failure.message)
                    skip = "the box check failed"
                else:
                    # The box's own view: the proxy, Ollama as the proxy sees it, each model, Redis.
                    for hop in answer.hops:
                        report.hop(*hop)
                    if not Health(int((answer.health or {}).get("status") or 0)).up:
                        skip = "remote proxy down"
                connection.close()
        if skip:
            if skip != "remote proxy down":
                report.hop("remote proxy health", "failed", "not checked: " + skip)
            report.hop("tunnel", "failed", "not tried: " + skip)
            report.hop("local health", "failed", "not tried: " + skip)
            return
        destination = settings.destinations[0]
        where = "%s:127.0.0.1:%d" % (destination.target, settings.remote_port)
        tunnel = self.new_tunnel(destination, "127.0.0.1:%d" % settings.remote_port, "/health")
        try:
            tunnel.start(self.pick_local_port())
            health = tunnel.open(answer.health.get("instance", ""))
        except TunnelSilent as silent:
            if silent.ssh_was_up:
                report.hop("tunnel", "ok", "127.0.0.1:%d -> %s, ssh pid %s" % (tunnel.port, where, tunnel.ssh_pid))
                report.hop("local health", "failed", silent.message)
            else:
                report.hop("tunnel", "failed", silent.message)
                report.hop("local health", "failed", "not tried: no tunnel")
        except Failure as failure:
            report.hop("tunnel", "failed", failure.message)
            report.hop("local health", "failed", "not tried: no tunnel")
        else:
            report.hop("tunnel", "ok", "127.0.0.1:%d -> %s, ssh pid %s" % (tunnel.port, where, tunnel.ssh_pid))
            report.hop("local health", "ok", "http://127.0.0.1:%d/health, %s%s" % (
                tunnel.port, health.note(), ", instance %s as on the box" % health.instance if health.instance else ""))
        tunnel.close()

    def check_local(self, report):
        settings = self.settings
        for name in ("ssh reachable", "remote proxy health", "tunnel"):
            report.hop(name, "skipped", "--local")
        health = fetch_health("http://127.0.0.1:%d/health" % settings.local_port, 2)
        if health.up:
            report.hop("local health", "ok", "http://127.0.0.1:%d/health, %s" % (settings.local_port, health.note()))
        elif settings.proxy_script.is_file():
            report.hop("local health", "ok", "nothing answers on 127.0.0.1:%d yet; --local will start %s"
                       % (settings.local_port, settings.proxy_script))
        else:
            report.hop("local health", "failed", "nothing answers on 127.0.0.1:%d and %s cannot be started "
                       "(missing file)" % (settings.local_port, settings.proxy_script))

    def check_boxes(self, report):
        settings = self.settings
        for index, destination in enumerate(settings.destinations):
            host = destination.target
            if shutil.which("ssh") is None:
                report.hop("ssh reachable", "failed", "%s: ssh not found on PATH" % host)
                continue
            try:
                connection = self.connect(destination, index)
            except Failure as failure:
                report.hop("ssh reachable", "failed", "%s: %s" % (host, failure.message))
                continue
            report.hop("ssh reachable", "ok", str(destination))
            try:
                answer = Box(connection, settings).ready_ollama(deploy=False)
            except Failure as failure:
                report.hop("ollama on box", "failed", "%s: %s" % (host, failure.message))
                connection.close()
                continue
            connection.close()
            for name, status, detail in answer.hops:
                report.hop(name, status, "%s: %s" % (host, detail))
            if not answer.ollama:
                continue
            tunnel = self.new_tunnel(destination, answer.ollama, "/api/version")
            port = find_free_port(settings.local_port + 1 + index)
            try:
                if port is None:
                    raise Failure("no free local port")
                tunnel.start(port)
                tunnel.open("", retry=False)
                report.hop("tunnel", "ok", "127.0.0.1:%d -> %s:%s (Ollama), ssh pid %s"
                           % (tunnel.port, host, answer.ollama, tunnel.ssh_pid))
            except Failure as failure:
                report.hop("tunnel", "failed", "%s: %s" % (host, failure.message))
            tunnel.close()
        if settings.proxy_script.is_file():
            report.hop("local proxy", "ok", "%s starts here with the tunnels as OLLAMA_HOST" % settings.proxy_script)
        else:
            report.hop("local proxy", "failed", "%s cannot be started here (missing file): set "
                       "CLAUDE_START_PROXY_SCRIPT" % settings.proxy_script)


###############################################################################
# main()
###############################################################################

def main(argv=None, environ=None):
    setup_logging()
    environ = dict(os.environ if environ is None else environ)
    try:
        arguments = parse_args(sys.argv[1:] if argv is None else argv)
        if arguments.help:
            sys.stdout.write(usage())
            return 0
        arguments.check_modes()
        settings = Settings(arguments, environ)
        return Launcher(settings, environ).run()
    except Failure as failure:
        say(failure.message)
        return failure.status


if __name__ == "__main__":
    sys.exit(main())
