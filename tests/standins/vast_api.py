"""A stand-in for vast.ai's REST API whose instances are real sshd boxes on 127.0.0.1.

The wire format is the one the official `vastai` CLI (vastai/api/*.py) sends and reads:
  POST /api/v0/bundles/                 search offers: {"offers": [...]} (dph_total priced for allocated_storage)
  PUT  /api/v0/asks/{offer}/            create: {"success": true, "new_contract": id, "instance_api_key": ...}
  GET  /api/v1/instances/               list, paged: {"instances", "next_token", "total_instances"}
  GET  /api/v0/instances/               list (legacy): {"instances": [...]}
  GET  /api/v0/instances/{id}/          show: {"instances": row} ({"instances": null} when gone)
  PUT  /api/v0/instances/{id}/          {"state": "running"|"stopped"} or {"label": ...}: {"success": true}
  DELETE /api/v0/instances/{id}/        {"success": true}
  GET  /api/v0/users/current[/]         the account, with "credit"
  GET/POST /api/v0/ssh/                 the account's SSH keys
Keys travel only as `Authorization: Bearer`; an instance's own key may start, stop or destroy that
instance and nothing else. Every answer is `Content-Type: application/json`.

Sections: Boxes (Container: sshd in a private mount namespace), the API state (VastStandIn),
HTTP (Handler), the laptop (Laptop: claude_start.sh --vast as a user runs it).
"""

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from standins.proxy import free_port
from standins.support import LAUNCHER_SCRIPT, STANDIN_BIN
from standins.sshlab import pids_in_namespace, sshd_config


###############################################################################
# Boxes
###############################################################################

class Container:
    """One instance's container: /root is `home` (its disk, kept across stop and start). Each start
    is a new sshd on a new port with a new host key, and runs /root/onstart.sh as vast does; a
    stop kills every process in it."""

    def __init__(self, root, authorized_key, path_dirs, env, system_path=True):
        self.root = Path(root)
        self.home = self.root / "home"
        (self.home / ".ssh").mkdir(parents=True)
        shutil.copy(authorized_key, self.home / ".ssh" / "authorized_keys")
        self.path_dirs = [str(d) for d in path_dirs] + (["/usr/local/bin", "/usr/bin", "/bin"] if system_path else [])
        self.env = env
        self.ollama_port = free_port()  # a real box has 11434 to itself; here boxes share the loopback
        passwd = "".join(re.sub(r"^(root:[^:]*:0:0:[^:]*:/root):[^:\n]*$", r"\1:/bin/sh", line)
                         for line in Path("/etc/passwd").read_text().splitlines(True))
        (self.root / "passwd").write_text(passwd)
        self.sshd = None
        self.ssh_port = None
        self.namespace = None
        self.starts = 0

    def start(self, on_start):
        self.starts += 1
        self.ssh_port = free_port()
        host_key = self.root / "host_key"
        for old in (host_key, host_key.with_suffix(".pub")):
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
        (self.root / "sshd_config").write_text(sshd_config(self.ssh_port, host_key))
        path = ":".join(self.path_dirs)
        ollama_host = "127.0.0.1:%d" % self.ollama_port
        (self.home / ".ssh" / "environment").write_text("PATH=%s\nOLLAMA_HOST=%s\n" % (path, ollama_host))
        (self.home / "onstart.sh").write_text(on_start or "")
        env = {"PATH": path, "HOME": "/root", "LANG": "C.UTF-8"}
        env.update(self.env)
        env["OLLAMA_HOST"] = ollama_host
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        setup = ("[ -d /run/sshd ] || { mount -t tmpfs tmpfs /run && mkdir /run/sshd; } && "
                 "mount --rbind %s /root && mount --bind %s /etc/passwd && "
                 "{ cd /root && %s %s PATH=%s /bin/sh /root/onstart.sh >>/root/onstart.out 2>&1 </dev/null & } && "
                 "exec %s -D -e -f %s" % (self.home, self.root / "passwd", shutil.which("setsid"), shutil.which("env"),
                                          path, sshd, self.root / "sshd_config"))
        # The namespace is set up with this machine's tools; the container's PATH is the on-start script's.
        self.sshd = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", setup],
                                     env=dict(env, PATH=os.environ["PATH"]),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.root / "sshd.log", "a"))
        deadline = time.monotonic() + 20
        while not self.listening():
            if self.sshd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the stand-in box's sshd did not start: %s" % (self.root / "sshd.log").read_text())
            time.sleep(0.05)
        self.namespace = os.readlink("/proc/%d/ns/mnt" % self.sshd.pid)

    def listening(self):
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.ssh_port)) == 0

    def processes(self):
        return pids_in_namespace(self.namespace) if self.namespace else []

    def stop(self):
        """As a container stop: every process goes, the disk stays."""
        if self.sshd is None:
            return
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.sshd.wait(timeout=10)
        self.sshd, self.namespace = None, None


