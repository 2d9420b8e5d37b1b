"""The GPU box side of claude_start (python3 >= 3.8, standard library only).

The laptop launcher (claude_start.py) sends this file over its one SSH connection on every call,
on the remote command's stdin, followed by one JSON request line and the files that request
uploads; nothing is installed on the box beforehand. It answers with JSON lines on stdout, one
event each (see Reporter); anything else the box prints is shown to the user as it is.

`up` keeps a copy of this file as ~/.simple_api_proxy/box.py, so that `python3 box.py` brings
Ollama and the proxy back after a reboot with the settings of the last deploy.

Sections: files and processes on the box; Ollama; the proxy; commands; main.
"""

import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request

FOLDER = os.path.join(os.path.expanduser("~"), ".simple_api_proxy")
PROXY_SCRIPT = "simple_api_proxy.py"
PROXY_SETTINGS = "proxy.json"
OLD_PROXY_ENV = "proxy.env"  # KEY=VALUE lines of launchers before 1.1: removed, it may hold secrets
PROXY_KEY = "proxy.key"
PROXY_PID = "proxy.pid"
PROXY_LOG = "proxy.log"
PROXY_STAMP = "proxy.stamp"
PROXY_INSTANCE = "proxy.instance"
THINKING_KEY = "thinking.key"  # seals hidden thinking; kept, so a restarted proxy can still open its seals
OLLAMA_PID = "ollama.pid"
OLLAMA_LOG = "ollama.log"
INSTALL_LOG = "ollama-install.log"
OFFICIAL_INSTALLER = "ollama.com/install.sh"
LAST_DEPLOY = "deploy.json"
BOX_COPY = "box.py"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Failed(Exception):
    """A step that cannot go on; its message says what to do."""


class Reporter:
    """The box's answer: one JSON object a line on stdout, each with an "event":
    say (text for the user), need (files to upload), ready (the proxy answers), health, hop (one
    --check line), ollama (where Ollama listens), key (the proxy's generated API key), fail."""

    def __init__(self, stream):
        self.stream = stream

    def send(self, event, **fields):
        fields["event"] = event
        self.stream.write(json.dumps(fields) + "\n")
        self.stream.flush()

    def say(self, text):
        self.send("say", text=text)

    def hop(self, name, status, detail):
        self.send("hop", name=name, status=status, detail=detail)


###############################################################################
# Files and processes on the box
###############################################################################

def path(name):
    return os.path.join(FOLDER, name)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def file_hash(name):
    try:
        with open(path(name), "rb") as f:
            return sha256(f.read())
    except OSError:
        return ""


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


def remove(name):
    try:
        os.remove(path(name))
    except FileNotFoundError:
        pass


def make_folder():
    os.makedirs(FOLDER, mode=0o700, exist_ok=True)
    os.chmod(FOLDER, 0o700)


