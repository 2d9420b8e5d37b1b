#!/usr/bin/env python3
"""claude_vast.py - the GPU box's life on vast.ai for claude_start: rent, resume, stop when idle.

Standard library only, Python 3.8 or newer: the laptop's launcher imports it, and the box runs it
(the idle watchdog and the launcher's attachment) from ~/.simple_api_proxy/.

Sections, each using only those above it:
  Errors            what went wrong, each saying what to do
  Durations, money  parsing --idle-stop, showing $/h and times
  Provider          the interface another provider (Runpod) would implement
  vast.ai REST      VastApi: urllib, Bearer key, timeouts, 429 backoff, {"success": false}
  VastProvider      the Provider over vast.ai's REST API, as the official `vastai` CLI calls it
  Offer choice      OfferQuery: filters, price for the rented disk, why nothing matched
  Laptop side       Rental: find ours, rent, resume, wait for SSH; status, stop, destroy
  Box side          ON_START script, Watchdog, attach (the launcher's heartbeat)
  Command line      `python3 claude_vast.py watchdog|attach|idle` on the box
"""

import fcntl
import json
import logging
import logging.handlers
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

log = logging.getLogger("claude_vast")

DEFAULT_URL = "https://console.vast.ai"
DEFAULT_LABEL = "simple_api_proxy"
DEFAULT_IMAGE = "ollama/ollama:latest"
DEFAULT_DISK_GB = 40
DEFAULT_IDLE_STOP = 30 * 60
DEFAULT_BOOT_TIMEOUT = 10 * 60
BOX_FOLDER = ".simple_api_proxy"  # under the box's home, as the deploy flow keeps it
KEY_FILES = ("~/.config/vastai/vast_api_key", "~/.vast_api_key")  # where the official CLI keeps it
BILLING_URL = "https://cloud.vast.ai/billing/"


###############################################################################
# Errors
###############################################################################

class VastError(Exception):
    """A failure whose message says what to do."""


class KeyRejected(VastError):
    """401/403: the API key was refused."""


class ApiFailure(VastError):
    """The API answered, but no: an HTTP error, or {"success": false} with HTTP 200."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class NotFound(ApiFailure):
    """404: no such instance (destroyed meanwhile)."""


class Unreachable(VastError):
    """No answer: connection refused, reset or timed out. The request may or may not have acted."""


class NoOffer(VastError):
    """Nothing to rent matches the filters."""


class OutOfCredit(VastError):
    """The account cannot pay for an hour of the offer."""


class BootFailed(VastError):
    """The instance did not become usable in time."""


###############################################################################
# Durations, money
###############################################################################

def parse_duration(text):
    """Seconds in "30m", "2h", "90s", "45" (seconds); None for "off"."""
    text = str(text).strip().lower()
    if text in ("off", "0", "none", "never"):
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    scale = units.get(text[-1:], None)
    number = text[:-1] if scale else text
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise ValueError("%r is not a duration: use e.g. 30m, 2h, 90s or off" % text) from None
    if seconds <= 0:
        raise ValueError("%r is not a duration: use e.g. 30m, 2h, 90s or off" % text)
    return seconds


def show_duration(seconds):
    seconds = int(max(0, seconds))
    if seconds < 60:
        return "%ds" % seconds
    if seconds < 3600:
        return "%dm%02ds" % divmod(seconds, 60)
    hours, rest = divmod(seconds, 3600)
    return "%dh%02dm" % (hours, rest // 60)


def show_money(dollars):
    return "$%.2f" % dollars if dollars >= 0.995 or dollars == 0 else "$%.3f" % dollars


###############################################################################
# Provider: what the launcher needs from any GPU cloud
###############################################################################

class Instance:
    """One rented box as the provider reports it. `state` is one of: running, starting, stopped,
    scheduling (a start waits for its GPU), gone."""

    def __init__(self, id, label, state, gpu, dollars_per_hour, started, ssh_host, ssh_port, detail=""):
        self.id, self.label, self.state, self.gpu = id, label, state, gpu
        self.dollars_per_hour, self.started = dollars_per_hour, started
        self.ssh_host, self.ssh_port, self.detail = ssh_host, ssh_port, detail

    @property
    def uptime(self):
        return max(0.0, time.time() - self.started) if self.started else 0.0

    def __repr__(self):
        return "<Instance %s %s %s>" % (self.id, self.state, self.gpu)


class Offer:
    def __init__(self, id, gpu, num_gpus, dollars_per_hour, location, reliability, cuda, disk_space):
        self.id, self.gpu, self.num_gpus = id, gpu, num_gpus
        self.dollars_per_hour, self.location = dollars_per_hour, location
        self.reliability, self.cuda, self.disk_space = reliability, cuda, disk_space

    def describe(self):
        gpus = "%dx %s" % (self.num_gpus, self.gpu) if self.num_gpus > 1 else self.gpu
        return "%s at %s/h in %s, reliability %.1f%% (offer %s)" % (
            gpus, show_money(self.dollars_per_hour), self.location or "?", self.reliability * 100, self.id)


class Provider:
    """A GPU cloud as the launcher uses it. Every method raises VastError (or a subclass) with a
    message that says what to do. `self_stop` is the one call made from inside the box, with the
    instance's own restricted key."""

    name = "?"

    def search(self, query):
        """Offers matching an OfferQuery, cheapest first."""
        raise NotImplementedError

    def create(self, offer, label, image, disk_gb, on_start, env):
        """Rent `offer`; the new instance's id. Never retried on Unreachable: see Rental.rent."""
        raise NotImplementedError

    def show(self, instance_id):
        """The Instance, or None when it no longer exists."""
        raise NotImplementedError

    def list_by_label(self, label):
        raise NotImplementedError

    def start(self, instance_id):
        raise NotImplementedError

    def stop(self, instance_id):
        raise NotImplementedError

    def destroy(self, instance_id):
        raise NotImplementedError

    def credit(self):
        """The account's credit in dollars."""
        raise NotImplementedError

    def register_ssh_key(self, public_key):
        """Make the account's new instances accept `public_key`; True when it was added now."""
        raise NotImplementedError

    def self_stop(self, action):
        """From inside the instance: `stop` or `destroy` it with the instance's own key."""
        raise NotImplementedError