###############################################################################
# The API's state
###############################################################################

def offer(id, gpu="RTX 4090", dph_base=0.35, storage_cost=0.15, reliability=0.995, cuda=12.4, disk_space=200,
          verified=True, direct_port_count=100, geolocation="Sweden, SE", **more):
    """An offer as /bundles/ lists it (a subset of its 80-odd fields: those the CLI shows or filters)."""
    row = {"id": id, "ask_contract_id": id, "machine_id": 1000 + id, "host_id": 500 + id, "gpu_name": gpu,
           "num_gpus": 1, "gpu_ram": 24564, "cpu_cores_effective": 8, "cpu_ram": 64000, "disk_space": disk_space,
           "dph_base": dph_base, "storage_cost": storage_cost, "inet_up": 800.0, "inet_down": 900.0,
           "reliability": reliability, "reliability2": reliability, "cuda_max_good": cuda,
           "direct_port_count": direct_port_count, "geolocation": geolocation, "verified": verified,
           "verification": "verified" if verified else "unverified", "external": False, "rentable": True,
           "rented": False, "static_ip": True, "driver_version": "550.54.14", "score": 200.0}
    row.update(more)
    return row


def _matches(row, query):
    for field, test in query.items():
        if field in ("order", "type", "limit", "allocated_storage", "disable_bundling") or not isinstance(test, dict):
            continue
        value = row.get(field)
        for op, want in test.items():
            ok = {"eq": lambda: value == want, "neq": lambda: value != want,
                  "gt": lambda: value is not None and value > want, "gte": lambda: value is not None and value >= want,
                  "lt": lambda: value is not None and value < want, "lte": lambda: value is not None and value <= want,
                  "in": lambda: value in want, "notin": lambda: value not in want}.get(op)
            if ok is None or not ok():
                return False
    return True


