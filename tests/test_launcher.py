"""claude_start.sh, the laptop-side launcher (the entry point, and claude_start.py behind it).

Unit tests call claude_start's functions; the end-to-end tests run the real entry point.
Stand-in `ssh` and `claude` executables (standins/bin) sit first on PATH; the "remote" proxy is a
stdlib HTTP server on a loopback port that the stand-in ssh reaches by running the remote command
locally, and whose tunnel (`ssh -N -L L:127.0.0.1:R`) is a real TCP forwarder.
"""

import contextlib
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import claude_box
import claude_start
import simple_api_proxy as proxy

from standins.support import descendants, LAUNCHER_SCRIPT, pid_alive, poll_until, process_command, ROOT, STANDIN_BIN


LAUNCHER_RUN_TIMEOUT = 20


LAUNCHER_MODEL_DEFAULT = "qwen2.5-coder:7b"


def _launcher_free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher_http_status(port):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        return opener.open("http://127.0.0.1:%d/health" % port, timeout=2).getcode()
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def _launcher_error_line(result):
    """The launcher failed with exactly one `claude_start: ` line on stderr."""
    assert result.returncode != 0, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("claude_start: "), result.stderr
    assert result.stdout == ""
    return lines[0]


def _launcher_all_prefixed(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert all(line.startswith("claude_start: ") for line in lines), result.stderr
    return lines


class _LauncherHealthHandler(http.server.BaseHTTPRequestHandler):
    """/health as the proxy answers it: 200, or 503 when Ollama is not reachable."""
    status = 200
    instance_id = "5eed1d0000000001"

    def do_GET(self):
        ollama = {"url": "http://localhost:11434", "reachable": self.status == 200, "version": "0.33.0",
                  "models": [LAUNCHER_MODEL_DEFAULT, "qwen3:32b"]}
        if self.status != 200:
            ollama = {"url": "http://localhost:11434", "reachable": False,
                      "error": "cannot reach Ollama at http://localhost:11434"}
        body = json.dumps({"status": "ok" if self.status == 200 else "degraded", "service": "simple_api_proxy",
                           "instance_id": self.instance_id, "ollama": ollama}).encode()
        self.send_response(self.status if self.path == "/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _LauncherSandbox:
    """Stub binaries, a hermetic PATH and environment, and cleanup of all processes."""

    def __init__(self, tmp_path):
        self.root = tmp_path
        self.home = tmp_path / "home"
        self.tmp = tmp_path / "tmp"
        self.records = tmp_path / "ssh-records"
        self.sysbin = tmp_path / "sysbin"
        self.sysbin_nocurl = tmp_path / "sysbin-nocurl"
        self.ssh_dir = tmp_path / "stub-ssh"
        self.claude_dir = tmp_path / "stub-claude"
        for d in (self.home, self.tmp, self.records, self.sysbin, self.sysbin_nocurl,
                  self.ssh_dir, self.claude_dir):
            d.mkdir()
        self.claude_out = tmp_path / "claude.json"
        self.stub_ssh = self._install("launcher_ssh.py", self.ssh_dir / "ssh")
        self._install("launcher_claude.py", self.claude_dir / "claude")
        self.stub_proxy = self._install("launcher_proxy.py", tmp_path / "stub_proxy.py")
        # Only the system binaries the launcher and the stubs need, so nothing
        # from the real machine (a real ssh or claude) can leak in.
        tools = {"python3": sys.executable}
        for name in ("bash", "sh", "env", "cat", "sleep", "readlink", "curl", "mktemp", "rm", "find", "wc",
                     "tr", "sha256sum"):
            found = shutil.which(name)
            if found:
                tools[name] = found
        for name, target in tools.items():
            (self.sysbin / name).symlink_to(target)
            if name != "curl":
                (self.sysbin_nocurl / name).symlink_to(target)
        self.procs = []
        self.servers = []

    @staticmethod
    def _install(program, path):
        shutil.copyfile(STANDIN_BIN / program, path)
        path.chmod(0o755)
        return path

    def path(self, ssh=True, claude=True, curl=True):
        dirs = [self.ssh_dir] if ssh else []
        dirs += [self.claude_dir] if claude else []
        dirs.append(self.sysbin if curl else self.sysbin_nocurl)
        return os.pathsep.join(str(d) for d in dirs)

    def env(self, ssh=True, claude=True, curl=True, **extra):
        env = {
            "PATH": self.path(ssh, claude, curl),
            "HOME": str(self.home),
            "TMPDIR": str(self.tmp),
            "LANG": "C.UTF-8",
            "STUB_CLAUDE_OUT": str(self.claude_out),
            "STUB_SSH_RECORD_DIR": str(self.records),
        }
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, args, env, cwd=None):
        proc = subprocess.Popen(
            [str(LAUNCHER_SCRIPT), *args], env=env, stdin=subprocess.DEVNULL, cwd=cwd,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        self.procs.append(proc)
        try:
            out, err = proc.communicate(timeout=LAUNCHER_RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail("claude_start.sh timed out\nstdout:\n%s\nstderr:\n%s" % (out, err))
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def spawn(self, args, env=None):
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def remote_proxy(self, status=200):
        """The 'remote' proxy: an in-process /health server; returns its port."""
        handler = type("_LauncherHandler", (_LauncherHealthHandler,), {"status": status})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.servers.append(server)
        return server.server_address[1]

    def local_proxy(self, port, **extra):
        """A stand-in proxy already running on this machine (separate process)."""
        proc = self.spawn([sys.executable, str(self.stub_proxy)],
                          env=dict(os.environ, API_PORT=str(port), API_HOST="127.0.0.1", **extra))
        assert poll_until(lambda: _launcher_http_status(port) is not None)
        return proc

    def claude_record(self):
        return json.loads(self.claude_out.read_text())

    def ssh_records(self, tunnel=None, kind=None):
        """What ssh ran: tunnel=True the tunnels, tunnel=False the box calls; kind picks any."""
        recs = [json.loads(p.read_text()) for p in sorted(self.records.glob("ssh-*.json"))]
        if tunnel is not None:
            kind = "tunnel" if tunnel else "command"
        return [r for r in recs if kind is None or r["kind"] == kind]

    def assert_no_tunnel_left(self):
        for rec in self.ssh_records(tunnel=True):
            assert poll_until(lambda pid=rec["pid"]: not pid_alive(pid), 3), rec

    def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        pids = [r["pid"] for r in self.ssh_records()]
        for record in self.root.glob("proxy-*.json"):
            with contextlib.suppress(ValueError, KeyError):
                pids.append(json.loads(record.read_text())["pid"])
        for pid in pids:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def launcher_sandbox(tmp_path):
    sandbox = _LauncherSandbox(tmp_path)
    try:
        yield sandbox
    finally:
        sandbox.cleanup()


def _settings(argv, environ):
    arguments = claude_start.parse_args(argv)
    arguments.check_modes()
    return claude_start.Settings(arguments, environ)


def _launcher_expected_env(port, model=LAUNCHER_MODEL_DEFAULT, context="32768",
                           output="8192", timeout="600000", told=None):
    """told: the window Claude Code is told, when not `context` (see compacting_window)."""
    return {
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:%d" % port,
        "ANTHROPIC_MODEL": model,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
        "ANTHROPIC_DEFAULT_SONNET_MODEL": model,
        "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
        "ANTHROPIC_SMALL_FAST_MODEL": model,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_ATTRIBUTION_HEADER": "0",
        "DISABLE_TELEMETRY": "1",
        "API_TIMEOUT_MS": timeout,
        "CLAUDE_CODE_MAX_CONTEXT_TOKENS": told or context,
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": output,
        "CLAUDE_CODE_FILE_READ_MAX_OUTPUT_TOKENS": str(int(context) // 4),
        "MAX_MCP_OUTPUT_TOKENS": str(int(context) // 4),
        "BASH_MAX_OUTPUT_LENGTH": str(int(context) * 3 // 4),
    }


def test_launcher_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is not installed (required under CI=true)")
        pytest.skip("shellcheck is not installed")
    result = subprocess.run([shellcheck, LAUNCHER_SCRIPT.name], cwd=LAUNCHER_SCRIPT.parent,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_launcher_is_a_short_posix_entry_point_that_hands_over_to_python():
    assert os.access(LAUNCHER_SCRIPT, os.X_OK)
    text = LAUNCHER_SCRIPT.read_text()
    assert text.splitlines()[0] == "#!/bin/sh" and len(text.splitlines()) <= 40
    assert "import claude_start; sys.exit(claude_start.main())' \"$here\" \"$@\"" in text


def test_launcher_without_python_says_what_to_do(tmp_path):
    result = subprocess.run([shutil.which("sh"), str(LAUNCHER_SCRIPT), "--help"], env={"PATH": str(tmp_path)},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("claude_start: python3 (3.8 or newer) not found on PATH: install it")


def test_launcher_on_a_python_older_than_3_8_says_what_to_do(tmp_path):
    # A python3 that reports 3.7, as an old one would, to the launcher's first lines; the entry
    # point calls it as: python3 -S -c CODE FOLDER ARGS...
    old = tmp_path / "python3"
    old.write_text('#!/bin/sh\nshift 2\nexec %s -S -c "import sys; sys.version_info = (3, 7, 9); '
                   'sys.version = \'3.7.9 (old)\'; exec(sys.argv.pop(1))" "$@"\n' % sys.executable)
    old.chmod(0o755)
    result = subprocess.run([shutil.which("sh"), str(LAUNCHER_SCRIPT), "--help"], env={"PATH": str(tmp_path)},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and result.stdout == "", result.stderr
    assert result.stderr.startswith("claude_start: python3 is 3.7.9 here, older than 3.8: install python3 3.8")
    # A newer python3.X beside it takes over.
    (tmp_path / "python3.11").symlink_to(sys.executable)
    result = subprocess.run([shutil.which("sh"), str(LAUNCHER_SCRIPT), "--help"], env={"PATH": str(tmp_path)},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "Usage: claude_start.sh" in result.stdout, result.stderr


def test_launcher_found_through_a_symlink_uses_the_files_beside_it(launcher_sandbox):
    link = launcher_sandbox.root / "bin" / "claude_start"
    link.parent.mkdir()
    link.symlink_to(LAUNCHER_SCRIPT)
    result = subprocess.run([str(link), "--help"], env=launcher_sandbox.env(), capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0 and "Usage: claude_start.sh" in result.stdout, result.stderr


def test_launcher_help_lists_every_flag_and_variable(launcher_sandbox):
    for flag in ("-h", "--help"):
        result = launcher_sandbox.run([flag], launcher_sandbox.env())
        assert result.returncode == 0, result.stderr
        for word in ("--ssh", "--ssh-port", "--remote-port", "--local-port", "--local",
                     "--check", "--model", "--config", "--help", "--", "--lean", "--full-tools",
                     "CLAUDE_START_SSH", "CLAUDE_START_SSH_PORT", "CLAUDE_START_REMOTE_PORT",
                     "CLAUDE_START_LOCAL_PORT", "CLAUDE_START_MODEL",
                     "CLAUDE_START_CONTEXT_TOKENS", "CLAUDE_START_MAX_OUTPUT_TOKENS",
                     "API_TIMEOUT_MS", "PROXY_API_KEY", "CLAUDE_START_PROXY_SCRIPT",
                     "CLAUDE_START_HEALTH_WAIT", "CLAUDE_START_CONFIG",
                     "claude_start.env", LAUNCHER_MODEL_DEFAULT, "--deploy", "--stop", "--all",
                     "CLAUDE_START_OLLAMA_INSTALL", "CLAUDE_START_INSTALL_TIMEOUT", "CLAUDE_START_OLLAMA_WAIT",
                     "CLAUDE_START_PULL_TIMEOUT", "REDIS_URL", "OLLAMA_NUM_CTX", "MODEL_MAP"):
            assert word in result.stdout, word
        assert "three quarters of it\nin characters for command output (BASH_MAX_OUTPUT_LENGTH)" in result.stdout
    assert not launcher_sandbox.ssh_records()


def test_launcher_passes_on_every_proxy_setting_but_the_ones_it_decides(launcher_sandbox):
    owned = {"API_HOST", "API_PORT", "LOG_FILE"}
    assert list(claude_start.PROXY_SETTINGS) == [name for name, *_ in proxy.SETTINGS if name not in owned]
    settings = _settings(["--ssh", "me@gpu-box", "--remote-port", "8010"], {})
    written = json.loads(settings.box_proxy_settings())
    assert {name: written[name] for name in owned} == {"API_HOST": "127.0.0.1", "API_PORT": "8010", "LOG_FILE": ""}
    result = launcher_sandbox.run(["--help"], launcher_sandbox.env())
    assert all(name in result.stdout for name in claude_start.PROXY_SETTINGS)


OLDEST_BOX_PYTHON = "/root/.pyenv/versions/3.8.18/bin/python3"  # where this machine keeps python 3.8


@pytest.mark.parametrize("python", [sys.executable, OLDEST_BOX_PYTHON])
def test_box_program_reads_ollama_host_by_the_proxys_rules(python):
    if not os.access(python, os.X_OK):
        pytest.skip("no python 3.8 at %s" % python)
    hosts = {"gpu": "http://gpu:11434", "http://gpu": "http://gpu:80", "https://gpu": "https://gpu:443",
             "0.0.0.0": "http://127.0.0.1:11434", "[::1]:11500": "http://[::1]:11500",
             "http://127.0.0.1:11500/,http://other:11434": "http://127.0.0.1:11500"}
    check = ("import json, sys; sys.path.insert(0, sys.argv[1]); import claude_box; "
             "rules = claude_box.Rules(sys.argv[2]); "
             "print(json.dumps([[rules.ollama_url({'OLLAMA_HOST': v}) for v in json.loads(sys.argv[3])], "
             "rules.installed('llama3.2', ['llama3.2:latest']), rules.installed('llama3.2', ['llama3.2:3b'])]))")
    result = subprocess.run([python, "-c", check, str(ROOT), claude_start.rules_source(), json.dumps(list(hosts))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [list(hosts.values()), True, False]
    for value in hosts:
        assert proxy.parse_ollama_hosts(value)[0].url == hosts[value]


def test_readme_lists_what_the_launcher_sets_for_claude_code():
    settings = _settings(["--local"], {})
    before = {"ANTHROPIC_API_KEY": "sk-real", "PATH": "/bin"}
    env = claude_start.ClaudeRun(settings, 8001, "token").environment(before)
    exported = {name for name in env if env[name] != before.get(name)}
    unset = set(before) - set(env)
    readme = (ROOT / "README.md").read_text()
    by_hand = readme.split("**Set it up by hand** instead:", 1)[1].split("```", 2)[1]
    assert exported and unset
    assert exported == set(re.findall(r"\b([A-Z][A-Z0-9_]+)=", by_hand))
    assert unset == set(re.findall(r"^unset (\w+)", by_hand, re.M))
    listed = readme.split("Before starting Claude Code it exports", 1)[1].split("\n\n", 1)[0]
    listed += readme.split("**Output limits and `--lean`.**", 1)[1].split("\n\n", 1)[0]
    families = {"ANTHROPIC_DEFAULT_%s_MODEL" % family for family in ("HAIKU", "SONNET", "OPUS")}
    assert {name for name in exported | unset if name not in listed} == families
    assert "ANTHROPIC_DEFAULT_{HAIKU,SONNET,OPUS}_MODEL" in listed


def test_launcher_remote_happy_path(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    local = _launcher_free_port()
    # Unrelated processes that look like ssh tunnels must survive the run.
    other_port = _launcher_free_port()
    other_tunnel = sb.spawn([str(sb.stub_ssh), "-N", "-L", "%d:127.0.0.1:%d" % (other_port, remote),
                             "other@host"], env=dict(os.environ, PATH=sb.path()))
    lookalike = sb.spawn(["bash", "-c", "exec -a ssh sleep 60"])
    assert poll_until(lambda: _launcher_http_status(other_port) == 200)

    result = sb.run(["--ssh", "me@gpu-box", "--remote-port", str(remote), "--local-port", str(local),
                     "--", "-p", "hello world", "--verbose"],
                    sb.env(STUB_CLAUDE_EXIT=7))

    assert result.returncode == 7, result.stderr
    _launcher_all_prefixed(result)
    rec = sb.claude_record()
    assert rec["argv"] == ["--model", LAUNCHER_MODEL_DEFAULT, "-p", "hello world", "--verbose"]
    assert rec["health"] == 200  # the tunnel worked while claude ran
    env = dict(rec["env"])
    token = env.pop("ANTHROPIC_AUTH_TOKEN")
    assert token
    assert env == _launcher_expected_env(local)

    box_calls = sb.ssh_records(tunnel=False)
    assert len(box_calls) == 1
    assert box_calls[0]["dest"] == "me@gpu-box"
    assert "python3" in box_calls[0]["command"]
    # Box calls share one connection (ControlMaster), closed at the end; the tunnel has its own.
    master, = sb.ssh_records(kind="master")
    control = master["argv"][master["argv"].index("-S") + 1]
    assert box_calls[0]["argv"][box_calls[0]["argv"].index("-S") + 1] == control
    assert [r["argv"][r["argv"].index("-O") + 1] for r in sb.ssh_records(kind="control")] == ["exit"]
    assert "keeps running (and billing)" in result.stderr and "--stop --all" in result.stderr
    tunnels = sb.ssh_records(tunnel=True)
    assert len(tunnels) == 1
    argv = tunnels[0]["argv"]
    assert "-N" in argv
    assert argv[argv.index("-L") + 1] == "%d:127.0.0.1:%d" % (local, remote)
    options = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    assert "ExitOnForwardFailure=yes" in options
    assert "StrictHostKeyChecking=accept-new" in options
    assert any(o.startswith("ServerAliveInterval=") for o in options)
    assert tunnels[0]["dest"] == "me@gpu-box"
    assert "-p" not in argv  # no --ssh-port: ~/.ssh/config decides

    sb.assert_no_tunnel_left()
    assert other_tunnel.poll() is None and lookalike.poll() is None
    assert _launcher_http_status(other_port) == 200


def test_launcher_ssh_port_and_model_flags(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    local = _launcher_free_port()
    result = sb.run(["--ssh=me@gpu-box", "--ssh-port", "2222", "--model", "qwen3:32b",
                     "--remote-port", str(remote), "--local-port", str(local)], sb.env())
    assert result.returncode == 0, result.stderr
    assert sb.claude_record()["argv"] == ["--model", "qwen3:32b"]
    assert sb.claude_record()["env"]["ANTHROPIC_DEFAULT_OPUS_MODEL"] == "qwen3:32b"
    for rec in sb.ssh_records():
        argv = rec["argv"]
        assert argv[argv.index("-p") + 1] == "2222"
    sb.assert_no_tunnel_left()


def test_launcher_picks_next_free_local_port(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        asked = held.getsockname()[1]
        result = sb.run(["--ssh", "me@gpu-box", "--remote-port", str(remote),
                         "--local-port", str(asked)], sb.env())
    assert result.returncode == 0, result.stderr
    used = int(sb.claude_record()["env"]["ANTHROPIC_BASE_URL"].rsplit(":", 1)[1])
    assert asked < used <= asked + 20
    assert "local port %d is in use; using %d" % (asked, used) in result.stderr
    argv = sb.ssh_records(tunnel=True)[0]["argv"]
    assert argv[argv.index("-L") + 1] == "%d:127.0.0.1:%d" % (used, remote)
    assert sb.claude_record()["health"] == 200
    sb.assert_no_tunnel_left()


def test_launcher_remote_503_warns_and_continues(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy(status=503)
    local = _launcher_free_port()
    result = sb.run(["--ssh", "me@gpu-box", "--remote-port", str(remote), "--local-port", str(local)],
                    sb.env())
    assert result.returncode == 0, result.stderr
    warnings = [line for line in _launcher_all_prefixed(result) if "Ollama" in line]
    assert len(warnings) == 1 and "not reachable from the proxy" in warnings[0], result.stderr
    assert sb.claude_record()["health"] == 503
    sb.assert_no_tunnel_left()


def test_launcher_health_checks_fall_back_to_python_without_curl(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    local = _launcher_free_port()
    result = sb.run(["--ssh", "me@gpu-box", "--remote-port", str(remote), "--local-port", str(local)],
                    sb.env(curl=False))
    assert result.returncode == 0, result.stderr
    assert sb.claude_record()["health"] == 200
    sb.assert_no_tunnel_left()


def test_launcher_signal_while_claude_runs_still_closes_tunnel(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    local = _launcher_free_port()
    env = sb.env(STUB_CLAUDE_SLEEP=1)
    proc = subprocess.Popen([str(LAUNCHER_SCRIPT), "--ssh", "me@gpu-box", "--remote-port", str(remote),
                             "--local-port", str(local)], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    sb.procs.append(proc)
    assert poll_until(sb.claude_out.exists, 15)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=LAUNCHER_RUN_TIMEOUT)
    assert proc.returncode == 143, err
    sb.assert_no_tunnel_left()


def test_launcher_local_uses_running_proxy_and_leaves_it(launcher_sandbox):
    sb = launcher_sandbox
    port = _launcher_free_port()
    running = sb.local_proxy(port)
    result = sb.run(["--local", "--local-port", str(port), "--", "--continue"],
                    sb.env(ssh=False, CLAUDE_START_PROXY_SCRIPT=sb.root / "missing.py"))
    assert result.returncode == 0, result.stderr
    assert "already running" in result.stderr
    rec = sb.claude_record()
    assert rec["argv"] == ["--model", LAUNCHER_MODEL_DEFAULT, "--continue"]
    assert rec["env"]["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:%d" % port
    assert rec["health"] == 200
    time.sleep(0.2)
    assert running.poll() is None
    assert _launcher_http_status(port) == 200
    assert not sb.ssh_records()


def test_launcher_lean_leaves_out_tools_and_user_output_limits_win(launcher_sandbox):
    sb = launcher_sandbox
    port = _launcher_free_port()
    running = sb.local_proxy(port)
    result = sb.run(["--local", "--local-port", str(port), "--lean", "--", "-p", "hi"],
                    sb.env(ssh=False, CLAUDE_START_PROXY_SCRIPT=sb.root / "missing.py",
                           CLAUDE_CODE_FILE_READ_MAX_OUTPUT_TOKENS="5000"))
    assert result.returncode == 0, result.stderr
    rec = sb.claude_record()
    argv = rec["argv"]
    assert argv[:3] == ["--model", LAUNCHER_MODEL_DEFAULT, "--disallowedTools"] and argv[4:] == ["-p", "hi"]
    left_out = argv[3].split(",")
    assert {"Agent", "Workflow", "ToolSearch", "WebFetch", "NotebookEdit"} <= set(left_out)
    assert not {"Bash", "Read", "Edit", "Write"} & set(left_out)
    assert rec["env"]["CLAUDE_CODE_FILE_READ_MAX_OUTPUT_TOKENS"] == "5000"
    assert rec["env"]["MAX_MCP_OUTPUT_TOKENS"] == "8192"
    assert running.poll() is None


def test_launcher_local_starts_proxy_and_stops_it(launcher_sandbox):
    sb = launcher_sandbox
    port = _launcher_free_port()
    record = sb.root / "proxy-started.json"
    result = sb.run(["--local", "--local-port", str(port)],
                    sb.env(ssh=False, CLAUDE_START_PROXY_SCRIPT=sb.stub_proxy,
                           STUB_PROXY_RECORD=record, PROXY_API_KEY="sekrit"))
    assert result.returncode == 0, result.stderr
    started = json.loads(record.read_text())
    assert started["API_PORT"] == str(port)
    assert started["API_HOST"] == "127.0.0.1"
    assert started["PROXY_API_KEY"] == "sekrit"
    rec = sb.claude_record()
    assert rec["health"] == 200
    env = dict(rec["env"])
    assert env.pop("ANTHROPIC_AUTH_TOKEN") == "sekrit"
    assert env == _launcher_expected_env(port)
    assert started["env"]["LOG_FILE"] == ""  # its log is the run folder's, never a file in the project
    assert poll_until(lambda: not pid_alive(started["pid"]), 5)
    assert list(sb.tmp.iterdir()) == []  # the run folder went with the run
    assert _launcher_http_status(port) is None


def test_launcher_local_proxy_gets_the_proxy_settings_of_the_config_file(launcher_sandbox):
    sb = launcher_sandbox
    port = _launcher_free_port()
    record = sb.root / "proxy-started.json"
    config = sb.home / ".config" / "simple_api_proxy" / "claude_start.env"
    config.parent.mkdir(parents=True)
    config.write_text("DEFAULT_MAX_TOKENS=2048\nOLLAMA_WARMUP=off\nALLOWED_ORIGINS=https://app.example\n")
    result = sb.run(["--local", "--local-port", str(port)],
                    sb.env(ssh=False, CLAUDE_START_PROXY_SCRIPT=sb.stub_proxy, STUB_PROXY_RECORD=record))
    assert result.returncode == 0, result.stderr
    assert "unknown setting" not in result.stderr
    started = json.loads(record.read_text())
    env = started["env"]
    assert (env.get("DEFAULT_MAX_TOKENS"), env.get("OLLAMA_WARMUP"), env.get("ALLOWED_ORIGINS")) == \
        ("2048", "off", "https://app.example")


def test_launcher_local_proxy_that_never_answers(launcher_sandbox):
    sb = launcher_sandbox
    port = _launcher_free_port()
    record = sb.root / "proxy-silent.json"
    result = sb.run(["--local", "--local-port", str(port)],
                    sb.env(ssh=False, CLAUDE_START_PROXY_SCRIPT=sb.stub_proxy,
                           STUB_PROXY_RECORD=record, STUB_PROXY_SILENT=1,
                           CLAUDE_START_HEALTH_WAIT=1))
    assert result.returncode != 0
    line = _launcher_all_prefixed(result)[-1]
    assert "did not answer" in line and "simple_api_proxy.%d.log" % port in line
    log = Path(re.search(r"see (\S+), or raise", line).group(1))
    assert log.exists() and log.parent.parent == sb.tmp and log.parent.stat().st_mode & 0o777 == 0o700
    assert not sb.claude_out.exists()
    pid = json.loads(record.read_text())["pid"]
    assert poll_until(lambda: not pid_alive(pid), 5)


def test_launcher_local_missing_proxy_script(launcher_sandbox):
    sb = launcher_sandbox
    missing = sb.root / "nope" / "simple_api_proxy.py"
    result = sb.run(["--local", "--local-port", str(_launcher_free_port())],
                    sb.env(ssh=False, CLAUDE_START_PROXY_SCRIPT=missing))
    line = _launcher_error_line(result)
    assert str(missing) in line and "CLAUDE_START_PROXY_SCRIPT" in line


def test_launcher_check_all_ok(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    local = _launcher_free_port()
    result = sb.run(["--check", "--ssh", "me@gpu-box", "--remote-port", str(remote),
                     "--local-port", str(local)], sb.env())
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    names = ["ssh reachable", "remote proxy health", "ollama from proxy", "model", "tunnel", "local health",
             "claude on PATH"]
    assert [line.split(":")[0] for line in lines] == names
    assert all(line.split(":", 1)[1].split()[0] == "ok" for line in lines), result.stdout
    assert not sb.claude_out.exists()
    assert len(sb.ssh_records(tunnel=True)) == 1
    sb.assert_no_tunnel_left()


def test_launcher_check_reports_failed_hops(launcher_sandbox):
    sb = launcher_sandbox
    down = _launcher_free_port()  # nothing listens there
    result = sb.run(["--check", "--ssh", "me@gpu-box", "--remote-port", str(down)],
                    sb.env(claude=False))
    assert result.returncode == 1
    status = {line.split(":")[0]: line.split(":", 1)[1].split()[0]
              for line in result.stdout.splitlines()}
    assert status == {"ssh reachable": "ok", "remote proxy health": "failed",
                      "tunnel": "failed", "local health": "failed", "claude on PATH": "failed"}
    assert "python3 simple_api_proxy.py" in result.stdout
    assert not sb.ssh_records(tunnel=True)


def test_launcher_check_tunnel_refused(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    result = sb.run(["--check", "--ssh", "me@gpu-box", "--remote-port", str(remote),
                     "--local-port", str(_launcher_free_port())],
                    sb.env(STUB_SSH_TUNNEL_FAIL=1))
    assert result.returncode == 1
    assert "tunnel:" in result.stdout
    status = {line.split(":")[0]: line.split(":", 1)[1].split()[0]
              for line in result.stdout.splitlines()}
    assert status["remote proxy health"] == "ok"
    assert status["tunnel"] == "failed"
    assert status["claude on PATH"] == "ok"
    sb.assert_no_tunnel_left()


def test_launcher_check_local(launcher_sandbox):
    sb = launcher_sandbox
    port = _launcher_free_port()
    running = sb.local_proxy(port)
    result = sb.run(["--check", "--local", "--local-port", str(port)], sb.env(ssh=False))
    assert result.returncode == 0, result.stdout + result.stderr
    status = {line.split(":")[0]: line.split(":", 1)[1].split()[0]
              for line in result.stdout.splitlines()}
    assert status == {"ssh reachable": "skipped", "remote proxy health": "skipped",
                      "tunnel": "skipped", "local health": "ok", "claude on PATH": "ok"}
    assert running.poll() is None


def test_launcher_config_precedence(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    file_port, env_port, flag_port = (_launcher_free_port() for _ in range(3))
    config = sb.home / ".config" / "simple_api_proxy" / "claude_start.env"
    config.parent.mkdir(parents=True)
    config.write_text(
        "# settings for claude_start.sh\n"
        "\n"
        "CLAUDE_START_SSH=file@gpu-box\n"
        "CLAUDE_START_REMOTE_PORT=%d\n"
        "CLAUDE_START_LOCAL_PORT=%d\n"
        'export CLAUDE_START_MODEL="file-model"\n'
        "CLAUDE_START_CONTEXT_TOKENS = 1111\n"
        "CLAUDE_START_MAX_OUTPUT_TOKENS='3333'\n"
        "API_TIMEOUT_MS=1234\n" % (remote, file_port)
    )
    result = sb.run(["--model", "flag-model", "--local-port", str(flag_port), "--full-tools"],
                    sb.env(CLAUDE_START_MODEL="env-model", CLAUDE_START_CONTEXT_TOKENS=2222,
                           CLAUDE_START_LOCAL_PORT=env_port, API_TIMEOUT_MS=5678))
    assert result.returncode == 0, result.stderr
    rec = sb.claude_record()
    assert rec["argv"] == ["--model", "flag-model"]
    env = dict(rec["env"])
    env.pop("ANTHROPIC_AUTH_TOKEN")
    # A window this small is told with Claude Code's summary buffer added (see compacting_window).
    assert env == _launcher_expected_env(flag_port, model="flag-model", context="2222",
                                         output="3333", timeout="5678", told="15222")
    assert {r["dest"] for r in sb.ssh_records()} == {"file@gpu-box"}

    # Without the flag the environment's port wins over the file's.
    sb.claude_out.unlink()
    result = sb.run([], sb.env(CLAUDE_START_LOCAL_PORT=env_port))
    assert result.returncode == 0, result.stderr
    assert sb.claude_record()["env"]["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:%d" % env_port
    assert sb.claude_record()["argv"][:2] == ["--model", "file-model"]  # and the lean set: a 1111-token window
    sb.assert_no_tunnel_left()


def test_launcher_config_flag_beats_config_variable(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    from_env = sb.root / "env.env"
    from_flag = sb.root / "flag.env"
    from_env.write_text("CLAUDE_START_MODEL=env-file-model\n")
    from_flag.write_text("CLAUDE_START_MODEL=flag-file-model\nNOT_A_SETTING=1\n")
    result = sb.run(["--config", str(from_flag), "--ssh", "me@gpu-box", "--remote-port", str(remote),
                     "--local-port", str(_launcher_free_port())],
                    sb.env(CLAUDE_START_CONFIG=from_env))
    assert result.returncode == 0, result.stderr
    assert sb.claude_record()["argv"] == ["--model", "flag-file-model"]
    assert "unknown setting 'NOT_A_SETTING'" in result.stderr
    sb.assert_no_tunnel_left()


def test_launcher_proxy_api_key_becomes_auth_token(launcher_sandbox):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    result = sb.run(["--ssh", "me@gpu-box", "--remote-port", str(remote),
                     "--local-port", str(_launcher_free_port())],
                    sb.env(PROXY_API_KEY="key-123", ANTHROPIC_API_KEY="sk-real-anthropic-key"))
    assert result.returncode == 0, result.stderr
    env = sb.claude_record()["env"]
    assert env["ANTHROPIC_AUTH_TOKEN"] == "key-123"
    assert "ANTHROPIC_API_KEY" not in env
    sb.assert_no_tunnel_left()


@pytest.mark.parametrize(
    "case",
    ["no_ssh", "no_claude", "no_host", "ssh_unreachable", "remote_down", "tunnel_refused",
     "health_never"],
)
def test_launcher_failure_modes(launcher_sandbox, case):
    sb = launcher_sandbox
    remote = sb.remote_proxy()
    args = ["--ssh", "me@gpu-box", "--remote-port", str(remote),
            "--local-port", str(_launcher_free_port())]
    env = sb.env()
    expected = {
        "no_ssh": ["ssh not found", "--local"],
        "no_claude": ["claude not found", "install Claude Code"],
        "no_host": ["no ssh host", "--ssh", "CLAUDE_START_SSH"],
        "ssh_unreachable": ["cannot reach me@gpu-box", "Connection refused"],
        "remote_down": ["remote proxy down", "python3 simple_api_proxy.py"],
        "tunnel_refused": ["ssh tunnel", "exited (code 255)", "Could not request local forwarding"],
        "health_never": ["did not answer", "CLAUDE_START_HEALTH_WAIT"],
    }[case]
    if case == "no_ssh":
        env = sb.env(ssh=False)
    elif case == "no_claude":
        env = sb.env(claude=False)
    elif case == "no_host":
        args = args[2:]
    elif case == "ssh_unreachable":
        env = sb.env(STUB_SSH_UNREACHABLE=1)
    elif case == "remote_down":
        args[3] = str(_launcher_free_port())
    elif case == "tunnel_refused":
        env = sb.env(STUB_SSH_TUNNEL_FAIL=1)
    elif case == "health_never":
        env = sb.env(STUB_SSH_TUNNEL_BLACKHOLE=1, CLAUDE_START_HEALTH_WAIT=1)
    started = time.monotonic()
    result = sb.run(args, env)
    line = _launcher_error_line(result)
    for word in expected:
        assert word in line, line
    assert not sb.claude_out.exists()
    sb.assert_no_tunnel_left()
    assert time.monotonic() - started < 15
    if case in ("no_ssh", "no_claude", "no_host"):
        assert not sb.ssh_records()


@pytest.mark.parametrize(
    "args,word",
    [(["--bogus"], "unknown option"), (["--local-port", "http"], "local port"),
     (["--remote-port", "70000"], "remote port"), (["--ssh"], "needs a value"),
     (["claude-arg"], "after --")],
)
def test_launcher_usage_errors(launcher_sandbox, args, word):
    sb = launcher_sandbox
    result = sb.run(args, sb.env(CLAUDE_START_SSH="me@gpu-box"))
    assert result.returncode == 2
    assert word in _launcher_error_line(result)
    assert not sb.ssh_records()


def test_launcher_missing_explicit_config_fails(launcher_sandbox):
    sb = launcher_sandbox
    result = sb.run(["--local"], sb.env(CLAUDE_START_CONFIG=sb.root / "missing.env"))
    line = _launcher_error_line(result)
    assert "missing.env" in line and "not found" in line


###############################################################################
# Unit tests of the launcher's parts
###############################################################################

@pytest.mark.parametrize("argv,message", [
    (["--ssh"], "--ssh needs a value"), (["--model="], "--model needs a non-empty value"),
    (["-x"], "unknown option '-x' (arguments for claude go after --)"),
    (["--deploy", "--stop"], "go one at a time"), (["--all"], "--all goes with --stop"),
    (["--local", "--deploy"], "go one at a time")])
def test_arguments_that_cannot_work_are_usage_errors(argv, message):
    with pytest.raises(claude_start.UsageError) as refused:
        claude_start.parse_args(argv).check_modes()
    assert message in refused.value.message and refused.value.message.endswith("(see --help)")
    assert refused.value.status == 2


def test_arguments_keep_the_command_line_for_the_resume_and_stop_hints():
    arguments = claude_start.parse_args(["--ssh=me@box", "--deploy", "--model", "m", "--remote-port", "9",
                                         "--lean", "--", "-p", "hi"])
    assert arguments.claude_args == ["-p", "hi"] and arguments.lean
    settings = claude_start.Settings(arguments, {"CLAUDE_START_COMMAND": "./claude_start.sh"})
    assert settings.launch_command() == "./claude_start.sh --ssh=me@box --model m --remote-port 9 --lean"
    assert settings.launch_command(stop=True) == "./claude_start.sh --ssh=me@box --remote-port 9"


def test_settings_come_from_flag_then_environment_then_file_then_default(tmp_path, caplog):
    config = tmp_path / "claude_start.env"
    config.write_text("# comment\n\nexport CLAUDE_START_MODEL='file-model'\nCLAUDE_START_LOCAL_PORT = 9001\n"
                      "CLAUDE_START_REMOTE_PORT=9002\nOLLAMA_NUM_CTX=\"16384\"\nBOGUS=1\nno equals sign\r\n")
    environ = {"CLAUDE_START_CONFIG": str(config), "CLAUDE_START_LOCAL_PORT": "9101", "CLAUDE_START_MODEL": "",
               "CLAUDE_START_SSH": "a@one b@two"}
    settings = _settings(["--remote-port", "9203"], environ)
    assert (settings.model, settings.local_port, settings.remote_port) == ("file-model", 9101, 9203)
    assert settings.health_wait == claude_start.DEFAULT_HEALTH_WAIT
    assert settings.proxy_values() == {"OLLAMA_NUM_CTX": "16384"}
    assert settings.mode == "boxes" and [d.target for d in settings.destinations] == ["a@one", "b@two"]
    said = caplog.text
    assert "%s:7: unknown setting 'BOGUS', ignored" % config in said and ":8: not a KEY=VALUE line" in said


@pytest.mark.parametrize("environ,message", [
    ({"CLAUDE_START_HEALTH_WAIT": "0"}, "CLAUDE_START_HEALTH_WAIT must be a whole number >= 1, got '0'"),
    ({"CLAUDE_START_SSH_PORT": "99999"}, "ssh port must be a whole number >= 1 and <= 65535"),
    ({"CLAUDE_START_SSH": "-oProxyCommand=x"}, "must not start with '-'"),
    ({"MODEL_MAP": "haiku"}, "MODEL_MAP entry 'haiku' is not family=model")])
def test_settings_that_cannot_work_are_refused(environ, message):
    with pytest.raises(claude_start.UsageError) as refused:
        _settings([], environ).required_models()
    assert message in refused.value.message


def test_required_models_are_the_model_the_map_and_ollama_model_once_each():
    settings = _settings(["--model", "a:1"], {"MODEL_MAP": "haiku=b:2, sonnet=a:1", "OLLAMA_MODEL": "c:3"})
    assert settings.required_models() == ["a:1", "b:2", "c:3"]


def test_box_answers_become_events_and_other_lines_are_shown(caplog):
    answer = claude_start.BoxAnswer()
    for line in ['{"event": "say", "text": "pulling m"}', '{"event": "need", "files": ["proxy.json"]}',
                 '{"event": "hop", "name": "model", "status": "failed", "detail": "model m not installed"}',
                 '{"event": "health", "status": 503, "instance": "abc", "key": "k"}',
                 '{"event": "ollama", "address": "127.0.0.1:11434"}', "Welcome to the box!",
                 '{"event": "fail", "message": "two\\nlines"}']:
        answer.take(line)
    assert answer.need == ["proxy.json"] and answer.ollama == "127.0.0.1:11434" and answer.fail == "two\nlines"
    assert answer.health == {"event": "health", "status": 503, "instance": "abc", "key": "k"}
    assert answer.hop_detail("model", "failed") == "model m not installed"
    assert [r.getMessage() for r in caplog.records] == ["box: pulling m", "box: Welcome to the box!"]


SEPARATORS = ["\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\r\n"]


@pytest.mark.parametrize("separator", SEPARATORS)
def test_no_setting_can_add_a_line_to_the_proxys_settings_on_the_box(tmp_path, monkeypatch, separator):
    value = "secret%sAPI_HOST=0.0.0.0" % separator
    settings = _settings(["--ssh", "me@gpu-box"], {"REDIS_PASSWORD": value, "MODEL_MAP": "haiku=m"})
    monkeypatch.setattr(claude_box, "FOLDER", str(tmp_path))
    (tmp_path / claude_box.PROXY_SETTINGS).write_bytes(settings.box_proxy_settings())
    read = claude_box.proxy_settings()
    assert read["API_HOST"] == "127.0.0.1" and read["REDIS_PASSWORD"] == value and read["MODEL_MAP"] == "haiku=m"


def test_health_counts_a_live_proxy_whatever_its_status_says():
    assert [claude_start.Health(status).up for status in (0, 200, 204, 401, 403, 404, 500, 503)] == \
        [False, True, True, True, True, False, False, True]
    assert claude_start.Health(503).note().startswith("HTTP 503: proxy up, Ollama not reachable")


def test_an_ssh_destination_from_a_provider_carries_its_port_and_known_hosts():
    destination = claude_start.SshDestination.of("root", "ssh4.vast.ai", 31234, "/tmp/known")
    assert destination.target == "root@ssh4.vast.ai" and str(destination) == "root@ssh4.vast.ai (port 31234)"
    options = destination.options()
    assert options[options.index("-p") + 1] == "31234" and "UserKnownHostsFile=/tmp/known" in options
    assert destination.command("true") == "ssh -p 31234 true root@ssh4.vast.ai"


###############################################################################
# Defects of the bash launcher, each fixed
###############################################################################

def test_the_keeper_closes_its_tunnel_when_the_launcher_is_killed(launcher_sandbox):
    sb = launcher_sandbox
    remote, local = sb.remote_proxy(), _launcher_free_port()
    proc = subprocess.Popen([str(LAUNCHER_SCRIPT), "--ssh", "me@gpu-box", "--remote-port", str(remote),
                             "--local-port", str(local)], env=sb.env(STUB_CLAUDE_SLEEP=60),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    sb.procs.append(proc)
    assert poll_until(sb.claude_out.exists, 15)
    started = [pid for pid in descendants(proc.pid) if "stub-claude" not in process_command(pid)]
    assert started and _launcher_http_status(local) == 200
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    for record in sb.ssh_records(tunnel=True):  # the tunnel drops too
        with contextlib.suppress(ProcessLookupError):
            os.kill(record["pid"], signal.SIGKILL)
    # Nothing the launcher started is left to reopen the tunnel: the port closes and stays closed.
    assert poll_until(lambda: not any(map(pid_alive, started)), 10), [process_command(pid) for pid in started]
    assert all(not pid_alive(record["pid"]) for record in sb.ssh_records(tunnel=True))
    assert _launcher_http_status(local) is None


@pytest.mark.parametrize("mode", ["remote", "local"])
def test_logs_and_sockets_live_in_a_private_run_folder(launcher_sandbox, mode):
    sb = launcher_sandbox
    port = _launcher_free_port()
    if mode == "remote":
        args = ["--ssh", "me@gpu-box", "--remote-port", str(sb.remote_proxy()), "--local-port", str(port)]
        env = sb.env(STUB_CLAUDE_SLEEP=60)
    else:
        args = ["--local", "--local-port", str(port)]
        env = sb.env(ssh=False, STUB_CLAUDE_SLEEP=60, CLAUDE_START_PROXY_SCRIPT=sb.stub_proxy)
    proc = subprocess.Popen([str(LAUNCHER_SCRIPT), *args], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    sb.procs.append(proc)
    assert poll_until(sb.claude_out.exists, 15)
    entries = list(sb.tmp.iterdir())
    assert entries and all(entry.is_dir() and entry.name.startswith("claude_start.")
                           and entry.stat().st_mode & 0o777 == 0o700 for entry in entries), entries
    logs = [path.name for path in sb.tmp.rglob("*.log")]
    assert logs == ["tunnel.%d.log" % port] if mode == "remote" else ["simple_api_proxy.%d.log" % port], logs
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=LAUNCHER_RUN_TIMEOUT)
    assert proc.returncode == 143, err
    assert list(sb.tmp.iterdir()) == []


def test_local_mode_leaves_the_project_folder_alone(launcher_sandbox):
    sb = launcher_sandbox
    project = sb.root / "project"
    project.mkdir()
    result = sb.run(["--local", "--local-port", str(_launcher_free_port())],
                    sb.env(ssh=False, CLAUDE_START_PROXY_SCRIPT=ROOT / "simple_api_proxy.py", OLLAMA_WARMUP="off",
                           OLLAMA_HOST="127.0.0.1:%d" % _launcher_free_port()), cwd=project)
    assert result.returncode == 0, result.stderr
    assert sb.claude_record()["health"] == 503  # the real proxy answered, without an Ollama
    assert list(project.iterdir()) == []


###############################################################################
# Small context windows: limits from the window, the lean tool set by itself
###############################################################################

@pytest.mark.parametrize("environ,argv,window,output,lean", [
    ({}, [], 32768, 8192, False),
    ({"OLLAMA_NUM_CTX": "8192"}, [], 8192, 2048, True),
    ({"CLAUDE_START_CONTEXT_TOKENS": "12288", "OLLAMA_NUM_CTX": "65536"}, [], 12288, 3072, True),
    ({"OLLAMA_NUM_CTX": "16384"}, [], 16384, 4096, True),
    ({"OLLAMA_NUM_CTX": "16384", "CLAUDE_START_MAX_OUTPUT_TOKENS": "2048"}, [], 16384, 2048, False),
    ({"OLLAMA_NUM_CTX": "24576"}, [], 24576, 6144, False),
    ({"OLLAMA_NUM_CTX": "8192"}, ["--full-tools"], 8192, 2048, False),
    ({}, ["--lean"], 32768, 8192, True)])
def test_the_window_sets_the_output_limit_and_the_tool_set(environ, argv, window, output, lean):
    settings = _settings(["--local"] + argv, environ)
    assert (settings.context_tokens, settings.max_output_tokens, settings.lean) == (window, output, lean)


@pytest.mark.parametrize("environ,told", [
    ({"OLLAMA_NUM_CTX": "8192"}, 21192),
    ({"OLLAMA_NUM_CTX": "12288"}, 25288),
    ({"OLLAMA_NUM_CTX": "16384"}, 29384),
    ({"OLLAMA_NUM_CTX": "16384", "CLAUDE_START_MAX_OUTPUT_TOKENS": "2048"}, 29384),
    ({"OLLAMA_NUM_CTX": "24576"}, 37576),
    ({"OLLAMA_NUM_CTX": "28672"}, 28672),
    ({}, 32768),
    ({"OLLAMA_NUM_CTX": "65536", "CLAUDE_START_MAX_OUTPUT_TOKENS": "30000"}, 65536)])
def test_claude_code_is_told_a_window_where_its_compaction_point_leaves_room_for_a_summary(environ, told):
    """Claude Code compacts at its window less its output limit (at most 20,000) less 13,000; where
    that leaves less than one answer it would compact before every request, so it is told 13,000
    more and compacts when the proxy says the prompt is too long."""
    settings = _settings(["--local"], environ)
    assert settings.claude_code_window == told
    env = claude_start.ClaudeRun(settings, 8001, "token").environment({})
    assert env["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] == str(told)
    # What a tool result may bring in stays measured against the real window.
    assert env["CLAUDE_CODE_FILE_READ_MAX_OUTPUT_TOKENS"] == str(settings.context_tokens // 4)


def test_lean_and_full_tools_do_not_go_together():
    with pytest.raises(claude_start.UsageError, match="--lean and --full-tools do not go together"):
        claude_start.parse_args(["--lean", "--full-tools"]).check_modes()


def test_a_small_window_runs_claude_code_lean_and_says_so_unless_told_otherwise(launcher_sandbox):
    sb = launcher_sandbox
    port = _launcher_free_port()
    sb.local_proxy(port)
    result = sb.run(["--local", "--local-port", str(port)], sb.env(ssh=False, OLLAMA_NUM_CTX=8192))
    assert result.returncode == 0, result.stderr
    record = sb.claude_record()
    assert record["argv"][2] == "--disallowedTools" and "Agent" in record["argv"][3].split(",")
    assert (record["env"]["CLAUDE_CODE_MAX_CONTEXT_TOKENS"], record["env"]["CLAUDE_CODE_MAX_OUTPUT_TOKENS"]) == \
        ("21192", "2048")
    assert "a window of 8192 tokens cannot hold Claude Code's full prompt" in result.stderr
    assert "--full-tools keeps them" in result.stderr
    result = sb.run(["--local", "--local-port", str(port), "--full-tools"], sb.env(ssh=False, OLLAMA_NUM_CTX=8192))
    assert result.returncode == 0, result.stderr
    assert sb.claude_record()["argv"] == ["--model", LAUNCHER_MODEL_DEFAULT]
    assert "cannot hold" not in result.stderr