###############################################################################
# vast.ai REST: one request, with the CLI's conventions
###############################################################################

class VastApi:
    """HTTP to vast.ai as the official CLI does it (vastai/api/client.py): the base URL plus
    /api/v0/..., query values as JSON (strings as they are), a JSON body, and the key only as
    `Authorization: Bearer`. 429 is retried after a growing pause (vast sends no Retry-After);
    anything else is not, so that a create is never sent twice."""

    def __init__(self, key, key_source, url=DEFAULT_URL, timeout=30.0, backoff=(1, 2, 4, 8, 16)):
        self.key, self.key_source = key, key_source
        self.url = url.rstrip("/")
        self.timeout, self.backoff = timeout, tuple(backoff)
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler(
            {} if urllib.parse.urlsplit(self.url).hostname in ("127.0.0.1", "localhost") else None))

    def address(self, path, query=None):
        if not path.startswith("/api/v"):
            path = "/api/v0" + path
        if not query:
            return self.url + path
        return self.url + path + "?" + "&".join(
            "%s=%s" % (name, urllib.parse.quote_plus(value if isinstance(value, str) else json.dumps(value)))
            for name, value in query.items())

    def call(self, method, path, query=None, body=None, timeout=None):
        """The answer's JSON. Raises KeyRejected, NotFound, ApiFailure or Unreachable."""
        data = json.dumps(body).encode() if body is not None else None
        what = "%s %s" % (method, path)
        pauses = list(self.backoff)
        while True:
            request = urllib.request.Request(self.address(path, query), data=data, method=method)
            request.add_header("Authorization", "Bearer " + self.key)
            request.add_header("Accept", "application/json")
            request.add_header("User-Agent", "simple_api_proxy-claude_vast")
            if data is not None:
                request.add_header("Content-Type", "application/json")
            try:
                with self.opener.open(request, timeout=timeout or self.timeout) as response:
                    return self.answer(what, response.status, response.read())
            except urllib.error.HTTPError as error:
                raw = error.read()
                if error.code == 429 and pauses:
                    pause = pauses.pop(0)
                    log.info("vast.ai: %s was rate limited (429): trying again in %ss", what, pause)
                    time.sleep(pause)
                    continue
                return self.answer(what, error.code, raw)
            except (OSError, ValueError) as error:  # refused, reset, timed out, bad URL
                reason = getattr(error, "reason", error)
                raise Unreachable("vast.ai at %s did not answer %s: %s. Check your network, or VAST_URL"
                                  % (self.url, what, reason)) from None

    def answer(self, what, status, raw):
        try:
            body = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        except ValueError:
            body = None
        message = ""
        if isinstance(body, dict):
            message = str(body.get("msg") or body.get("error") or body.get("detail") or "")
        if status in (401, 403):
            raise KeyRejected("vast.ai rejected the API key read from %s (HTTP %d%s). Create a key at "
                              "https://cloud.vast.ai/manage-keys/ and put it in VAST_API_KEY or "
                              "~/.config/vastai/vast_api_key" % (self.key_source, status,
                                                                  ": " + message if message else ""))
        if status == 404:
            raise NotFound("%s: not found (HTTP 404%s)" % (what, ": " + message if message else ""), status)
        if status == 429:
            raise ApiFailure("vast.ai kept refusing %s as too many requests (HTTP 429): wait a minute and "
                             "run it again" % what, status)
        if status >= 400:
            raise ApiFailure("vast.ai refused %s (HTTP %d%s)" % (what, status, ": " + message if message else ""),
                             status)
        if body is None:
            raise ApiFailure("vast.ai answered %s with something that is not JSON" % what, status)
        if isinstance(body, dict) and body.get("success") is False:
            raise ApiFailure("vast.ai refused %s: %s" % (what, message or "success: false"), status)
        return body


def read_api_key(environ=os.environ):
    """(key, where it was read from), as the official CLI finds it; VastError when there is none."""
    key = environ.get("VAST_API_KEY", "").strip()
    if key:
        return key, "VAST_API_KEY"
    home = environ.get("HOME") or os.path.expanduser("~")
    for name in KEY_FILES:
        path = os.path.join(home, name[len("~/"):])
        try:
            with open(path) as f:
                key = f.read().strip()
        except OSError:
            continue
        if key:
            return key, path
    raise VastError("no vast.ai API key: create one at https://cloud.vast.ai/manage-keys/, then set VAST_API_KEY "
                    "or run `vastai set api-key KEY` (it writes ~/.config/vastai/vast_api_key)")


###############################################################################
# VastProvider
###############################################################################

# vast's instance states (actual_status, intended_status) mapped onto Instance.state.
_RUNNING, _STOPPED = "running", "stopped"


def _vast_state(row):
    actual = (row.get("actual_status") or "").lower()
    intended = (row.get("intended_status") or row.get("next_state") or "").lower()
    if actual == "running" and intended != "stopped":
        return "running"
    if intended == "stopped" or actual in ("exited", "stopped", "offline") and intended != "running":
        return "stopped"
    if actual == "scheduling" or "schedul" in (row.get("status_msg") or "").lower():
        return "scheduling"
    return "starting"