def last_lines(name, count=10):
    try:
        with open(path(name), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return "  (no log)"
    return "\n".join("  | " + line for line in lines[-count:]) or "  (log is empty)"


def proxy_settings():
    """proxy.json: the settings the launcher sent, as JSON (a value cannot add a setting)."""
    try:
        settings = json.loads(read(PROXY_SETTINGS) or "{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in settings.items()} if isinstance(settings, dict) else {}


def proxy_key(settings):
    """The key /health and Claude Code need: the user's PROXY_API_KEY, else the generated one."""
    return settings.get("PROXY_API_KEY") or read(PROXY_KEY)


class Rules:
    """OLLAMA_HOST's address rules and Ollama's model naming, as simple_api_proxy.py has them: the
    launcher sends their source with each request (see claude_start.BoxRequest), so that they mean
    here exactly what they mean to the proxy, also on a box that runs Ollama only."""

    def __init__(self, source):
        self.namespace = {"__name__": "simple_api_proxy_rules"}
        exec(compile(source, "simple_api_proxy rules", "exec"), self.namespace)

    def ollama_url(self, settings):
        """The Ollama this box readies: the first address of OLLAMA_HOST (the rest are the user's own)."""
        value = settings.get("OLLAMA_HOST") or os.environ.get("OLLAMA_HOST") or "127.0.0.1:11434"
        try:
            return self.namespace["parse_ollama_hosts"](value)[0].url
        except ValueError as error:
            raise Failed("OLLAMA_HOST=%s: %s" % (value, error)) from None

    def installed(self, name, models):
        return any(self.namespace["same_model"](name, model) for model in models)


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


def process_state(pid):
    """(command line, start time) of a live process; None when it is gone (a zombie counts as gone).
    The start time, in clock ticks since boot, tells a process from a later one given the same pid."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            return None
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            # Empty for a moment while the process execs.
            command = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip() or "pid %d" % pid
        return command, fields[19]
    except (OSError, IndexError):
        return None


def process_command(pid):
    state = process_state(pid)
    return state[0] if state else ""


def record_pid(name, pid):
    """A pidfile, and beside it (name.start) the process's start time, which names it for good."""
    state = process_state(pid)
    write(name + ".start", state[1] if state else "")
    write(name, "%d\n" % pid)


def pid_from(name, marker):
    """The pid in a pidfile, if that very process (the same start time) still runs `marker`."""
    try:
        pid = int(read(name) or 0)
    except ValueError:
        return 0
    state = process_state(pid) if pid > 0 else None
    if not state or marker not in state[0] or read(name + ".start") != state[1]:
        return 0  # gone, or its pid now names another process: never signal it
    return pid


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
    """SIGTERM, then SIGKILL once `grace` seconds pass; True when it is gone. Only for a pid that
    pid_from vouched for a moment ago, and checked again before the SIGKILL."""
    identity = process_state(pid)
    if identity is None:
        return True
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if process_state(pid) != identity:
            return True
        time.sleep(0.05)
    if process_state(pid) == identity:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    return process_state(pid) != identity


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


###############################################################################
# Ollama
###############################################################################

def ollama_binary():
    return shutil.which("ollama") or next(
        (p for p in ("/usr/local/bin/ollama", "/usr/bin/ollama") if os.access(p, os.X_OK)), None)


def step_ollama(call, settings):
    """Ollama answers, or gets installed and started until it does."""
    report, request = call.report, call.request
    url = call.rules.ollama_url(settings)
    if http_json(url + "/api/version", 2)[0] == 200:
        report.say("Ollama answers at %s" % url)
        return url
    binary = ollama_binary()
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
        report.say("Ollama is not installed; installing it: %s (log: %s)" % (command, path(INSTALL_LOG)))
        status = run_logged(report, ["sh", "-c", command], INSTALL_LOG, request["install_timeout"])
        binary = ollama_binary()
        if status != 0 or binary is None:
            raise Failed("installing Ollama failed (%s); last lines of %s:\n%s\n"
                         "install it by hand (https://ollama.com/download/linux), then run --deploy again"
                         % ("exit %s" % status if status is not None else "timed out",
                            path(INSTALL_LOG), last_lines(INSTALL_LOG)))
    env = dict(os.environ)
    env["OLLAMA_HOST"] = url.split("://", 1)[1]
    pid = start_detached([binary, "serve"], OLLAMA_LOG, env)
    record_pid(OLLAMA_PID, pid)
    report.say("started ollama serve (pid %d, log %s); waiting for it" % (pid, path(OLLAMA_LOG)))
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


def run_logged(report, argv, log_name, timeout):
    """Run with output shown and kept in a log; the exit status, None on timeout."""
    deadline = time.monotonic() + timeout
    with open(path(log_name), "ab") as log:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        for line in iter(child.stdout.readline, b""):
            log.write(line)
            report.say("  " + line.decode("utf-8", "replace").rstrip())
            if time.monotonic() > deadline:
                break
        if time.monotonic() > deadline:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            return None
        return child.wait()


def ollama_models(url, timeout):
    status, body = http_json(url + "/api/tags", timeout)
    models = {m.get("name") for m in (body or {}).get("models", []) if isinstance(m, dict)}
    return status, models


def step_models(call, url):
    """Pull each model `ollama list` lacks, showing Ollama's progress."""
    models = ollama_models(url, 10)[1]
    for model in call.request["models"]:
        if call.rules.installed(model, models):
            continue
        call.report.say("pulling %s (not in `ollama list`)" % model)
        pull(call.report, url, model, call.request["pull_timeout"])


def pull(report, url, model, timeout):
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
                report.say("  %s: %s" % (model, text))
    except urllib.error.HTTPError as error:
        raise Failed("Ollama refused to pull %s (HTTP %s)" % (model, error.code)) from None
    except OSError as error:
        raise Failed("pulling %s failed: %s" % (model, error)) from None


###############################################################################
# The proxy
###############################################################################

def step_key(request, settings):
    """Without a PROXY_API_KEY of the user's, the proxy gets a random one, made here once and kept
    (mode 0600), so that other users of this box cannot use it through its loopback port."""
    if settings.get("PROXY_API_KEY") or not request.get("generate_key"):
        remove(PROXY_KEY)
        return
    if not read(PROXY_KEY):
        write(PROXY_KEY, secrets.token_urlsafe(32))


def step_proxy(call, settings):
    """The proxy runs with this file, these settings and this key: left alone, restarted, or started."""
    report, request = call.report, call.request
    port = request["port"]
    key = proxy_key(settings)
    stamp = sha256((request["hashes"][PROXY_SCRIPT] + request["hashes"][PROXY_SETTINGS] + sha256(key.encode()))
                   .encode())
    pid = pid_from(PROXY_PID, PROXY_SCRIPT)
    if pid and read(PROXY_STAMP) == stamp:
        report.say("proxy already running with this file and settings (pid %d)" % pid)
        return pid
    if pid:
        report.say("file or settings changed: restarting the proxy (pid %d)" % pid)
        if not stop_process(pid, float(settings.get("SHUTDOWN_GRACE") or 10) + 5):
            raise Failed("the old proxy (pid %d) did not stop: kill it on the box, then run --deploy again" % pid)
    if port_taken(port):
        raise Failed("port %d on the box is held by %s: stop it, or pick another port with --remote-port"
                     % (port, port_holder(port)))
    env = dict(os.environ)
    env["THINKING_KEY_FILE"] = path(THINKING_KEY)  # unless the settings name another
    env.update(settings)
    if key:
        env["PROXY_API_KEY"] = key
    pid = start_detached([sys.executable, PROXY_SCRIPT], PROXY_LOG, env)
    record_pid(PROXY_PID, pid)
    write(PROXY_STAMP, stamp)
    report.say("started the proxy on 127.0.0.1:%d (pid %d, log %s)" % (port, pid, path(PROXY_LOG)))
    return pid


def proxy_health(port, settings, timeout=5):
    key = proxy_key(settings)
    return http_json("http://127.0.0.1:%d/health" % port, timeout, {"x-api-key": key} if key else {})


def step_wait(call, settings, pid):
    """Until /health says Ollama answers and every model is there."""
    report, request = call.report, call.request
    port = request["port"]
    deadline = time.monotonic() + request["health_wait"]
    status, body = 0, None
    while time.monotonic() < deadline:
        if not process_command(pid):
            raise Failed("the proxy exited at start (%s); last lines of %s:\n%s"
                         % (exit_status(pid), path(PROXY_LOG), last_lines(PROXY_LOG)))
        status, body = proxy_health(port, settings)
        if status == 200 and isinstance(body, dict) and not missing_models(call, body):
            write(PROXY_INSTANCE, body.get("instance_id", ""), 0o644)
            redis_advice(report, body)
            report.send("ready", instance=body.get("instance_id", ""), pid=pid, key=read(PROXY_KEY))
            return
        time.sleep(0.2)
    detail = "nothing answers" if status == 0 else "HTTP %d" % status
    if isinstance(body, dict) and status:
        if not body.get("ollama", {}).get("reachable", True):
            detail = "Ollama not reachable from the proxy: %s" % body["ollama"].get("error", "")
        elif missing_models(call, body):
            detail = "model(s) %s not in Ollama" % ", ".join(missing_models(call, body))
    raise Failed("the proxy's /health was not ready within %s s (%s); last lines of %s:\n%s"
                 % (request["health_wait"], detail, path(PROXY_LOG), last_lines(PROXY_LOG)))


def missing_models(call, body):
    models = body.get("ollama", {}).get("models")
    if models is None:
        return []
    return [m for m in call.request["models"] if not call.rules.installed(m, models)]


def redis_advice(report, body):
    redis = body.get("cache", {}).get("redis", {})
    if "redis-py is not installed" not in str(redis.get("reason", "")):
        return
    managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
    report.say("warning: REDIS_URL is set but redis-py is missing on the box, so the proxy runs on its memory "
               "cache meanwhile. Install it with one of: python3 -m pip install --user redis%s | apt-get install "
               "python3-redis (Debian/Ubuntu) | python3 -m pip install --break-system-packages redis; then run "
               "--deploy again" % (" (this python is externally managed, PEP 668: pip may refuse)" if managed else ""))


###############################################################################
# Commands
###############################################################################

def receive_files(call):
    """Write the uploaded files; ask for the ones whose hash differs and were not sent. False then."""
    make_folder()
    missing = []
    for name, want in call.request.get("hashes", {}).items():
        if name in call.uploads:
            if sha256(call.uploads[name]) != want:
                raise Failed("%s arrived damaged (hash mismatch): run the launcher again" % name)
            write(name, call.uploads[name], 0o600 if name == PROXY_SETTINGS else 0o644)
        elif file_hash(name) != want:
            missing.append(name)
    if missing:
        call.report.send("need", files=missing)
    return not missing


def command_up(call):
    if not receive_files(call):
        return 0
    remove(OLD_PROXY_ENV)
    if call.source and read(BOX_COPY) != call.source.strip():
        write(BOX_COPY, call.source, 0o644)
    write(LAST_DEPLOY, json.dumps(dict(call.request, step="up", sizes={})), 0o600)
    settings = proxy_settings()
    url = step_ollama(call, settings)
    step_models(call, url)
    step_key(call.request, settings)
    pid = step_proxy(call, settings)
    step_wait(call, settings, pid)
    return 0


def command_stop(call):
    report = call.report
    settings = proxy_settings()
    grace = float(settings.get("SHUTDOWN_GRACE") or 10) + 5
    pid = pid_from(PROXY_PID, PROXY_SCRIPT)
    if pid:
        report.say("stopping the proxy (pid %d)" % pid)
        if not stop_process(pid, grace):
            raise Failed("the proxy (pid %d) did not stop" % pid)
        report.say("proxy stopped")
    else:
        report.say("no proxy started by the launcher is running")
    for name in (PROXY_PID, PROXY_PID + ".start", PROXY_STAMP, PROXY_INSTANCE):
        remove(name)
    if call.request.get("all"):
        pid = pid_from(OLLAMA_PID, "ollama")
        if pid:
            report.say("stopping ollama serve (pid %d)" % pid)
            if not stop_process(pid, 10):
                raise Failed("ollama serve (pid %d) did not stop" % pid)
            remove(OLLAMA_PID)
            remove(OLLAMA_PID + ".start")
            report.say("ollama serve stopped")
        else:
            report.say("no ollama serve started by the launcher is running")
    return 0


def command_probe(call):
    """What the proxy on the box says about itself, as hops; also its instance id and key."""
    report = call.report
    settings = proxy_settings()
    port = call.request["port"]
    status, body = proxy_health(port, settings)
    where = "127.0.0.1:%d on the box" % port
    if status == 0:
        report.send("health", status=0)
        report.hop("remote proxy health", "failed", "nothing answers on %s: run the launcher with --deploy "
                   "(or start `python3 simple_api_proxy.py` there with API_PORT=%d)" % (where, port))
        return 0
    if not isinstance(body, dict) or body.get("service") != "simple_api_proxy":
        report.send("health", status=status)
        report.hop("remote proxy health", "failed", "%s answered /health with HTTP %d but it is not "
                   "simple_api_proxy.py: check --remote-port" % (where, status))
        return 0
    report.send("health", status=status, instance=body.get("instance_id") or "", key=read(PROXY_KEY))
    pid = pid_from(PROXY_PID, PROXY_SCRIPT)
    report.hop("remote proxy health", "ok", "%s, HTTP %d%s" % (where, status, ", pid %d" % pid if pid else ""))
    ollama = body.get("ollama")
    if ollama is None:
        report.hop("ollama from proxy", "skipped", "/health gives details only with PROXY_API_KEY")
        return 0
    if not ollama.get("reachable"):
        report.hop("ollama from proxy", "failed", "Ollama not reachable from the proxy at %s (%s): start it on "
                   "the box (ollama serve) or use --deploy" % (ollama.get("url"), ollama.get("error", "no answer")))
        return 0
    report.hop("ollama from proxy", "ok", "%s, version %s" % (ollama.get("url"), ollama.get("version")))
    model_hops(call, ollama.get("models") or [])
    redis = body.get("cache", {}).get("redis", {})
    if redis.get("state") == "down":
        report.hop("redis", "warning", "Redis at %s is down (%s); the proxy serves from its memory cache"
                   % (redis.get("url"), redis.get("last_error", "no answer")))
    elif "redis-py" in str(redis.get("reason", "")):
        report.hop("redis", "warning", "REDIS_URL is set but redis-py is missing on the box; memory cache only"
                   " (see --deploy for how to install it)")
    elif redis.get("state") == "up":
        report.hop("redis", "ok", str(redis.get("url")))
    return 0


def model_hops(call, models):
    for model in call.request["models"]:
        if call.rules.installed(model, models):
            call.report.hop("model", "ok", "%s installed" % model)
        else:
            call.report.hop("model", "failed", "model %s not installed (run: ollama pull %s, or use --deploy)"
                            % (model, model))


def command_ollama(call):
    """For several boxes behind a proxy on the laptop: only Ollama and the models on this one."""
    make_folder()
    url = step_ollama(call, {})
    step_models(call, url)
    call.report.send("ollama", address=url.split("://", 1)[1])
    return 0


def command_ollama_probe(call):
    url = call.rules.ollama_url({})
    status, models = ollama_models(url, 5)
    if status != 200:
        call.report.hop("ollama on box", "failed", "Ollama not answering at %s on the box: use --deploy, or "
                        "start `ollama serve` there" % url)
        return 0
    call.report.send("ollama", address=url.split("://", 1)[1])
    call.report.hop("ollama on box", "ok", url)
    model_hops(call, models)
    return 0


COMMANDS = {"up": command_up, "stop": command_stop, "probe": command_probe, "ollama": command_ollama,
            "ollama_probe": command_ollama_probe}


###############################################################################
# Main
###############################################################################

class Call:
    """One call from the launcher: its request, the files it uploaded, the rules it sent, and
    where the answer goes; `source` is this program's text, kept on the box by `up`."""

    def __init__(self, request, uploads, source, report):
        self.request, self.uploads, self.source, self.report = request, uploads, source, report
        self.rules = Rules(request["rules"])

    def run(self):
        try:
            return COMMANDS[self.request["step"]](self)
        except Failed as failure:
            self.report.send("fail", message=str(failure))
            return 1


def main(stream, source):
    """The launcher's call: a JSON request line on `stream`, then the uploads it lists by size."""
    request = json.loads(stream.readline())
    uploads = {name: stream.read(size) for name, size in request.get("sizes", {}).items()}
    return Call(request, uploads, source, Reporter(sys.stdout)).run()


def restart_last_deploy():
    """Run on the box itself (e.g. from /root/onstart.sh): redo the last deploy."""
    report = Reporter(sys.stdout)
    try:
        with open(path(LAST_DEPLOY)) as saved:
            last = json.load(saved)
        last["hashes"] = {name: file_hash(name) for name in last["hashes"]}
        return Call(last, {}, "", report).run()
    except (OSError, ValueError, KeyError) as error:
        report.send("fail", message="no usable %s (%s): run --deploy from the laptop" % (path(LAST_DEPLOY), error))
    return 1


if __name__ == "__main__":
    sys.exit(restart_last_deploy() if sys.argv[1:] in ([], ["up"]) else 2)
