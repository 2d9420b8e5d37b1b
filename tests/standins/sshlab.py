"""Real OpenSSH "boxes" for the launcher's --deploy tests.

Each SshBox is a real sshd on a free loopback port, in a private mount namespace where /root is a
temporary folder (the real home is never touched), with its own host key and an authorized key. The
box's PATH (from ~/.ssh/environment) holds a stand-in `ollama` command (bin/box_ollama.py) that
serves Ollama's API on the box's own port. SshLab is the laptop side: an ssh config naming the
boxes, a key, and the launcher's environment.
"""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from standins.ollama import MODEL
from standins.proxy import free_port
from standins.support import claude_code_binary, LAUNCHER_SCRIPT, STANDIN_BIN


def sshd_config(port, host_key):
    """A box's sshd: loopback only, keys only, root by key, the environment file honoured."""
    return ("Port %d\nListenAddress 127.0.0.1\nHostKey %s\nPidFile none\nAuthorizedKeysFile .ssh/authorized_keys\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            "PermitUserEnvironment yes\nStrictModes no\nUsePAM no\nLogLevel ERROR\nMaxSessions 50\n"
            "MaxStartups 50\n" % (port, host_key))


def pids_in_namespace(namespace):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink("/proc/%s/ns/mnt" % entry) == namespace:
                    pids.append(int(entry))
    return pids


class SshBox:
    """A GPU box stand-in: sshd (root login by key) whose /root is `home`; or, given `user`, an existing
    normal user's login to `root`/home, with the real /root hidden (as on a box where we are not root)."""

    def __init__(self, lab, name, shell, python_prefix=None, ollama_installed=True, user=None, root=None):
        self.lab, self.name, self.user = lab, name, user
        self.root = Path(root) if root else lab.root / name
        self.home = self.root / "home"
        self.folder = self.home / ".simple_api_proxy"
        self.state = self.home / ".standin-ollama"
        self.install_bin = self.root / "install-bin"  # where the "installer" puts ollama
        self.python_prefix = python_prefix
        self.ssh_port, self.ollama_port, self.proxy_port = free_port(), free_port(), free_port()
        (self.home / ".ssh").mkdir(parents=True)
        self.install_bin.mkdir()
        shutil.copy(lab.key.with_suffix(".pub"), self.home / ".ssh" / "authorized_keys")
        ollama_bin = lab.ollama_bin
        if user:  # the lab's folders are root's own: the user gets its copies in its home
            ollama_bin = self.home / "ollama-bin"
            ollama_bin.mkdir()
            shutil.copy(lab.ollama_bin / "ollama", ollama_bin / "ollama")
        path = [str(self.install_bin)] + ([str(ollama_bin)] if ollama_installed else [])
        path += ([python_prefix + "/bin"] if python_prefix else []) + ["/usr/local/bin", "/usr/bin", "/bin"]
        (self.home / ".ssh" / "environment").write_text(
            "PATH=%s\nOLLAMA_HOST=127.0.0.1:%d\n" % (":".join(path), self.ollama_port))
        if user:
            subprocess.run(["chown", "-R", "%s:" % user, str(self.home), str(self.install_bin)], check=True)
        else:
            passwd = "".join(re.sub(r"^(root:[^:]*:0:0:[^:]*:/root):[^:\n]*$", r"\1:" + shell, line)
                             for line in Path("/etc/passwd").read_text().splitlines(True))
            (self.root / "passwd").write_text(passwd)
        host_key = self.root / "host_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
        (self.root / "sshd_config").write_text(sshd_config(self.ssh_port, host_key))
        # sshd wants /run/sshd, which only its system service creates: a private /run if it is missing.
        # A python3 under the real /root (pyenv) stays visible: for root it is mounted at the same place in
        # the box's home.
        keep = ""
        if user:
            # /root becomes an empty, readable tmpfs; a python3 kept from it stays at its own path
            # (its libpython is found there).
            if python_prefix and python_prefix.startswith("/root/"):
                staged = self.root / "python"
                staged.mkdir()
                keep = ("mount --bind {p} {s} && mount -t tmpfs -o mode=755 tmpfs /root && mkdir -p {p} && "
                        "mount --move {s} {p} && ").format(p=python_prefix, s=staged)
            setup = ("[ -d /run/sshd ] || { mount -t tmpfs tmpfs /run && mkdir /run/sshd; } && %s"
                     "exec %s -D -e -f %s" % (keep, lab.sshd, self.root / "sshd_config"))
        else:
            if python_prefix and python_prefix.startswith("/root/"):
                inside = self.home / python_prefix[len("/root/"):]
                inside.mkdir(parents=True)
                keep = "mount --bind %s %s && " % (python_prefix, inside)
            setup = ("[ -d /run/sshd ] || { mount -t tmpfs tmpfs /run && mkdir /run/sshd; } && %s"
                     "mount --rbind %s /root && mount --bind %s /etc/passwd && exec %s -D -e -f %s"
                     % (keep, self.home, self.root / "passwd", lab.sshd, self.root / "sshd_config"))
        self.sshd = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", setup],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.root / "sshd.log", "w"))
        deadline = time.monotonic() + 20
        while not self._listening():
            assert self.sshd.poll() is None and time.monotonic() < deadline, (self.root / "sshd.log").read_text()
            time.sleep(0.05)
        self.namespace = os.readlink("/proc/%d/ns/mnt" % self.sshd.pid)
        self.reset()

    def _listening(self):
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.ssh_port)) == 0

    def reset(self, models=(MODEL,)):
        """A bare box: Ollama installed (or not) but stopped, no proxy, nothing deployed."""
        self.kill_processes()
        shutil.rmtree(self.folder, ignore_errors=True)
        shutil.rmtree(self.state, ignore_errors=True)
        for item in self.install_bin.iterdir():
            item.unlink()
        self.state.mkdir()
        (self.state / "models").write_text("".join(m + "\n" for m in models))
        (self.state / "reply").write_text("Answer from box %s." % self.name)
        if self.user:
            subprocess.run(["chown", "-R", "%s:" % self.user, str(self.state)], check=True)

    def kill_processes(self):
        """Everything the box runs (proxy, ollama serve, sessions) but its sshd."""
        for pid in pids_in_namespace(self.namespace):
            if pid != self.sshd.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def pid(self, name):
        path = self.folder / name
        return int(path.read_text()) if path.exists() else None

    def stop(self):
        self.kill_processes()
        self.sshd.kill()
        self.sshd.wait(timeout=10)