def _ssh_address(row):
    """Direct SSH (public_ipaddr and the host port mapped to 22/tcp), else vast's SSH proxy."""
    ports = row.get("ports") or {}
    mapped = ports.get("22/tcp") if isinstance(ports, dict) else None
    if mapped and row.get("public_ipaddr"):
        try:
            return row["public_ipaddr"].strip(), int(mapped[0]["HostPort"])
        except (KeyError, IndexError, TypeError, ValueError):
            pass
    if row.get("ssh_host") and row.get("ssh_port"):
        return row["ssh_host"], int(row["ssh_port"])
    return None, None


class VastProvider(Provider):
    """vast.ai over the REST calls the official CLI makes (vastai/api/*.py):
    search POST /bundles/, create PUT /asks/{id}/, list GET /api/v1/instances/ (paged by
    next_token), show GET /instances/{id}/?owner=me, start/stop PUT /instances/{id}/ {"state"},
    destroy DELETE /instances/{id}/, credit GET /users/current, SSH keys GET/POST /ssh/."""

    name = "vast.ai"

    def __init__(self, api, instance_id=None):
        self.api = api
        self.instance_id = instance_id  # set inside the box, for self_stop

    @classmethod
    def from_environment(cls, environ=os.environ, timeout=30.0):
        key, source = read_api_key(environ)
        return cls(VastApi(key, source, environ.get("VAST_URL") or DEFAULT_URL, timeout))

    def search(self, query):
        body = self.api.call("POST", "/bundles/", body=query.vast_query())
        offers = [self.offer(row) for row in body.get("offers", [])]
        return query.rank(offers)

    @staticmethod
    def offer(row):
        return Offer(row.get("id") or row.get("ask_contract_id"), row.get("gpu_name", "?"),
                     int(row.get("num_gpus") or 1), float(row.get("dph_total") or 0),
                     row.get("geolocation") or "", float(row.get("reliability") or row.get("reliability2") or 0),
                     float(row.get("cuda_max_good") or 0), float(row.get("disk_space") or 0))

    def create(self, offer, label, image, disk_gb, on_start, env):
        body = {"client_id": "me", "image": image, "env": env, "price": None, "disk": disk_gb,
                "label": label, "extra": None, "onstart": on_start, "image_login": None,
                "python_utf8": False, "lang_utf8": False, "use_jupyter_lab": False, "jupyter_dir": None,
                "force": False, "cancel_unavail": True, "template_hash_id": None, "user": None,
                "runtype": "ssh_direc ssh_proxy"}
        answer = self.api.call("PUT", "/asks/%s/" % offer.id, body=body)
        if not answer.get("new_contract"):
            raise ApiFailure("vast.ai accepted the rental but named no instance: run --vast --status")
        return answer["new_contract"]

    def instance(self, row):
        ssh_host, ssh_port = _ssh_address(row)
        gpus = int(row.get("num_gpus") or 1)
        gpu = row.get("gpu_name") or "?"
        return Instance(row.get("id"), row.get("label"), _vast_state(row), "%dx %s" % (gpus, gpu) if gpus > 1 else gpu,
                        float(row.get("dph_total") or 0), row.get("start_date"), ssh_host, ssh_port,
                        (row.get("status_msg") or "").strip())

    def show(self, instance_id):
        try:
            row = self.api.call("GET", "/instances/%s/" % instance_id, {"owner": "me"}).get("instances")
        except NotFound:
            return None
        return self.instance(row) if row else None

    def list_by_label(self, label):
        query = {"select_filters": {"label": {"in": [label]}}, "order_by": [{"col": "id", "dir": "asc"}],
                 "limit": 25}
        found = []
        while True:
            page = self.api.call("GET", "/api/v1/instances/", query)
            found += [self.instance(row) for row in page.get("instances") or [] if row.get("label") == label]
            if not page.get("next_token"):
                return found
            query["after_token"] = page["next_token"]

    def start(self, instance_id):
        self.api.call("PUT", "/instances/%s/" % instance_id, body={"state": "running"})

    def stop(self, instance_id):
        self.api.call("PUT", "/instances/%s/" % instance_id, body={"state": "stopped"})

    def destroy(self, instance_id):
        try:
            self.api.call("DELETE", "/instances/%s/" % instance_id, body={})
        except NotFound:
            pass  # already gone: what was asked for

    def credit(self):
        user = self.api.call("GET", "/users/current")
        return float(user.get("credit") or 0)

    def register_ssh_key(self, public_key):
        listed = self.api.call("GET", "/ssh/")
        keys = listed.get("ssh_keys", []) if isinstance(listed, dict) else listed
        wanted = public_key.split()[:2]
        for key in keys or []:
            text = (key.get("public_key") or key.get("ssh_key") or "") if isinstance(key, dict) else str(key)
            if text.split()[:2] == wanted:
                return False
        self.api.call("POST", "/ssh/", body={"ssh_key": public_key.strip()})
        return True

    def self_stop(self, action):
        if action == "destroy":
            self.destroy(self.instance_id)
        else:
            self.stop(self.instance_id)


PROVIDERS = {"vast": VastProvider}


###############################################################################
# Offer choice
###############################################################################

