"""claude_start.sh --deploy against real OpenSSH servers (standins/sshlab.py).

The laptop side is the launcher with the real ssh client (through `-F` and a private config)
and, where an answer matters, the real Claude Code CLI.
"""

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from standins.ollama import MODEL
from standins.proxy import free_port
from standins.sshlab import SshBox, SshLab
from standins.support import descendants, need, pid_alive, poll_until, process_command, redis_module, ROOT


def _mount_namespaces_work():
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_box_tests_probe_mount_namespaces_not_just_unshare(tmp_path, monkeypatch):
    need(shutil.which("unshare"), "unshare is not installed (util-linux)")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        need(_mount_namespaces_work(), "`unshare -m true` fails here")
    refusing = tmp_path / "unshare"
    refusing.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    refusing.chmod(0o755)
    monkeypatch.setenv("PATH", "%s%s%s" % (tmp_path, os.pathsep, os.environ["PATH"]))
    assert not _mount_namespaces_work()


@pytest.fixture(scope="module")
def ssh_lab(tmp_path_factory):
    need(hasattr(os, "geteuid") and os.geteuid() == 0, "the box tests run sshd in a mount namespace (need root)")
    for tool in ("unshare", "ssh", "ssh-keygen"):
        need(shutil.which(tool), "%s is not installed (openssh-client, util-linux)" % tool)
    need(shutil.which("sshd") or os.access("/usr/sbin/sshd", os.X_OK), "sshd is not installed (openssh-server)")
    need(_mount_namespaces_work(), "`unshare -m true` fails: the box tests need mount namespaces (a container "
                                   "may forbid them; run it with --privileged or CAP_SYS_ADMIN)")
    lab = SshLab(tmp_path_factory.mktemp("ssh-lab"))
    try:
        yield lab
    finally:
        lab.cleanup()
        for box in lab.boxes.values():
            box.stop()


@pytest.fixture
def lab(ssh_lab):
    """The boxes as the last test left them: each test begins with --deploy (or reset() for a bare box)."""
    yield ssh_lab
    ssh_lab.cleanup()


def _box_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("claude_start: ")]


def _process_alive(pid):
    return pid is not None and pid_alive(pid)


def test_deploy_bare_box_to_an_answer_then_keep_or_restart_the_proxy(lab, tmp_path):
    box = lab.boxes["a"]
    box.reset()
    settings = dict(OLLAMA_NUM_CTX="16384", PROXY_API_KEY="box-key-123", REDIS_URL="redis://127.0.0.1:1/0")
    result = lab.run(box, "--deploy", "--", "-p", "say hello", env=lab.env(real_claude=True, **settings))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Answer from box a."
    assert "started ollama serve" in result.stderr and "started the proxy" in result.stderr
    assert "keeps running (and billing)" in result.stderr
    # Claude Code's own `claude --resume` would bypass the proxy: the launcher's line instead.
    resume = re.search(r"resume this conversation with: (.*)", result.stderr)
    assert resume and re.fullmatch(r"\S*claude_start\.sh --ssh box-a --remote-port \d+ --local-port \d+ "
                                   r"-- --resume [0-9a-f-]{36}", resume.group(1)), result.stderr
    # What it leaves on the box: the file, a private settings file, logs, pidfiles, the instance id.
    assert (box.folder / "simple_api_proxy.py").read_bytes() == (ROOT / "simple_api_proxy.py").read_bytes()
    settings_file = box.folder / "proxy.json"
    assert settings_file.stat().st_mode & 0o777 == 0o600
    assert {"OLLAMA_NUM_CTX": "16384", "PROXY_API_KEY": "box-key-123", "API_PORT": str(box.proxy_port),
            "API_HOST": "127.0.0.1", "OLLAMA_MODEL": MODEL}.items() <= json.loads(settings_file.read_text()).items()
    assert not (box.folder / "proxy.key").exists()  # the user's key, none made up
    # The key that seals hidden thinking is kept on the box, so that a restarted proxy still opens its seals.
    thinking_key = box.folder / "thinking.key"
    assert thinking_key.stat().st_mode & 0o777 == 0o600 and len(thinking_key.read_text().strip()) == 64
    pid = box.pid("proxy.pid")
    assert _process_alive(pid) and _process_alive(box.pid("ollama.pid"))
    assert "box-key-123" not in Path("/proc/%d/cmdline" % pid).read_text()
    assert (box.folder / "proxy.log").exists() and (box.folder / "ollama.log").exists()
    assert len((box.folder / "proxy.instance").read_text().strip()) == 16
    # Box a runs the system's python3; on Debian (PEP 668) it has no redis-py: say how to get it.
    advice = [line for line in _box_lines(result) if "redis-py is missing" in line]
    box_python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if subprocess.run([box_python, "-c", "import redis"], capture_output=True).returncode == 0:
        assert not advice, advice
    else:
        assert advice and all(w in advice[0] for w in ("pip install --user redis", "python3-redis",
                                                       "--break-system-packages", "memory cache"))

    # The same file and settings again: the running proxy is left alone.
    again = lab.run(box, "--deploy", env=lab.env(**settings))
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stderr and box.pid("proxy.pid") == pid and _process_alive(pid)
    assert "copying" not in again.stderr

    # A changed file: copied and the proxy restarted gracefully.
    changed = tmp_path / "simple_api_proxy.py"
    changed.write_text((ROOT / "simple_api_proxy.py").read_text() + "\n# a newer version\n")
    third = lab.run(box, "--deploy", env=lab.env(CLAUDE_START_PROXY_SCRIPT=changed, **settings))
    assert third.returncode == 0, third.stderr
    assert "copying simple_api_proxy.py" in third.stderr and "restarting the proxy" in third.stderr
    assert box.pid("proxy.pid") != pid and not _process_alive(pid) and _process_alive(box.pid("proxy.pid"))
    assert (box.folder / "simple_api_proxy.py").read_text() == changed.read_text()