class SshLab:
    """The laptop: an ssh config naming the boxes, a key, and the launcher's environment."""


    def __init__(self, root):
        self.root = root
        self.sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self.laptop = root / "laptop"
        for d in ("bin", "stub-bin", "home", "tmp", "ollama-bin"):
            (self.laptop / d).mkdir(parents=True, exist_ok=True)
        self.key = self.laptop / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        self.ollama_bin = self.laptop / "ollama-bin"
        ollama = self.ollama_bin / "ollama"
        shutil.copyfile(STANDIN_BIN / "box_ollama.py", ollama)
        ollama.chmod(0o755)
        self.boxes = {"a": SshBox(self, "a", "/bin/sh"),
                      "b": SshBox(self, "b", "/bin/bash", python_prefix=sys.prefix,
                                  ollama_installed=False)}
        config = ""
        for box in self.boxes.values():
            config += ("Host box-{n}\n  HostName 127.0.0.1\n  Port {p}\n  User root\n  IdentityFile {k}\n"
                       "  UserKnownHostsFile {kh}\n  BatchMode yes\n\n").format(
                           n=box.name, p=box.ssh_port, k=self.key, kh=self.laptop / "known_hosts")
        (self.laptop / "ssh_config").write_text(config)
        wrapper = "#!/bin/sh\nexec %s -F %s \"$@\"\n" % (shutil.which("ssh"), self.laptop / "ssh_config")
        for d in ("bin", "stub-bin"):
            (self.laptop / d / "ssh").write_text(wrapper)
            (self.laptop / d / "ssh").chmod(0o755)
        shutil.copyfile(STANDIN_BIN / "box_claude.sh", self.laptop / "stub-bin" / "claude")
        (self.laptop / "stub-bin" / "claude").chmod(0o755)
        # What --deploy runs on a box without ollama: never the real installer in a test.
        self.installer = self.laptop / "install-ollama.sh"
        self.installer.write_text('echo ">>> Installing ollama to ${PATH%%%%:*}"\ncp %s "${PATH%%%%:*}/"\n'
                                  % (self.ollama_bin / "ollama"))
        self.procs = []

    def env(self, real_claude=False, **extra):
        bin_dir = self.laptop / ("bin" if real_claude else "stub-bin")
        if real_claude:
            target = self.laptop / "bin" / "claude"
            if not target.exists():
                target.symlink_to(claude_code_binary())
        env = {"PATH": "%s:%s" % (bin_dir, os.environ["PATH"]), "HOME": str(self.laptop / "home"),
               "TMPDIR": str(self.laptop / "tmp"), "LANG": "C.UTF-8", "TERM": "dumb",
               "STUB_CLAUDE_PIDFILE": str(self.laptop / "claude.pid"),
               "CLAUDE_START_OLLAMA_INSTALL": "sh %s" % self.installer}
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def start(self, box, *args, env=None):
        """The launcher for one box (its proxy on box.proxy_port), or for a list of boxes."""
        boxes = box if isinstance(box, list) else [box]
        where = [word for each in boxes for word in ("--ssh", "box-" + each.name)]
        if len(boxes) == 1:
            where += ["--remote-port", str(box.proxy_port)]
        if "--local-port" not in args:
            where += ["--local-port", str(free_port())]  # not 8001, which this machine may be using
        proc = subprocess.Popen([str(LAUNCHER_SCRIPT), *where, *args],
                                env=env or self.env(), cwd=self.laptop, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, box, *args, env=None, timeout=90):
        proc = self.start(box, *args, env=env)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail("claude_start.sh timed out\nstdout:\n%s\nstderr:\n%s" % (out, err))
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        self.procs = []