class OfferQuery:
    """What to rent. The price is vast's dph_total for `disk_gb` of storage (allocated_storage),
    so the hourly figure includes the disk the rental keeps."""

    def __init__(self, gpus=(), max_price=None, disk_gb=DEFAULT_DISK_GB, verified=True, on_demand=True,
                 min_reliability=0.98, direct_ssh=True, min_cuda=12.0):
        self.gpus = [g.strip() for g in gpus if g.strip()]
        self.max_price, self.disk_gb = max_price, disk_gb
        self.verified, self.on_demand = verified, on_demand
        self.min_reliability, self.direct_ssh, self.min_cuda = min_reliability, direct_ssh, min_cuda

    def vast_query(self):
        q = {"verified": {"eq": self.verified}, "external": {"eq": False}, "rentable": {"eq": True},
             "rented": {"eq": False}, "reliability": {"gte": self.min_reliability},
             "cuda_max_good": {"gte": self.min_cuda}, "disk_space": {"gte": self.disk_gb}}
        if self.direct_ssh:
            q["direct_port_count"] = {"gte": 1}
        if self.gpus:
            q["gpu_name"] = {"in": self.gpus}
        if self.max_price is not None:
            q["dph_total"] = {"lte": self.max_price}
        q["order"] = [["dph_total", "asc"]]
        q["type"] = "on-demand" if self.on_demand else "bid"
        q["allocated_storage"] = self.disk_gb
        q["limit"] = 64
        return q

    def rank(self, offers):
        """The server filters too; this is the laptop's own check of what it is about to pay."""
        fits = [o for o in offers if (not self.gpus or o.gpu in self.gpus)
                and (self.max_price is None or o.dollars_per_hour <= self.max_price)
                and o.reliability >= self.min_reliability and o.cuda >= self.min_cuda
                and o.disk_space >= self.disk_gb]
        return sorted(fits, key=lambda o: (o.dollars_per_hour, -o.reliability))

    def loosened(self, **changes):
        wider = OfferQuery()
        wider.__dict__.update(self.__dict__)
        wider.__dict__.update(changes)
        return wider

    def why_nothing(self, provider):
        """Which filter to loosen, found by asking again without it."""
        if self.max_price is not None:
            found = provider.search(self.loosened(max_price=None))
            if found:
                return ("no offer at or under $%.3f/h: the cheapest that fits otherwise is %s; raise --max-price"
                        % (self.max_price, found[0].describe()))
        if self.gpus:
            found = provider.search(self.loosened(gpus=(), max_price=None))
            if found:
                names = sorted({o.gpu for o in found})[:6]
                return ("no %s is offered with these filters: try --gpu with one of %s"
                        % (" or ".join(self.gpus), ", ".join(names)))
        return ("no offer has %d GB of disk, reliability >= %.2f, CUDA >= %g and direct SSH: try a smaller --disk"
                % (self.disk_gb, self.min_reliability, self.min_cuda))


###############################################################################
# Laptop side: find ours, rent, resume, wait; status, stop, destroy
###############################################################################

def ssh_public_key(home=None):
    """(private key path, public key text) of the laptop's first ssh key."""
    folder = os.path.join(home or os.path.expanduser("~"), ".ssh")
    for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
        path = os.path.join(folder, name)
        if os.path.exists(path) and os.path.exists(path + ".pub"):
            with open(path + ".pub") as f:
                return path, f.read().strip()
    raise VastError("no SSH key in %s: create one with `ssh-keygen -t ed25519`" % folder)


class SshTarget:
    """Where the launcher's SSH connection goes: user@host:port, checked against a known_hosts file
    of this instance alone (its host key and port change when it restarts)."""

    def __init__(self, host, port, identity, known_hosts, user="root"):
        self.host, self.port, self.identity, self.known_hosts, self.user = host, port, identity, known_hosts, user

    @property
    def destination(self):
        return "%s@%s" % (self.user, self.host)

    def options(self):
        return ["-p", str(self.port), "-i", self.identity, "-o", "IdentitiesOnly=yes",
                "-o", "UserKnownHostsFile=" + self.known_hosts, "-o", "StrictHostKeyChecking=accept-new",
                "-o", "BatchMode=yes"]

    def command(self, *remote, connect_timeout=10):
        return ["ssh", *self.options(), "-o", "ConnectTimeout=%d" % connect_timeout, "--", self.destination,
                *remote]