class VastStandIn:
    """The account (key, credit, SSH keys), the offers, the instances, and faults to inject.

    Test knobs: boot_delay (seconds from create/start to running), offers' "boots": False (never
    finishes booting), "gpu_taken": True (a restart waits for the GPU for ever), fail(...) (the next
    matching request gets a 429, a {"success": false}, or an answer later than the client waits)."""

    def __init__(self, root, authorized_key, path_dirs=(), key=None, credit=25.0, boot_delay=0.3, offers=(),
                 image_setup=None):
        self.root = Path(root)
        self.authorized_key, self.path_dirs = authorized_key, list(path_dirs)
        self.image_setup = image_setup  # image_setup(home, instance_id): what the image puts in /root
        self.system_path = True  # False: the containers' PATH is path_dirs alone (an image without python3)
        self.key = key or secrets.token_hex(32)
        self.credit, self.boot_delay = credit, boot_delay
        self.offers = {o["id"]: dict(o) for o in offers}
        self.instances = {}
        self.containers = {}
        self.ssh_keys = []
        self.requests = []  # (method, path, query, whose key: "account", "instance" or None)
        self.faults = []
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.next_id = 7000001
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.standin = self
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    # -- for tests ------------------------------------------------------------
    def fail(self, method, path_pattern, kind, times=1):
        """kind: "429", "success_false", or ("late", seconds): the request acts, its answer comes late."""
        with self.lock:
            self.faults.append([method, re.compile(path_pattern), kind, times])

    def wait_for(self, predicate, timeout=60):
        """Until predicate() (called under the lock) is true; woken by every state change."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("the stand-in never reached the awaited state: %s" % self.instances)
                self.changed.wait(left)

    def count(self, method, pattern):
        return sum(1 for m, p, _, _ in self.requests if m == method and re.search(pattern, p))

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        for container in list(self.containers.values()):
            container.stop()

    # -- instances --------------------------------------------------------------
    def create(self, offer_id, body):
        offer = self.offers.get(offer_id)
        if offer is None or offer["rented"]:
            return 400, {"success": False, "error": "no_such_ask", "msg": "Offer %s is no longer available." % offer_id}
        if self.credit <= 0:
            return 402, {"success": False, "error": "insufficient_credit", "msg": "Insufficient credit."}
        offer["rented"] = True
        instance_id = self.next_id
        self.next_id += 1
        disk = float(body.get("disk") or 10)
        row = {"id": instance_id, "machine_id": offer["machine_id"], "host_id": offer["host_id"],
               "label": body.get("label"), "image_uuid": body.get("image"), "image_runtype": body.get("runtype"),
               "onstart": body.get("onstart"), "extra_env": [[k, v] for k, v in (body.get("env") or {}).items()],
               "gpu_name": offer["gpu_name"], "num_gpus": offer["num_gpus"], "disk_space": disk,
               "dph_base": offer["dph_base"], "storage_cost": offer["storage_cost"],
               "dph_total": round(offer["dph_base"] + offer["storage_cost"] * disk / 720, 6),
               "geolocation": offer["geolocation"], "reliability2": offer["reliability"],
               "cuda_max_good": offer["cuda_max_good"], "actual_status": None, "intended_status": "running",
               "cur_state": "stopped", "next_state": "running", "status_msg": "Pulling image",
               "start_date": time.time(), "public_ipaddr": "127.0.0.1", "ssh_host": None, "ssh_port": None,
               "ssh_idx": None, "ports": {}, "instance_api_key": secrets.token_hex(32), "gpu_util": 0.0,
               "disk_usage": 0.0, "verification": offer["verification"], "offer": offer_id}
        self.instances[instance_id] = row
        env = {k: v for k, v in (body.get("env") or {}).items() if not k.startswith("-")}
        env.update(CONTAINER_ID=str(instance_id), CONTAINER_API_KEY=row["instance_api_key"])
        container = self.containers[instance_id] = Container(self.root / ("instance-%d" % instance_id),
                                                             self.authorized_key, self.path_dirs, env,
                                                             self.system_path)
        if self.image_setup:
            self.image_setup(container.home, instance_id)
        self.schedule_boot(instance_id)
        return 200, {"success": True, "new_contract": instance_id, "instance_api_key": row["instance_api_key"]}

    def schedule_boot(self, instance_id):
        row = self.instances[instance_id]
        offer = self.offers[row["offer"]]
        if offer.get("boots") is False:
            return  # stays "loading" for ever, as a host whose image pull hangs
        if offer.get("gpu_taken") and row["start_date"] and row.get("stopped_once"):
            row.update(actual_status="scheduling", status_msg="Scheduling: waiting for the GPU to be released")
            return
        timer = threading.Timer(self.boot_delay, self.boot, (instance_id,))
        timer.daemon = True
        timer.start()

    def boot(self, instance_id):
        with self.lock:
            row = self.instances.get(instance_id)
            if row is None or row["intended_status"] != "running":
                return
            container = self.containers[instance_id]
            container.start(row["onstart"])
            row.update(actual_status="running", cur_state="running", status_msg="success, running",
                       start_date=time.time(),
                       ports={"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(container.ssh_port)}]},
                       ssh_host="127.0.0.1", ssh_port=container.ssh_port)
            self.changed.notify_all()

    def set_state(self, instance_id, state):
        row = self.instances[instance_id]
        if state == "stopped":
            self.containers[instance_id].stop()
            row.update(intended_status="stopped", actual_status="exited", cur_state="stopped", next_state="stopped",
                       status_msg="Exited (137)", ports={}, ssh_host=None, ssh_port=None, stopped_once=True)
        elif state == "running" and row["intended_status"] != "running":
            row.update(intended_status="running", next_state="running", status_msg="Starting")
            self.schedule_boot(instance_id)
        self.changed.notify_all()

    def destroy(self, instance_id):
        row = self.instances.pop(instance_id)
        self.containers.pop(instance_id).stop()
        self.offers[row["offer"]]["rented"] = False
        self.changed.notify_all()

    def public_row(self, row):
        shown = {k: v for k, v in row.items() if k not in ("offer", "stopped_once")}
        return shown


###############################################################################
# HTTP
###############################################################################

INSTANCE = re.compile(r"^/api/v0/instances/(\d+)/$")
ASK = re.compile(r"^/api/v0/asks/(\d+)/$")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_json(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a caller stopped with its box
            self.wfile.write(data)

    def do_GET(self):
        self.serve("GET")

    def do_POST(self):
        self.serve("POST")

    def do_PUT(self):
        self.serve("PUT")

    def do_DELETE(self):
        self.serve("DELETE")

    def serve(self, method):
        standin = self.server.standin
        parts = urllib.parse.urlsplit(self.path)
        path, query = parts.path, urllib.parse.parse_qs(parts.query)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        auth = self.headers.get("Authorization") or ""
        key = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        late = None
        with standin.lock:
            whose = "account" if key == standin.key else "instance" if key and any(
                row["instance_api_key"] == key for row in standin.instances.values()) else None
            standin.requests.append((method, path, parts.query, whose))
            for fault in standin.faults:
                if fault[0] == method and fault[1].search(path) and fault[3] > 0:
                    fault[3] -= 1
                    if fault[2] == "429":
                        return self.send_json(429, {"detail": "API requests too frequent endpoint threshold=4.0"})
                    if fault[2] == "success_false":
                        return self.send_json(200, {"success": False, "error": "invalid_args",
                                                    "msg": "The stand-in was told to refuse this."})
                    late = fault[2][1]
                    break
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                return self.send_json(400, {"success": False, "error": "invalid_json", "msg": "Body is not JSON."})
            status, answer = self.route(standin, method, path, query, body, key)
            standin.changed.notify_all()
        if late:
            time.sleep(late)
        self.send_json(status, answer)

    def route(self, standin, method, path, query, body, key):
        match = INSTANCE.match(path)
        instance_key = match and key and any(int(match.group(1)) == i and row["instance_api_key"] == key
                                             for i, row in standin.instances.items())
        if key != standin.key and not (instance_key and method in ("PUT", "DELETE")):
            return 401, {"success": False, "error": "invalid_api_key", "msg": "Invalid user key"}
        if method == "GET" and path in ("/api/v0/users/current", "/api/v0/users/current/"):
            return 200, {"id": 42, "username": "standin", "email": "standin@example.com", "credit": standin.credit,
                         "balance": 0.0, "can_pay": True, "has_billing": True, "ssh_key": None}
        if method == "POST" and path == "/api/v0/bundles/":
            storage = float(body.get("allocated_storage") or 5.0)
            rows = []
            for offer in standin.offers.values():
                row = dict(offer, dph_total=round(offer["dph_base"] + offer["storage_cost"] * storage / 720, 6),
                           storage_total_cost=round(offer["storage_cost"] * storage / 720, 6))
                row.pop("boots", None)
                row.pop("gpu_taken", None)
                if _matches(row, body):
                    rows.append(row)
            for field, direction in reversed(body.get("order") or []):
                rows.sort(key=lambda r: r.get(field) or 0, reverse=direction == "desc")
            return 200, {"offers": rows[:int(body.get("limit") or 64)]}
        match_ask = ASK.match(path)
        if method == "PUT" and match_ask:
            if body.get("client_id") != "me" or not body.get("image"):
                return 400, {"success": False, "error": "invalid_args", "msg": "client_id and image are required"}
            return standin.create(int(match_ask.group(1)), body)
        if method == "GET" and path == "/api/v1/instances/":
            filters = json.loads(query.get("select_filters", ["{}"])[0])
            limit = int(query.get("limit", ["25"])[0])
            after = int(query.get("after_token", ["0"])[0])
            rows = [standin.public_row(r) for _, r in sorted(standin.instances.items()) if _matches(r, filters)]
            page = rows[after:after + limit]
            more = after + limit < len(rows)
            return 200, {"instances": page, "next_token": str(after + limit) if more else None,
                         "total_instances": len(rows)}
        if method == "GET" and path == "/api/v0/instances/":
            return 200, {"instances": [standin.public_row(r) for _, r in sorted(standin.instances.items())]}
        if match:
            instance_id = int(match.group(1))
            row = standin.instances.get(instance_id)
            if method == "GET":
                return 200, {"instances": standin.public_row(row) if row else None}
            if row is None:
                return 404, {"success": False, "error": "no_such_instance",
                             "msg": "Instance %d not found" % instance_id}
            if method == "PUT":
                if "state" in body:
                    if body["state"] not in ("running", "stopped"):
                        return 400, {"success": False, "error": "invalid_args", "msg": "bad state"}
                    standin.set_state(instance_id, body["state"])
                if "label" in body:
                    row["label"] = body["label"]
                return 200, {"success": True}
            if method == "DELETE":
                standin.destroy(instance_id)
                return 200, {"success": True}
        if path == "/api/v0/ssh/":
            if method == "GET":
                return 200, {"ssh_keys": list(standin.ssh_keys)}
            if method == "POST":
                entry = {"id": len(standin.ssh_keys) + 1, "ssh_key": body.get("ssh_key", ""),
                         "created_at": time.time()}
                standin.ssh_keys.append(entry)
                return 200, {"success": True, "key": entry}
        return 404, {"success": False, "error": "not_found", "msg": "%s %s is not a stand-in route" % (method, path)}


###############################################################################
# The laptop
###############################################################################

class Laptop:
    """claude_start.sh --vast as a user runs it: HOME with an SSH key, ssh reading only its own
    config (never the machine's), the stand-in Claude Code that asks one question, the vast key."""

    def __init__(self, home, vast, root):
        self.home, self.vast, self.root = home, vast, root
        self.bin = root / "bin"
        self.bin.mkdir()
        config = root / "ssh_config"
        config.write_text("Host *\n  GlobalKnownHostsFile /dev/null\n")
        (self.bin / "ssh").write_text("#!/bin/sh\nexec %s -F %s \"$@\"\n" % (shutil.which("ssh"), config))
        (self.bin / "ssh").chmod(0o755)
        shutil.copy(STANDIN_BIN / "answering_claude.py", self.bin / "claude")
        self.remote_port = free_port()

    def env(self, **extra):
        env = {"PATH": "%s:%s" % (self.bin, os.environ["PATH"]), "HOME": str(self.home), "LANG": "C.UTF-8",
               "TMPDIR": str(self.root), "XDG_CACHE_HOME": str(self.root / "cache"), "TERM": "dumb",
               "VAST_API_KEY": self.vast.key, "VAST_URL": self.vast.url,
               "CLAUDE_START_VAST_POLL": "0.05", "CLAUDE_START_VAST_HEARTBEAT": "0.3",
               "CLAUDE_START_VAST_WATCHDOG_TICK": "0.2"}
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def argv(self, *args):
        argv = [str(LAUNCHER_SCRIPT), "--vast", *args]
        if not any(a in args for a in ("--status", "--stop", "--destroy")):
            argv += ["--remote-port", str(self.remote_port), "--local-port", str(free_port())]
        return argv

    def run(self, *args, stdin="", timeout=120, **extra):
        began = time.monotonic()
        done = subprocess.run(self.argv(*args), env=self.env(**extra), input=stdin, capture_output=True, text=True,
                              timeout=timeout, cwd=self.root)
        done.seconds = time.monotonic() - began
        return done

    def start(self, *args, **extra):
        return subprocess.Popen(self.argv(*args), env=self.env(**extra), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.root)


def ollama_image(home, instance_id):
    """What the ollama/ollama image brings: Ollama, here the stand-in's state with its reply."""
    state = home / ".standin-ollama"
    state.mkdir()
    (state / "models").write_text("")
    (state / "reply").write_text("Answer from vast instance %d." % instance_id)