def test_deploy_installs_ollama_pulls_the_model_and_names_a_port_holder(lab, tmp_path):
    box = lab.boxes["b"]  # bash login shell, no ollama on PATH, no model
    box.reset(models=())
    env = lab.env(MODEL_MAP="haiku=llama3.2:3b", REDIS_URL="redis://127.0.0.1:%d/0" % free_port())
    result = lab.run(box, "--deploy", env=env)
    assert result.returncode == 0, result.stderr
    assert "installing it: sh %s" % lab.installer in result.stderr and "Installing ollama" in result.stderr
    for model in (MODEL, "llama3.2:3b"):
        assert "pulling %s" % model in result.stderr and "%s: success" % model in result.stderr
    assert "pulling 6a0746a1ec1a 0% of 4.7 GB" in result.stderr
    assert set((box.state / "models").read_text().split()) == {MODEL, "llama3.2:3b"}

    # --check: all good but Redis, which is a warning, not a failure.
    check = lab.run(box, "--check", env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    redis_hop, = [line for line in check.stdout.splitlines() if line.startswith("redis:")]
    need(redis_module(), "redis-py is not installed")
    assert redis_hop.split()[1] == "warning" and "is down" in redis_hop and "memory cache" in redis_hop, check.stdout

    # Something else on the proxy's port: a clear error naming it.
    lab.run(box, "--stop", env=env)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", box.proxy_port))
        squatter.listen(1)
        taken = lab.run(box, "--deploy", env=env)
    assert taken.returncode == 1
    assert "port %d on the box is held by pid %d" % (box.proxy_port, os.getpid()) in taken.stderr


def test_check_reports_ollama_down_and_a_missing_model(lab):
    box = lab.boxes["a"]
    assert lab.run(box, "--deploy").returncode == 0
    os.kill(box.pid("ollama.pid"), signal.SIGKILL)
    down = lab.run(box, "--check")
    assert down.returncode == 1
    assert "ollama from proxy:   failed (Ollama not reachable from the proxy" in down.stdout, down.stdout
    assert "ollama serve" in down.stdout and "--deploy" in down.stdout

    assert lab.run(box, "--deploy").returncode == 0  # Ollama started again
    missing = lab.run(box, "--check", "--model", "qwen3-coder:30b")
    assert missing.returncode == 1
    assert ("model:               failed (model qwen3-coder:30b not installed "
            "(run: ollama pull qwen3-coder:30b, or use --deploy))") in missing.stdout, missing.stdout

    stopped = lab.run(box, "--stop")
    assert stopped.returncode == 0 and "proxy stopped" in stopped.stderr
    nothing = lab.run(box, "--check")
    assert nothing.returncode == 1 and "remote proxy health: failed (nothing answers" in nothing.stdout


def test_tunnel_killed_mid_request_is_reopened_and_the_session_answers(lab):
    box = lab.boxes["a"]
    assert lab.run(box, "--deploy").returncode == 0
    chats = box.state / "chats"
    with contextlib.suppress(FileNotFoundError):
        chats.unlink()
    (box.state / "delay_once").write_text("30")
    launcher = lab.start(box, "--", "-p", "say hello", env=lab.env(real_claude=True))
    assert poll_until(lambda: chats.exists() and chats.read_text().count("\n") == 1, 60)
    tunnels = [pid for pid in descendants(launcher.pid) if " -N -L " in process_command(pid)]
    assert len(tunnels) == 1, [process_command(pid) for pid in descendants(launcher.pid)]
    os.kill(tunnels[0], signal.SIGKILL)
    out, err = launcher.communicate(timeout=90)
    assert launcher.returncode == 0 and out.strip() == "Answer from box a.", out + err
    # "reopened" follows once the launcher's own probe gets through, which Claude Code's retry may beat.
    assert "dropped" in err and "reopening 127.0.0.1:" in err, err


def test_two_launchers_at_once_each_reach_their_own_box(lab):
    a, b = lab.boxes["a"], lab.boxes["b"]
    for box in (a, b):
        assert lab.run(box, "--deploy").returncode == 0
    local = free_port()
    runs = [lab.start(box, "--local-port", str(local), "--", "-p", "which box?", env=lab.env(real_claude=True))
            for box in (a, b)]
    results = [run.communicate(timeout=90) for run in runs]
    for box, run, (out, err) in zip((a, b), runs, results):
        assert run.returncode == 0, err
        assert out.strip() == "Answer from box %s." % box.name


def test_stop_all_and_sigterm_clean_up(lab):
    box = lab.boxes["a"]
    launcher = lab.start(box, "--deploy", env=lab.env(STUB_CLAUDE_SLEEP=60))
    pidfile = lab.laptop / "claude.pid"
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    assert poll_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 60)
    claude = int(pidfile.read_text())
    tunnels = [pid for pid in descendants(launcher.pid) if " -N -L " in process_command(pid)]
    local = int(process_command(tunnels[0]).split(" -L ")[1].split(":")[0])

    # The box's proxy restarts (a new instance) and the tunnel drops: the new instance is taken.
    os.kill(box.pid("proxy.pid"), signal.SIGTERM)
    restart = subprocess.run([str(lab.laptop / "bin" / "ssh"), "box-a", "python3 /root/.simple_api_proxy/box.py"],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert '"event": "ready"' in restart.stdout, restart.stdout + restart.stderr
    said = []
    reader = threading.Thread(target=lambda: said.extend(launcher.stderr), daemon=True)
    reader.start()
    os.kill(tunnels[0], signal.SIGKILL)
    instance = (box.folder / "proxy.instance").read_text().strip()
    assert poll_until(lambda: any("reopened" in line for line in said), 30), said
    assert any("the proxy on box-a restarted (instance %s" % instance in line for line in said), said
    assert _health_instance(local) == instance
    tunnels = [pid for pid in descendants(launcher.pid) if " -N -L " in process_command(pid)]

    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=20)
    reader.join(timeout=10)
    assert launcher.returncode == 143
    assert tunnels and poll_until(lambda: not any(map(_process_alive, tunnels + [claude])), 5)

    proxy, ollama = box.pid("proxy.pid"), box.pid("ollama.pid")
    assert _process_alive(proxy)  # the box keeps serving after the laptop leaves
    result = lab.run(box, "--stop", "--all")
    assert result.returncode == 0, result.stderr
    assert "proxy stopped" in result.stderr and "ollama serve stopped" in result.stderr
    assert not _process_alive(proxy) and not _process_alive(ollama)

    # README's on-start line brings both back after a container restart, and returns.
    onstart = subprocess.run([str(lab.laptop / "bin" / "ssh"), "box-a", "python3 /root/.simple_api_proxy/box.py"],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert onstart.returncode == 0 and '"event": "ready"' in onstart.stdout, onstart.stdout + onstart.stderr
    assert _process_alive(box.pid("proxy.pid")) and _process_alive(box.pid("ollama.pid"))


def test_several_boxes_each_run_ollama_behind_one_proxy_here(lab):
    a, b = lab.boxes["a"], lab.boxes["b"]
    for box in (a, b):
        box.kill_processes()  # Ollama stopped, no proxy: --deploy readies Ollama and the model only
    result = lab.run([a, b], "--deploy", "--local-port", str(free_port()), "--", "-p", "which box?",
                     env=lab.env(real_claude=True))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("Answer from box a.", "Answer from box b.")
    assert "spreads requests over 2 boxes" in result.stderr
    for box in (a, b):
        assert "tunnel 127.0.0.1:" in result.stderr and "box-%s:127.0.0.1:%d (Ollama)" % (box.name, box.ollama_port) \
            in result.stderr
        assert _process_alive(box.pid("ollama.pid")) and not _process_alive(box.pid("proxy.pid"))

    check = lab.run([a, b], "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count("ollama on box:       ok") == 2 and check.stdout.count("tunnel:              ok") == 2

    os.kill(a.pid("ollama.pid"), signal.SIGKILL)
    check = lab.run([a, b], "--check")
    assert check.returncode == 1
    assert "ollama on box:       failed (box-a: Ollama not answering at http://127.0.0.1:%d" % a.ollama_port \
        in check.stdout, check.stdout

    stop = lab.run([a, b], "--stop", "--all")
    assert stop.returncode == 0, stop.stderr
    assert not _process_alive(b.pid("ollama.pid"))


def _health_instance(port):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        return json.loads(opener.open("http://127.0.0.1:%d/health" % port, timeout=2).read()).get("instance_id")
    except (OSError, ValueError):
        return None


def test_changed_host_key_says_how_to_clear_it(lab):
    box = lab.boxes["a"]
    known = lab.laptop / "known_hosts"
    saved = known.read_text() if known.exists() else ""
    other = lab.laptop / "other_key"
    if not other.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    try:
        known.write_text("[127.0.0.1]:%d %s" % (box.ssh_port, other.with_suffix(".pub").read_text()))
        result = lab.run(box, "--check")
    finally:
        known.write_text(saved)
    assert result.returncode == 1
    assert "host key" in result.stdout and "ssh-keygen -R '[127.0.0.1]:%d'" % box.ssh_port in result.stdout


PYTHON_3_8 = "/root/.pyenv/versions/3.8.18"  # where this machine keeps the oldest python3 the box may have


@pytest.fixture
def user_box(ssh_lab):
    """A box where we log in as a normal user, created for the test and removed after it; its python3 is
    3.8 where this machine has one."""
    need(shutil.which("useradd") and shutil.which("userdel"), "useradd/userdel are not installed (passwd)")
    user = "sapbox%s" % os.urandom(4).hex()
    root = Path(tempfile.mkdtemp(prefix=user + "."))  # not under pytest's folder, which only root may enter
    root.chmod(0o755)
    # "*", not useradd's locked "!": sshd without PAM refuses a locked account even with a key.
    subprocess.run(["useradd", "-M", "-d", str(root / "home"), "-s", "/bin/sh", "-p", "*", user], check=True)
    config = ssh_lab.laptop / "ssh_config"
    saved = config.read_text()
    box = None
    try:
        box = SshBox(ssh_lab, "user", "/bin/sh", user=user, root=root,
                     python_prefix=PYTHON_3_8 if os.access(PYTHON_3_8 + "/bin/python3", os.X_OK) else None)
        config.write_text(saved + "Host box-user\n  HostName 127.0.0.1\n  Port %d\n  User %s\n  IdentityFile %s\n"
                          "  UserKnownHostsFile %s\n  BatchMode yes\n\n"
                          % (box.ssh_port, user, ssh_lab.key, ssh_lab.laptop / "known_hosts"))
        yield box
    finally:
        ssh_lab.cleanup()
        config.write_text(saved)
        if box:
            box.stop()
        subprocess.run(["userdel", user], check=True)
        shutil.rmtree(root, ignore_errors=True)


def test_deploy_as_a_normal_user_then_stop_and_say_that_installing_ollama_needs_root(user_box):
    box, lab = user_box, user_box.lab
    uid = pwd.getpwnam(box.user).pw_uid
    result = lab.run(box, "--deploy")
    assert result.returncode == 0, result.stderr
    assert "started ollama serve" in result.stderr and "started the proxy" in result.stderr
    settings_file, key_file = box.folder / "proxy.json", box.folder / "proxy.key"
    for private in (settings_file, key_file):
        assert private.stat().st_mode & 0o777 == 0o600 and private.stat().st_uid == uid
    assert all(item.stat().st_uid == uid for item in [box.folder, *box.folder.iterdir()])
    pid = box.pid("proxy.pid")
    assert _process_alive(pid) and os.stat("/proc/%d" % pid).st_uid == uid
    if box.python_prefix:  # the proxy and the box program ran on python 3.8
        assert os.readlink("/proc/%d/exe" % pid).startswith(box.python_prefix + "/bin/python3.8")
    check = lab.run(box, "--check")
    assert check.returncode == 0, check.stdout + check.stderr

    stopped = lab.run(box, "--stop", "--all")
    assert stopped.returncode == 0 and "proxy stopped" in stopped.stderr, stopped.stderr
    assert not _process_alive(pid) and not _process_alive(box.pid("ollama.pid"))

    # No ollama, not root, no sudo: the official installer would fail; say what is needed instead.
    (box.home / "ollama-bin" / "ollama").unlink()
    (box.install_bin / "curl").write_text("#!/bin/sh\necho 'no internet in tests' >&2\nexit 1\n")
    (box.install_bin / "curl").chmod(0o755)
    env = lab.env()
    del env["CLAUDE_START_OLLAMA_INSTALL"]
    missing = lab.run(box, "--deploy", env=env)
    assert missing.returncode == 1, missing.stderr
    assert "no internet in tests" not in missing.stderr
    assert "Ollama is not installed, and its official install script" in missing.stderr, missing.stderr
    assert "needs root: %s is not root and has no passwordless sudo" % box.user in missing.stderr


###############################################################################
# Defects of the bash launcher, each fixed
###############################################################################

def _proxy_call(port, key=None):
    headers = {"x-api-key": key} if key else {}
    request = urllib.request.Request("http://127.0.0.1:%d/v1/models" % port, headers=headers)
    try:
        return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10).status
    except urllib.error.HTTPError as error:
        return error.code


def test_deploy_without_a_key_gives_the_box_its_own_and_claude_code_gets_it(lab):
    box = lab.boxes["a"]
    result = lab.run(box, "--deploy", "--", "-p", "say hello", env=lab.env(real_claude=True))
    assert result.returncode == 0 and result.stdout.strip() == "Answer from box a.", result.stderr
    box_key = box.folder / "proxy.key"
    laptop_key = lab.laptop / "home" / ".config" / "simple_api_proxy" / "keys" / "box-a"
    for private in (box_key, laptop_key):
        assert private.stat().st_mode & 0o777 == 0o600, private
    key = box_key.read_text().strip()
    assert len(key) >= 32 and laptop_key.read_text().strip() == key
    # Another user of the box reaches the proxy's loopback port, but not without the key.
    assert _proxy_call(box.proxy_port) == 401 and _proxy_call(box.proxy_port, key) == 200
    again = lab.run(box, "--deploy")
    assert again.returncode == 0 and "already running" in again.stderr, again.stderr
    assert box_key.read_text().strip() == key


def test_no_setting_can_add_a_line_to_the_proxys_settings(lab):
    box = lab.boxes["a"]
    separators = ["\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
    value = "secret" + "".join(separator + "API_HOST=0.0.0.0" for separator in separators)
    result = lab.run(box, "--deploy", env=lab.env(REDIS_PASSWORD=value))
    assert result.returncode == 0, result.stderr
    environ = dict(item.split(b"=", 1) for item in
                   Path("/proc/%d/environ" % box.pid("proxy.pid")).read_bytes().split(b"\0") if b"=" in item)
    assert environ[b"API_HOST"] == b"127.0.0.1" and environ[b"REDIS_PASSWORD"] == value.encode()


def test_stop_never_signals_a_process_that_took_the_proxys_pid(lab):
    box = lab.boxes["a"]
    assert lab.run(box, "--deploy").returncode == 0
    proxy = box.pid("proxy.pid")
    os.kill(proxy, signal.SIGKILL)
    assert poll_until(lambda: not _process_alive(proxy), 10)
    # A process that now holds the pid the pidfile names, and looks like the proxy.
    lookalike = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "simple_api_proxy.py"])
    try:
        (box.folder / "proxy.pid").write_text("%d\n" % lookalike.pid)
        result = lab.run(box, "--stop")
        assert result.returncode == 0, result.stderr
        assert "no proxy started by the launcher is running" in result.stderr
        assert lookalike.poll() is None
    finally:
        lookalike.kill()
        lookalike.wait()