class Rental:
    """The laptop's side of one run: find our instance by label (running: use it; stopped: start
    it; none: rent the cheapest offer that fits), wait until SSH answers, and at the end say what
    it cost and what keeps billing.

    Parts: acquire() -> SshTarget (reuse, resume, rent, wait_usable), watchdog_settings(),
    summary(); status_lines() (with idle_of(), over target_of()), stop_all(), destroy_all() for
    --vast --status/--stop/--destroy."""

    def __init__(self, provider, label=DEFAULT_LABEL, query=None, image=DEFAULT_IMAGE,
                 boot_timeout=DEFAULT_BOOT_TIMEOUT, poll=3.0, auth_retry=60.0, state_dir=None, say=None,
                 vast_url=DEFAULT_URL, home=None):
        self.provider, self.label, self.query, self.image = provider, label, query or OfferQuery(), image
        self.boot_timeout, self.poll, self.auth_retry = boot_timeout, poll, auth_retry
        self.state_dir = state_dir or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "simple_api_proxy", "vast")
        self.say = say or (lambda text: sys.stderr.write("claude_start: " + text + "\n"))
        self.vast_url = vast_url
        self.home = home  # whose ~/.ssh key is registered and used (default: $HOME)
        self.instance = None
        self.rented_now = False
        self.started_at = None
        self.credit_at_start = None

    # -- acquire -----------------------------------------------------------
    def acquire(self):
        identity, public_key = ssh_public_key(self.home)
        self.credit_at_start = self.provider.credit()
        ours = self.provider.list_by_label(self.label)
        running = [i for i in ours if i.state in ("running", "starting")]
        stopped = [i for i in ours if i.state in ("stopped", "scheduling")]
        if running:
            self.instance = running[-1]
            fresh_host_key = self.instance.state == "starting"
            self.say("using %s instance %s (%s, %s/h), up %s"
                     % (self.instance.state, self.instance.id, self.instance.gpu,
                        show_money(self.instance.dollars_per_hour), show_duration(self.instance.uptime)))
            if len(ours) > 1:
                self.say("note: %d instances carry the label %s: see --vast --status" % (len(ours), self.label))
        elif stopped:
            fresh_host_key = True
            self.instance = stopped[-1]
            self.say("starting stopped instance %s (%s, %s/h)"
                     % (self.instance.id, self.instance.gpu, show_money(self.instance.dollars_per_hour)))
            self.provider.start(self.instance.id)
        else:
            fresh_host_key = True
            self.rent(public_key)
        self.say("credit: %s; this box costs %s/h" % (show_money(self.credit_at_start),
                                                       show_money(self.instance.dollars_per_hour)))
        known_hosts = os.path.join(self.state_dir, "known_hosts-%s" % self.instance.id)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        if fresh_host_key and os.path.exists(known_hosts):
            os.remove(known_hosts)  # a (re)started container has a new host key, often on a new port
        try:
            target = self.wait_usable(identity, known_hosts)
        except BootFailed:
            if self.rented_now:
                self.say("destroying instance %s, rented by this run, so that nothing keeps billing"
                         % self.instance.id)
                self.provider.destroy(self.instance.id)
                self.rented_now = False  # nothing of this run's is left to abandon
            raise
        self.started_at = time.time()
        return target

    def rent(self, public_key):
        offers = self.provider.search(self.query)
        if not offers:
            raise NoOffer(self.query.why_nothing(self.provider) + ". Nothing was rented.")
        offer = offers[0]
        if self.credit_at_start < offer.dollars_per_hour:
            raise OutOfCredit("your vast.ai credit is %s, less than an hour of %s: add credit at %s. Nothing was "
                              "rented." % (show_money(self.credit_at_start), offer.describe(), BILLING_URL))
        self.say("renting %s" % offer.describe())
        if self.provider.register_ssh_key(public_key):
            self.say("registered this laptop's SSH key with the vast.ai account")
        env = {"OLLAMA_HOST": "127.0.0.1:11434", "VAST_URL": self.vast_url}
        self.rented_now = True  # from the moment the create is sent: it may have acted whatever happens next
        try:
            instance_id = self.provider.create(offer, self.label, self.image, self.query.disk_gb, ON_START, env)
        except Unreachable:
            # The rental may have happened: never send it again, look for it by its label.
            self.say("no answer to the rental; looking for it by its label instead of renting again")
            ours = self.provider.list_by_label(self.label)
            if not ours:
                raise VastError("vast.ai did not answer the rental and no instance labelled %s exists: nothing was "
                                "rented; run the launcher again" % self.label) from None
            instance_id = ours[-1].id
        self.instance = self.provider.show(instance_id) or Instance(
            instance_id, self.label, "starting", offer.gpu, offer.dollars_per_hour, None, None, None)
        self.say("rented instance %s" % instance_id)

    def abandon(self):
        """Destroy what this run rented before it was usable (the run is ending); the ids destroyed.
        When the create's answer never came, the rental is found by its label (there was none
        before, or this run would not have rented)."""
        if self.instance is not None:
            doomed = [self.instance.id]
        else:
            doomed = [instance.id for instance in self.provider.list_by_label(self.label)]
        for instance_id in doomed:
            self.provider.destroy(instance_id)
        return doomed

    def wait_usable(self, identity, known_hosts):
        """Until the instance runs and SSH logs in, with progress; BootFailed after boot_timeout."""
        deadline = time.monotonic() + self.boot_timeout
        began = time.monotonic()
        last_said = None
        python_said = False
        auth_since = None
        while True:
            instance = self.provider.show(self.instance.id)
            if instance is None:
                raise BootFailed("instance %s disappeared while starting (vast.ai cancelled it): run the "
                                 "launcher again to rent another" % self.instance.id)
            self.instance = instance
            news = (instance.state, instance.detail)
            if news != last_said:
                self.say("instance %s: %s%s (%s)" % (instance.id, instance.state,
                                                   ", " + instance.detail if instance.detail else "",
                                                   show_duration(time.monotonic() - began)))
                last_said = news
            if instance.state == "running" and instance.ssh_host:
                target = SshTarget(instance.ssh_host, instance.ssh_port, identity, known_hosts)
                answer = self.ssh_answers(target)
                if answer is True:
                    self.say("SSH answers at %s:%s (%s)" % (target.host, target.port,
                                                          show_duration(time.monotonic() - began)))
                    return target
                if answer == "python3" and not python_said:
                    self.say("instance %s: waiting for its on-start script to install python3" % instance.id)
                    python_said = True
                if answer == "auth":
                    auth_since = auth_since or time.monotonic()
                    if time.monotonic() - auth_since > self.auth_retry:
                        raise BootFailed("instance %s refuses this laptop's SSH key: the key reaches only instances "
                                         "created after it was registered; destroy this one (--vast --destroy)"
                                         % instance.id)
            if time.monotonic() > deadline:
                if instance.state == "scheduling" and not self.rented_now:
                    raise BootFailed(
                        "instance %s still waits for its GPU after %s (someone else rents it): keep waiting, or "
                        "destroy it and rent another: claude_start.sh --vast --destroy --yes && claude_start.sh --vast"
                        % (instance.id, show_duration(self.boot_timeout)))
                raise BootFailed("instance %s was not usable within %s (--boot-timeout)"
                                 % (instance.id, show_duration(self.boot_timeout)))
            time.sleep(self.poll)

    @staticmethod
    def ssh_answers(target):
        """True once a login works and python3 is there (an image without it gets it from the
        on-start script); "python3" while it is not; "auth" while the key is refused; False while
        nothing answers."""
        try:
            with socket.create_connection((target.host, target.port), timeout=5):
                pass
        except OSError:
            return False
        try:
            done = subprocess.run(target.command("command -v python3 >/dev/null 2>&1 || exit 3", connect_timeout=5),
                                  stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
        except subprocess.TimeoutExpired:
            return False
        if done.returncode == 0:
            return True
        if done.returncode == 3:
            return "python3"
        return "auth" if b"Permission denied" in done.stderr else False

    # -- the box's watchdog --------------------------------------------------
    def watchdog_settings(self, idle_stop, idle_action, proxy_port, tick=30.0):
        return {"provider": "vast", "vast_url": self.vast_url, "idle_stop": idle_stop, "idle_action": idle_action,
                "proxy_port": proxy_port, "tick": tick}

    # -- the end of a session -------------------------------------------------
    def summary(self, on_exit, idle_stop):
        """The lines said at exit: duration, cost, credit left, and what keeps billing until when."""
        elapsed = time.time() - (self.started_at or time.time())
        lines = ["session %s, about %s on instance %s at %s/h"
                 % (show_duration(elapsed), show_money(elapsed / 3600 * self.instance.dollars_per_hour),
                    self.instance.id, show_money(self.instance.dollars_per_hour))]
        if on_exit == "destroy":
            self.provider.destroy(self.instance.id)
            lines.append("instance %s destroyed: nothing of it bills any more" % self.instance.id)
        elif on_exit == "stop":
            self.provider.stop(self.instance.id)
            lines.append("instance %s stopped: its disk still bills a little; --vast --destroy ends that"
                         % self.instance.id)
        elif idle_stop:
            at = time.strftime("%H:%M", time.localtime(time.time() + idle_stop))
            lines.append("instance %s keeps running and billing %s/h until it stops itself after %s idle "
                         "(at %s if unused); --vast --stop stops it now"
                         % (self.instance.id, show_money(self.instance.dollars_per_hour), show_duration(idle_stop), at))
        else:
            lines.append("instance %s keeps running and billing %s/h (idle stop is off): --vast --stop stops it"
                         % (self.instance.id, show_money(self.instance.dollars_per_hour)))
        try:
            lines.append("credit left: %s" % show_money(self.provider.credit()))
        except VastError as error:
            lines.append("credit left: unknown (%s)" % error)
        return lines

    # -- management -----------------------------------------------------------
    def target_of(self, instance):
        identity, _ = ssh_public_key(self.home)
        return SshTarget(instance.ssh_host, instance.ssh_port, identity,
                         os.path.join(self.state_dir, "known_hosts-%s" % instance.id))

    def idle_of(self, instance):
        """The box's own view of its idleness (over SSH, 20 s at most), as text; None if it does not say."""
        if not instance.ssh_host:
            return None
        try:
            done = subprocess.run(self.target_of(instance).command(
                "python3 ~/%s/claude_vast.py idle" % BOX_FOLDER, connect_timeout=10),
                stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
            report = json.loads(done.stdout.decode().strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError, OSError):
            return None
        idle = ("idle %s" % show_duration(report["idle_s"]) if report.get("idle_s") is not None
                else "proxy not answering")
        attached = ", %d launcher(s) attached" % report["attached"] if report.get("attached") else ""
        return idle + attached

    def status_lines(self, idle_of=None):
        """--vast --status: our instances and the account's credit. idle_of(instance) -> text or None."""
        ours = self.provider.list_by_label(self.label)
        lines = ["credit: %s" % show_money(self.provider.credit())]
        if not ours:
            lines.append("no instance labelled %s: nothing bills" % self.label)
        for instance in ours:
            running = instance.state in ("running", "starting")
            idle = idle_of(instance) if idle_of and instance.state == "running" else None
            line = "instance %s  %-10s %-14s %s/h" % (instance.id, instance.state, instance.gpu,
                                                     show_money(instance.dollars_per_hour))
            if running:
                line += "  up %s  cost so far ~%s" % (show_duration(instance.uptime),
                                                      show_money(instance.uptime / 3600 * instance.dollars_per_hour))
            lines.append(line + ("  " + idle if idle else ""))
        return lines

    def stop_all(self):
        stopped = []
        for instance in self.provider.list_by_label(self.label):
            if instance.state != "stopped":
                self.provider.stop(instance.id)
                stopped.append(instance.id)
        return stopped

    def destroy_all(self, confirm):
        """confirm(instance) -> bool, asked for each one."""
        destroyed = []
        for instance in self.provider.list_by_label(self.label):
            if confirm(instance):
                self.provider.destroy(instance.id)
                destroyed.append(instance.id)
        return destroyed


###############################################################################
# Box side: the on-start script, the idle watchdog, the launcher's attachment
###############################################################################

# vast.ai runs this (the create's "onstart") at every container start, as root, with the container's
# environment (CONTAINER_ID, CONTAINER_API_KEY, VAST_URL). Safe to run twice: each part is idempotent.
ON_START = r"""#!/bin/sh
# simple_api_proxy on-start (claude_start.sh --vast): runs at every container start.
touch /root/.no_auto_tmux
d=/root/.simple_api_proxy
mkdir -p "$d" && chmod 700 "$d"
umask 077
{ echo "CONTAINER_ID=$CONTAINER_ID"; echo "CONTAINER_API_KEY=$CONTAINER_API_KEY"
  echo "VAST_URL=${VAST_URL:-https://console.vast.ai}"; } > "$d/instance.env.part"
mv "$d/instance.env.part" "$d/instance.env"
command -v python3 >/dev/null 2>&1 ||
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3; } >>"$d/onstart.log" 2>&1
cd "$d" || exit 0
[ -f deploy.json ] && for b in claude_box.py box.py; do
  [ -f "$b" ] && { nohup python3 "$b" up >>onstart.log 2>&1 </dev/null & break; }
done
[ -f claude_vast.py ] && nohup python3 claude_vast.py watchdog >>onstart.log 2>&1 </dev/null &
exit 0
"""

WATCHDOG_SETTINGS = "watchdog.json"
WATCHDOG_LOG = "watchdog.log"
WATCHDOG_LOCK = "watchdog.lock"
INSTANCE_ENV = "instance.env"
ATTACHED = "attached"  # one file per attached launcher, touched at each heartbeat
ARRIVAL_GRACE = 120  # seconds a launcher that armed the watchdog has to attach


def box_folder():
    return os.path.join(os.path.expanduser("~"), BOX_FOLDER)


def read_env_file(path):
    values = {}
    try:
        with open(path) as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep:
                    values[key] = value
    except OSError:
        pass
    return values


class Watchdog:
    """Stops (or destroys) the instance from inside when, for idle_stop seconds, no request reached
    the proxy and no launcher was attached. Its inputs: the proxy's /health (idle_s: seconds since
    the last request; in_flight), the attached/ heartbeat files, and its own start (a container that
    just booted is not idle yet). GPU use is not one: Ollama sits near 0% between requests.

    Settings are re-read at every tick from watchdog.json (the launcher rewrites them); the instance
    id and key from instance.env (the on-start script writes them from the container's environment)."""

    def __init__(self, folder=None, clock=time.time):
        self.folder = folder or box_folder()
        self.clock = clock
        self.born = clock()
        self.acted = False

    def path(self, name):
        return os.path.join(self.folder, name)

    def settings(self):
        try:
            with open(self.path(WATCHDOG_SETTINGS)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def proxy_key(self):
        """The key the deployed proxy checks: the user's PROXY_API_KEY in proxy.json, else the one
        the deploy generated (proxy.key); proxy.env of launchers before 1.1."""
        try:
            with open(self.path("proxy.json")) as f:
                key = json.load(f).get("PROXY_API_KEY")
            if key:
                return key
        except (OSError, ValueError, AttributeError):
            pass
        try:
            with open(self.path("proxy.key")) as f:
                key = f.read().strip()
            if key:
                return key
        except OSError:
            pass
        return read_env_file(self.path("proxy.env")).get("PROXY_API_KEY")

    def proxy_activity(self, port):
        """(seconds since the last request, requests in flight), or None when the proxy does not answer."""
        if not port:
            return None
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request("http://127.0.0.1:%d/health" % int(port))
        key = self.proxy_key()
        if key:  # without it /health says only whether it works
            request.add_header("x-api-key", key)
        try:
            with opener.open(request, timeout=5) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:  # 503 "degraded" still reports its idle time
            try:
                body = json.loads(error.read())
            except ValueError:
                return None
        except (OSError, ValueError):
            return None
        if not isinstance(body, dict) or "idle_s" not in body:
            return None
        return float(body["idle_s"]), int(body.get("in_flight") or 0)

    def heartbeats(self, now=None):
        """Last heartbeat times of launchers; given `now`, only of those attached now (a heartbeat
        older than its grace is a launcher gone without saying so: a laptop put to sleep)."""
        beats = []
        folder = self.path(ATTACHED)
        for name in os.listdir(folder) if os.path.isdir(folder) else ():
            path = os.path.join(folder, name)
            try:
                beat = os.stat(path).st_mtime
                with open(path) as f:
                    grace = float(f.read().strip() or 0)
            except (OSError, ValueError):
                continue
            if now is None or now - beat <= grace:
                beats.append(beat)
        return beats

    def decide(self):
        """One look: ("keep"|"off"|"act", why). Acting is left to tick()."""
        settings = self.settings()
        idle_stop = settings.get("idle_stop")
        if not idle_stop:
            return "off", "idle stop is off"
        now = self.clock()
        if self.heartbeats(now):
            return "keep", "a launcher is attached"
        activity = self.proxy_activity(settings.get("proxy_port"))
        last = self.born
        if activity is not None:
            idle_s, in_flight = activity
            if in_flight:
                return "keep", "%d request(s) in flight" % in_flight
            last = max(last, now - idle_s)
        last = max([last] + self.heartbeats())
        idle = now - last
        source = "no proxy answers" if activity is None else "proxy idle"
        if idle >= float(idle_stop):
            return "act", "idle %s (%s), no launcher attached: %s the instance" % (
                show_duration(idle), source, settings.get("idle_action") or "stop")
        return "keep", "idle %s of %s (%s), no launcher attached" % (show_duration(idle), show_duration(idle_stop),
                                                                    source)

    def tick(self):
        kind, why = self.decide()
        log.info("%s: %s", kind, why)
        if kind != "act" or self.acted:
            return kind
        settings = self.settings()
        creds = read_env_file(self.path(INSTANCE_ENV))
        if not creds.get("CONTAINER_ID") or not creds.get("CONTAINER_API_KEY"):
            log.error("cannot stop: %s lacks CONTAINER_ID/CONTAINER_API_KEY (the on-start script writes them)",
                      self.path(INSTANCE_ENV))
            return kind
        url = settings.get("vast_url") or creds.get("VAST_URL") or DEFAULT_URL
        provider = PROVIDERS[settings.get("provider") or "vast"](
            VastApi(creds["CONTAINER_API_KEY"], "the instance's CONTAINER_API_KEY", url, timeout=30),
            instance_id=creds["CONTAINER_ID"])
        action = settings.get("idle_action") or "stop"
        # Said first: a stop that works ends this process with the container.
        log.info("asking vast.ai to %s instance %s with its own key", action, creds["CONTAINER_ID"])
        try:
            provider.self_stop(action)
        except VastError as error:
            log.error("%s of instance %s failed, trying again next tick: %s", action, creds["CONTAINER_ID"], error)
            return kind
        self.acted = True
        log.info("vast.ai accepted the %s", action)
        return kind

    def run(self):
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        lock = open(self.path(WATCHDOG_LOCK), "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info("another watchdog already runs here")
            return 0
        with open(self.path(WATCHDOG_LOCK) + ".pid", "w") as f:
            f.write(str(os.getpid()))
        log.info("watchdog started (pid %d)", os.getpid())
        while True:
            try:
                self.tick()
            except Exception:  # a watchdog that dies leaves the box billing: log it and look again
                log.exception("watchdog tick failed")
            time.sleep(float(self.settings().get("tick") or 30))


def _heartbeat(path, grace):
    """A heartbeat file: its mtime is the beat, its text how long the beat means "attached"."""
    with open(path + ".part", "w") as f:
        f.write(str(grace))
    os.replace(path + ".part", path)


def attach(interval, folder=None):
    """The launcher's presence on the box: a file in attached/ touched at each line the launcher
    sends (its heartbeat). When the connection ends the file stays, marked detached (grace 0):
    its time is the launcher's last activity, from which the idle time counts. It takes over from
    the file arm_watchdog left for the launcher's arrival."""
    folder = os.path.join(folder or box_folder(), ATTACHED)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, "%d" % os.getpid())
    _heartbeat(path, 3 * interval + 5)
    for name in os.listdir(folder):  # the arrival's file, and older sessions' detached ones
        if name != os.path.basename(path) and not name.endswith(".part"):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass
    sys.stdout.write("attached\n")
    sys.stdout.flush()
    try:
        for _ in sys.stdin:
            os.utime(path)
    finally:
        _heartbeat(path, 0)
    return 0


class Attachment:
    """The laptop's end of `attach`: one SSH session to the box sending a line every `interval`
    seconds, reopened if it drops, closed (the box forgets us) by close()."""

    def __init__(self, ssh_command, interval=15.0):
        self.ssh_command, self.interval = ssh_command, interval
        self.closing = threading.Event()
        self.attached = threading.Event()
        self.process = None
        self.thread = threading.Thread(target=self.keep, name="vast-attach", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def keep(self):
        remote = "python3 ~/%s/claude_vast.py attach --interval %s" % (BOX_FOLDER, self.interval)
        while not self.closing.is_set():
            self.process = subprocess.Popen(self.ssh_command(remote), stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            if self.process.stdout.readline().strip() == b"attached":
                self.attached.set()
            while self.process.poll() is None and not self.closing.wait(self.interval):
                try:
                    self.process.stdin.write(b"\n")
                    self.process.stdin.flush()
                except OSError:
                    break
            if not self.closing.is_set():
                self.closing.wait(min(self.interval, 5))

    def close(self):
        self.closing.set()
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.thread.join(timeout=15)


def arm_watchdog(ssh_command, settings, timeout=60, arrival_grace=ARRIVAL_GRACE):
    """From the laptop: put this file and watchdog.json (`settings`) on the box and make sure the
    watchdog runs (one that runs already keeps going and reads the new settings at its next tick).
    ssh_command(remote) -> argv. VastError when the box does not do it."""
    with open(os.path.abspath(__file__), "rb") as f:
        source = f.read()
    data = json.dumps(settings).encode()
    # The launcher counts as attached from now (for arrival_grace seconds, until its attach takes
    # over), so that the watchdog never stops the box between its start and the launcher's heartbeat.
    remote = ("umask 077 && mkdir -p ~/{folder}/{attached} && cd ~/{folder} && head -c {n} > claude_vast.py.part && "
              "mv claude_vast.py.part claude_vast.py && cat > {settings}.part && mv {settings}.part {settings} && "
              "echo {grace} > {attached}/arrival && "
              "(nohup python3 claude_vast.py watchdog >/dev/null 2>&1 </dev/null &) && echo armed").format(
                  folder=BOX_FOLDER, attached=ATTACHED, n=len(source), settings=WATCHDOG_SETTINGS, grace=arrival_grace)
    try:
        done = subprocess.run(ssh_command(remote), input=source + data, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise VastError("the box did not start its idle watchdog within %ds" % timeout) from None
    if done.stdout.strip() != b"armed":
        raise VastError("the box did not start its idle watchdog: %s"
                        % (done.stderr.decode("utf-8", "replace").strip() or "no answer"))


def idle_report(folder=None):
    """What --vast --status shows of a running box, as the watchdog sees it: the proxy's idle
    seconds (None when it does not answer), launchers attached, and the watchdog's verdict."""
    watchdog = Watchdog(folder)
    activity = watchdog.proxy_activity(watchdog.settings().get("proxy_port"))
    kind, why = watchdog.decide()
    return {"idle_s": activity[0] if activity else None, "attached": len(watchdog.heartbeats(time.time())),
            "decision": kind, "why": why}


###############################################################################
# Command line (on the box)
###############################################################################

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else ""
    if command == "watchdog":
        os.makedirs(box_folder(), mode=0o700, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(os.path.join(box_folder(), WATCHDOG_LOG),
                                                       maxBytes=1 << 20, backupCount=1)  # a line a tick, for months
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[handler])
        return Watchdog().run()
    if command == "attach":
        interval = float(argv[argv.index("--interval") + 1]) if "--interval" in argv else 15.0
        return attach(interval)
    if command == "idle":
        sys.stdout.write(json.dumps(idle_report()) + "\n")
        return 0
    sys.stderr.write("usage: claude_vast.py watchdog | attach [--interval S] | idle\n"
                     "(the box side of claude_start.sh --vast; the laptop side is claude_start.sh --vast)\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
