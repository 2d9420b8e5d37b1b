#!/usr/bin/env python3
"""Benchmark of simple_api_proxy: each scenario measured straight against a stand-in Ollama (the
floor) and through the proxy, printed as one markdown table with the targets next to the figures.

    python3 bench/run.py                         # about 2 minutes
    python3 bench/run.py --smoke                 # every scenario, tiny, about 20 s
    python3 bench/run.py --only miss,stream_0ms  # some rows (key prefixes)
    python3 bench/run.py --seconds 8 --json /tmp/bench.json

It starts everything it needs and stops it again: the stand-in (standin_ollama.py), three proxy
subprocesses (memory cache; Redis tier with CACHE_MAX_ENTRIES=0 so every hit comes from Redis;
memory cache with LOG_LEVEL=INFO) and a private redis-server. The proxies run with
LOG_LEVEL=WARNING because a per-request INFO line costs time; the "INFO logging" row shows how much.
It also starts the baseline release (--baseline, default 1.0.0: its simple_api_proxy.py taken from
git into a temporary directory; without that revision in the clone, a shallow clone or a tarball,
the run leaves it out and says so), measured on the cache-hit, miss and stream rows in the same
rounds with the speed targets against it, and on the cache-hit rows a do-nothing ThreadingHTTPServer
(do_nothing_server.py), what http.server alone costs.

Floor, proxy (and baseline, do-nothing) runs of a row alternate (two rounds of half the time each)
so that drift on a shared machine hits them all. CPU per request is the serving process's utime+stime from /proc/PID/stat
over the measured part divided by its requests: the stand-in's for the floor, the proxy's (alone)
for the proxy. The floor of the cache-hit rows is the stand-in answering a small non-streamed
request from bytes it prepared, the cheapest HTTP round trip this machine offers.

Exit status: 0 when every scenario ran with no unexpected error, 1 otherwise; targets missed do
not change it (they are the findings).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import payloads
from load import Expectation, LoadResult, free_port, run_load
from payloads import (
    NUMBER,
    claude_code_request,
    messages_request,
    ollama_chat_request,
    request_factory,
)

BENCH = Path(__file__).resolve().parent
PROXY_SCRIPT = BENCH.parent / "simple_api_proxy.py"
STANDIN_SCRIPT = BENCH / "standin_ollama.py"
HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REQUEST_TIMEOUT = 30.0  # seconds before a request counts as failed
MAX_REQUESTS_PER_CONNECTION = 200_000
CLIENT_BUSY_NOTE = 0.8  # flag a run whose load generator used this share of a core or more


# --- processes -------------------------------------------------------------------


def process_cpu_clock(pid):
    """Linux's clockid for the CPU time of a whole process (clock_getcpuclockid(3) in C)."""
    return ((~pid) << 3) | 2  # CPUCLOCK_SCHED, process-wide


class Process:
    """A subprocess this run started, its CPU time and memory from /proc, and its stop."""

    def __init__(self, name, argv, log_dir, env=None, cwd=None):
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT)
        self.pid = self.popen.pid

    def cpu_seconds(self):
        """CPU time of all its threads, living and ended: utime+stime as in /proc/PID/stat, but read
        from the process's CPU-time clock, which counts nanoseconds where /proc counts 10 ms ticks."""
        try:
            return time.clock_gettime(process_cpu_clock(self.pid))
        except OSError:  # a kernel that keeps other processes' clocks to itself
            with open(f"/proc/{self.pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
            return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def rss_mb(self):
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError(f"{self.name} has no VmRSS")

    def check_alive(self):
        if self.popen.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with status {self.popen.returncode}:\n{tail}")

    def stop(self):
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


# Released versions and their commits (CHANGELOG.md): a baseline may be named either way, and a
# report names it both ways. Builds between two releases report the earlier one's version.
RELEASES = {"1.0.0": "bcac229"}
BASELINE_REVISION = "1.0.0"  # the release the speed targets are measured against


def release_label(revision):
    """'1.0.0 (bcac229)' for a release, given by version or commit; the revision itself otherwise."""
    for version, commit in RELEASES.items():
        if revision in (version, commit):
            return f"{version} ({commit})"
    return revision


class BaselineUnavailable(RuntimeError):
    pass


def materialize_baseline(revision, directory):
    """simple_api_proxy.py as it was at a git revision, written into directory; its path.
    Needs a clone with that revision in its history."""
    revision = RELEASES.get(revision, revision)
    try:
        source = subprocess.run(["git", "-C", str(BENCH.parent), "show", f"{revision}:simple_api_proxy.py"],
                                check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or str(exc).encode()
        raise BaselineUnavailable(f"cannot read simple_api_proxy.py at revision {revision} with git (a clone with "
                           f"history is needed; --no-baseline skips it): {detail.decode(errors='replace').strip()}")
    path = Path(directory) / f"simple_api_proxy_{revision}.py"
    path.write_bytes(source)
    return path


def baseline_script(revision, asked, directory):
    """(path of the baseline's simple_api_proxy.py or None, note for the report or None).
    A revision the user asked for must be there (BaselineUnavailable); the default one is left out
    with a note, so that a shallow clone or a tarball still runs every other row."""
    if revision is None:
        return None, None
    try:
        return materialize_baseline(revision, directory), None
    except BaselineUnavailable as exc:
        if asked:
            raise
        return None, f"baseline left out: {exc}"


def http_get(port, path, timeout=2.0):
    """(status, body) of one GET; raises OSError while nothing listens."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def http_post_json(port, path, value):
    connection = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        connection.request("POST", path, json.dumps(value), {"Content-Type": "application/json"})
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST {path} on port {port}: HTTP {response.status} {body[:200]!r}")
        return json.loads(body)
    finally:
        connection.close()


def wait_until_ready(process, port, path="/", want=200, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.check_alive()
        try:
            if http_get(port, path)[0] == want:
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"{process.name} did not answer GET {path} with {want} within {timeout:g} s")


def proxy_env(port, standin_port, **settings):
    """The proxy's environment: this run's settings and the basics to start Python, nothing else,
    so that no setting of the caller's (REDIS_URL, PROXY_API_KEY, ...) leaks into the measurement."""
    env = {name: value for name, value in os.environ.items()
           if name in ("PATH", "HOME", "LANG", "TMPDIR") or name.startswith(("LC_", "PYTHON", "PYENV"))}
    env.update(API_HOST=HOST, API_PORT=str(port), OLLAMA_HOST=f"{HOST}:{standin_port}", LOG_FILE="",
               LOG_LEVEL="WARNING", CACHE="on")
    env.update(settings)
    return env


def redis_available():
    """Why the Redis rows cannot run here, or None when they can."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    probe = subprocess.run([sys.executable, "-c", "import redis"], check=False, capture_output=True)
    if probe.returncode != 0:
        return "redis-py is not installed for the proxy (pip install redis)"
    return None


def start_redis(log_dir):
    port = free_port()
    process = Process("redis", ["redis-server", "--port", str(port), "--bind", HOST, "--save", "",
                                "--appendonly", "no"], log_dir)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        process.check_alive()
        try:
            with socket.create_connection((HOST, port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return process, port
        except OSError:
            time.sleep(0.01)
    raise RuntimeError("the private redis-server did not answer PING")


def start_do_nothing_server(proxy_port, log_dir, started):
    """bench/do_nothing_server.py answering with the bytes of the memory proxy's cache hit."""
    connection = http.client.HTTPConnection(HOST, proxy_port, timeout=5)
    try:
        connection.request("POST", "/v1/messages", json.dumps(messages_request("Say hello", stream=False)),
                           dict(payloads.JSON_HEADERS))
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    answer, headers = Path(log_dir) / "do_nothing_answer.json", Path(log_dir) / "do_nothing_headers.json"
    answer.write_bytes(body)
    headers.write_text(json.dumps({"Content-Type": "application/json", "x-cache": "HIT"}))
    port = free_port()
    process = started(Process("do-nothing", [sys.executable, str(BENCH / "do_nothing_server.py"), "--port",
                                             str(port), "--answer", str(answer), "--headers", str(headers)],
                              log_dir))
    wait_until_ready(process, port, "/")
    return process, port


# --- meters: bracket the measured part of a run --------------------------------------

class CpuMeter:
    def __init__(self, process):
        self.process = process
        self.seconds = 0.0

    def start(self):
        self.begin = self.process.cpu_seconds()

    def stop(self):
        self.seconds = self.process.cpu_seconds() - self.begin


class ClientCpuMeter:
    """This process's CPU: the load generator's."""

    def start(self):
        self.begin = time.process_time()

    def stop(self):
        self.seconds = time.process_time() - self.begin


class PeakRssMeter:
    """The highest VmRSS sampled every 20 ms while the run lasts."""

    def __init__(self, process):
        self.process = process
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def start(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while True:
            self.peak_mb = max(self.peak_mb, self.process.rss_mb())
            if self._stop.wait(0.02):
                return

    def stop(self):
        self._stop.set()
        self._thread.join()


class CacheHitsMeter:
    """The proxy's hit count of one cache tier, from /health, so a row can prove where its hits came from."""

    def __init__(self, port, tier):
        self.port = port
        self.tier = tier
        self.hits = 0

    def read(self):
        body = http_get(self.port, "/health")[1]
        return json.loads(body)["cache"][self.tier]["hits"]

    def start(self):
        self.begin = self.read()

    def stop(self):
        self.hits = self.read() - self.begin


# --- scenarios -------------------------------------------------------------------------

@dataclasses.dataclass
class Side:
    """One way of running a scenario: straight to the stand-in, or through a proxy."""
    port: int
    server: Process  # whose CPU is the cost of a request
    make_request: Callable[[], bytes]
    expect: Expectation
    hits_tier: str | None = None  # the proxy's cache tier every measured request must hit


@dataclasses.dataclass(frozen=True)
class Target:
    text: str
    met: Callable[[dict, dict, dict | None], bool]  # (floor, proxy, baseline figures) -> met?


@dataclasses.dataclass
class Scenario:
    key: str
    title: str
    connections: int
    reply: dict  # the stand-in's reply settings
    floor: Side
    proxy: Side
    lines: list  # (metric, Target or None): one table line each
    warmup: int = 3
    watch_rss: bool = False
    baseline: Side | None = None  # the same requests to the baseline release's proxy
    do_nothing: Side | None = None  # the same requests to a ThreadingHTTPServer that does nothing


def added(metric, limit_ms):
    return Target(f"adds ≤ {limit_ms:g} ms",
                  lambda floor, proxy, baseline: proxy[metric]["median"] - floor[metric]["median"] <= limit_ms)


def rps_share(share):
    return Target(f"≥ {share:.0%} of floor rps", lambda floor, proxy, baseline: proxy["rps"] >= share * floor["rps"])


def cpu_per_request(limit_ms):
    return Target(f"≤ {limit_ms:g} ms CPU/stream",
                  lambda floor, proxy, baseline: proxy["cpu_ms_per_request"] <= limit_ms)


def no_errors_and_p99_within(share):
    return Target(f"0 errors, p99 ≤ floor +{share:.0%}",
                  lambda floor, proxy, baseline: proxy["errors"] == 0
                  and proxy["total_ms"]["p99"] <= (1 + share) * floor["total_ms"]["p99"])


def rps_over_baseline(factor):
    return Target(f"≥ {factor:g}× baseline rps",
                  lambda floor, proxy, baseline: proxy["rps"] >= factor * baseline["rps"])


def cpu_under_baseline(share):
    return Target(f"CPU/req ≥ {share:.0%} under baseline",
                  lambda floor, proxy, baseline: proxy["cpu_ms_per_request"]
                  <= (1 - share) * baseline["cpu_ms_per_request"])


def added_under_baseline(metric, share):
    return Target(f"added ≥ {share:.0%} under baseline's",
                  lambda floor, proxy, baseline: proxy[metric]["median"] - floor[metric]["median"]
                  <= (1 - share) * (baseline[metric]["median"] - floor[metric]["median"]))


def build_scenarios(standin, standin_port, proxies, redis_reason):
    """The rows of the table, in the order they run."""
    def host(port):
        return f"{HOST}:{port}"

    def floor_side(body, expect, *, unique=False, path="/api/chat", headers=payloads.JSON_HEADERS):
        return Side(standin_port, standin, request_factory("POST", path, host(standin_port), body, headers,
                                                           unique=unique), expect)

    def proxy_side(name, body, expect, *, unique=False, path="/v1/messages", headers=payloads.JSON_HEADERS,
                   hits_tier=None):
        process, port = proxies[name]
        return Side(port, process, request_factory("POST", path, host(port), body, headers, unique=unique),
                    expect, hits_tier)

    plain = {"tokens": 100, "delay_ms": 0, "stamp": False}
    stamped = {"tokens": 100, "delay_ms": 5, "stamp": True}
    answer = Expectation(100, stream=False)
    stream = Expectation(100, stream=True)
    stream_stamped = Expectation(100, stream=True, stamped=True)
    hit = Expectation(100, stream=False, cache="HIT")
    miss = Expectation(100, stream=False, cache="MISS")
    stream_miss = Expectation(100, stream=True, cache="MISS")
    stream_miss_stamped = Expectation(100, stream=True, cache="MISS", stamped=True)
    small_floor = floor_side(ollama_chat_request("Say hello", stream=False), answer)
    unique_floor = floor_side(ollama_chat_request(f"Say hello {NUMBER}", stream=False), answer, unique=True)
    hello = messages_request("Say hello", stream=False)
    unique_hello = messages_request(f"Say hello {NUMBER}", stream=False)
    unique_stream_floor = floor_side(ollama_chat_request(f"Say hello {NUMBER}", stream=True), stream, unique=True)
    unique_stream_hello = messages_request(f"Say hello {NUMBER}", stream=True)

    def baseline_side(body, expect, **options):
        """The same requests to the baseline release's proxy, when this run has one."""
        return proxy_side("baseline", body, expect, **options) if "baseline" in proxies else None

    def with_baseline(lines, *baseline_lines):
        """lines, and those comparing with the baseline (a None target is none) when it runs."""
        if "baseline" not in proxies:
            return lines
        return lines + [line for line in baseline_lines if line[1] is not None]

    rows = []
    for connections, target, over_baseline in ((1, added("total_ms", 0.15), None),
                                               (16, rps_share(0.5), rps_over_baseline(1.3))):
        do_nothing = proxy_side("do_nothing", hello, hit) if "do_nothing" in proxies else None
        rows.append(Scenario(f"hit_memory_{connections}", "cache hit, memory tier", connections, plain,
                             small_floor, proxy_side("memory", hello, hit, hits_tier="memory"),
                             with_baseline([("total_ms", target)], ("total_ms", over_baseline)),
                             baseline=baseline_side(hello, hit), do_nothing=do_nothing))
    if redis_reason is None:
        for connections, target in ((1, added("total_ms", 0.3)), (16, rps_share(0.5))):
            rows.append(Scenario(f"hit_redis_{connections}", "cache hit, Redis tier", connections, plain,
                                 small_floor, proxy_side("redis", hello, hit, hits_tier="redis"),
                                 [("total_ms", target)]))
    for connections, target, over_baseline in ((1, added("total_ms", 1.0), None),
                                               (16, rps_share(0.2), rps_over_baseline(1.4))):
        rows.append(Scenario(f"miss_{connections}", "cache miss, 100 tokens", connections, plain, unique_floor,
                             proxy_side("memory", unique_hello, miss, unique=True),
                             with_baseline([("total_ms", target)], ("total_ms", over_baseline)),
                             baseline=baseline_side(unique_hello, miss, unique=True)))
    stream_lines = [("first_byte_ms", None), ("first_text_ms", added("first_text_ms", 1.0)),
                    ("total_ms", cpu_per_request(10.0))]
    rows.append(Scenario("stream_0ms", "stream, 100 tokens at 0 ms", 1, plain, unique_stream_floor,
                         proxy_side("memory", unique_stream_hello, stream_miss, unique=True),
                         with_baseline(stream_lines, ("first_text_ms", added_under_baseline("first_text_ms", 0.25)),
                                       ("total_ms", cpu_under_baseline(0.35))),
                         baseline=baseline_side(unique_stream_hello, stream_miss, unique=True)))
    rows.append(Scenario("stream_5ms", "stream, 100 tokens at 5 ms", 1, stamped,
                         floor_side(ollama_chat_request(f"Say hello {NUMBER}", stream=True), stream_stamped,
                                    unique=True),
                         proxy_side("memory", unique_stream_hello, stream_miss_stamped, unique=True),
                         stream_lines + [("chunk_delay_ms", added("chunk_delay_ms", 1.0))], warmup=1,
                         baseline=baseline_side(unique_stream_hello, stream_miss_stamped, unique=True)))
    claude_code = claude_code_request()
    rows.append(Scenario("claude_code_47kb", "Claude Code request, 47 KB, streamed", 1, plain,
                         floor_side(claude_code, stream, unique=True, headers=payloads.CLAUDE_CODE_HEADERS),
                         proxy_side("memory", claude_code, stream_miss, unique=True, path="/v1/messages?beta=true",
                                    headers=payloads.CLAUDE_CODE_HEADERS),
                         [("first_text_ms", added("first_text_ms", 2.0)), ("total_ms", None)]))
    rows.append(Scenario("streams_200", "200 concurrent streams at 5 ms", 200, stamped,
                         floor_side(ollama_chat_request(f"Say hello {NUMBER}", stream=True), stream_stamped,
                                    unique=True),
                         proxy_side("memory", unique_stream_hello, stream_miss_stamped, unique=True),
                         [("total_ms", no_errors_and_p99_within(0.1)), ("first_text_ms", None),
                          ("chunk_delay_ms", None)], warmup=0, watch_rss=True))
    rows.append(Scenario("hit_memory_1_info_log", "cache hit, memory tier, LOG_LEVEL=INFO", 1, plain,
                         small_floor, proxy_side("info", hello, hit, hits_tier="memory"), [("total_ms", None)]))
    return rows


def run_side(side, scenario, seconds, standin):
    """One timed run of one side; its load result and the meters' figures."""
    server_cpu, standin_cpu, client_cpu = CpuMeter(side.server), CpuMeter(standin), ClientCpuMeter()
    meters = [server_cpu, standin_cpu, client_cpu]
    rss = PeakRssMeter(side.server) if scenario.watch_rss else None
    hits = CacheHitsMeter(side.port, side.hits_tier) if side.hits_tier else None
    meters += [meter for meter in (rss, hits) if meter]
    result = asyncio.run(run_load(HOST, side.port, side.make_request, side.expect,
                                  connections=scenario.connections, seconds=seconds, warmup=scenario.warmup,
                                  max_requests=MAX_REQUESTS_PER_CONNECTION, timeout=REQUEST_TIMEOUT,
                                  meters=meters))
    if hits is not None and hits.hits < len(result.total):
        result.errors[f"{side.hits_tier} tier counted {hits.hits} hits for {len(result.total)} requests"] += 1
    return result, {"server_cpu_s": server_cpu.seconds, "standin_cpu_s": standin_cpu.seconds,
                    "client_cpu_s": client_cpu.seconds, "peak_rss_mb": rss.peak_mb if rss else None}


def measure(scenario, seconds, rounds, standin, standin_port):
    """Both sides of a scenario, alternating for `rounds` rounds; the figures of each side."""
    http_post_json(standin_port, "/bench/config", scenario.reply)
    runs = {name: [] for name in ("floor", "proxy", "baseline", "do_nothing") if getattr(scenario, name)}
    for _ in range(rounds):
        for name, side_runs in runs.items():
            side_runs.append(run_side(getattr(scenario, name), scenario, seconds / rounds, standin))
    figures = {}
    for name, side_runs in runs.items():
        result = LoadResult.merged([result for result, _ in side_runs])
        summary = result.summary()
        served = max(1, summary["requests"] + summary["errors"])
        for meter in ("server_cpu_s", "standin_cpu_s", "client_cpu_s"):
            summary[meter] = sum(meters[meter] for _, meters in side_runs)
        summary["cpu_ms_per_request"] = summary["server_cpu_s"] * 1000 / served
        summary["standin_cpu_ms_per_request"] = summary["standin_cpu_s"] * 1000 / served
        summary["client_cpu_ms_per_request"] = summary["client_cpu_s"] * 1000 / served
        summary["client_busy"] = summary["client_cpu_s"] / summary["seconds"] if summary["seconds"] else 0.0
        peaks = [meters["peak_rss_mb"] for _, meters in side_runs if meters["peak_rss_mb"] is not None]
        summary["peak_rss_mb"] = max(peaks) if peaks else None
        figures[name] = summary
    return figures


# --- several Ollama hosts, and what metrics cost -------------------------------------------

HOSTS_CONNECTIONS = 16
HOSTS_PARALLEL = 4  # generations each stand-in runs at once, as OLLAMA_NUM_PARALLEL=4 on a GPU


def measure_hosts(seconds, log_dir):
    """Throughput of one proxy in front of one stand-in Ollama and of one in front of two, 16
    clients streaming 100 tokens at 5 ms. Each stand-in generates HOSTS_PARALLEL replies at once and
    queues the rest, as a GPU does; without that limit one stand-in would serve every client at once
    and a second host could not add anything."""
    processes = []
    try:
        standin_ports = []
        for index in range(2):
            port = free_port()
            process = Process(f"standin-host{index}", [sys.executable, str(STANDIN_SCRIPT), "--port", str(port),
                                                        "--tokens", "100", "--delay-ms", "5",
                                                        "--parallel", str(HOSTS_PARALLEL)], log_dir)
            processes.append(process)
            wait_until_ready(process, port, "/api/version")
            standin_ports.append(port)
        figures = {}
        for hosts in (1, 2):
            port = free_port()
            ollama_host = ",".join(f"{HOST}:{p}" for p in standin_ports[:hosts])
            process = Process(f"proxy-{hosts}-hosts", [sys.executable, str(PROXY_SCRIPT)], log_dir,
                              env=proxy_env(port, standin_ports[0], OLLAMA_HOST=ollama_host, OLLAMA_WARMUP="off"))
            processes.append(process)
            wait_until_ready(process, port, "/health")
            make_request = request_factory("POST", "/v1/messages", f"{HOST}:{port}",
                                           messages_request(f"Say hello {NUMBER}", stream=True),
                                           payloads.JSON_HEADERS, unique=True)
            result = asyncio.run(run_load(HOST, port, make_request,
                                          Expectation(100, stream=True, cache="MISS"),
                                          connections=HOSTS_CONNECTIONS, seconds=seconds, warmup=1,
                                          max_requests=MAX_REQUESTS_PER_CONNECTION, timeout=REQUEST_TIMEOUT))
            figures[hosts] = result.summary()
        return figures
    finally:
        for process in reversed(processes):
            process.stop()


def measure_metrics_cost(process, port, scrapes=50, records=200_000):
    """The metrics' share of a request: one request recorded, timed in this process with the
    proxy's own code; and the proxy's CPU for answering one GET /metrics."""
    sys.path.insert(0, str(PROXY_SCRIPT.parent))
    import simple_api_proxy

    metrics = simple_api_proxy.Metrics(simple_api_proxy.load_config([], {}))
    began = time.perf_counter()
    for _ in range(records):
        metrics.request_done("messages", 200, "qwen2.5-coder:7b", 0.0123, 0.0042, 26, 100)
    record_us = (time.perf_counter() - began) / records * 1e6
    cpu = CpuMeter(process)
    cpu.start()
    for _ in range(scrapes):
        status, body = http_get(port, "/metrics")
        if status != 200 or b"simple_api_proxy_requests_total" not in body:
            raise RuntimeError(f"GET /metrics answered HTTP {status}")
    cpu.stop()
    return {"record_us": record_us, "scrape_cpu_ms": cpu.seconds * 1000 / scrapes}


# --- footprint ----------------------------------------------------------------------------

def time_to_ready(name, argv, port, checks, log_dir, env=None, cwd=None, timeout=10.0):
    """Seconds from spawning the process until each (path, status) check first passes, and its RSS then."""
    started = time.monotonic()
    process = Process(name, argv, log_dir, env=env, cwd=cwd)
    ready = {}
    try:
        while len(ready) < len(checks) and time.monotonic() - started < timeout:
            process.check_alive()
            for path, want in checks:
                if path in ready:
                    continue
                try:
                    if http_get(port, path)[0] == want:
                        ready[path] = time.monotonic() - started
                except OSError:
                    pass
            time.sleep(0.002)
        if len(ready) < len(checks):
            raise RuntimeError(f"{name} was not ready within {timeout:g} s: {ready}")
        return ready, process.rss_mb()
    finally:
        process.stop()


def measure_startup(standin_port, repeats, log_dir):
    """Median start-to-ready of the proxy (GET / and /health), against `python3 -m http.server`."""
    proxy_runs, floor_runs = [], []
    empty_dir = tempfile.mkdtemp(dir=log_dir)
    for attempt in range(repeats):
        port = free_port()
        proxy_runs.append(time_to_ready(f"proxy-start-{attempt}", [sys.executable, str(PROXY_SCRIPT)], port,
                                        [("/", 200), ("/health", 200)], log_dir,
                                        env=proxy_env(port, standin_port)))
        port = free_port()
        floor_runs.append(time_to_ready(f"http-server-start-{attempt}",
                                        [sys.executable, "-m", "http.server", "--bind", HOST, str(port)], port,
                                        [("/", 200)], log_dir, cwd=empty_dir))
    return {"proxy_root_s": statistics.median(ready["/"] for ready, _ in proxy_runs),
            "proxy_health_s": statistics.median(ready["/health"] for ready, _ in proxy_runs),
            "floor_root_s": statistics.median(ready["/"] for ready, _ in floor_runs),
            "floor_rss_mb": statistics.median(rss for _, rss in floor_runs)}


def warm_and_idle_rss(process, port, idle_seconds):
    """The proxy's VmRSS after a few requests of every kind and a quiet pause."""
    wait_until_ready(process, port, "/health")
    for body in (messages_request("warm up", stream=False), messages_request("warm up", stream=True),
                 claude_code_request("00000")):
        connection = http.client.HTTPConnection(HOST, port, timeout=10)
        connection.request("POST", "/v1/messages", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        connection.close()
        if response.status != 200:
            raise RuntimeError(f"warm-up request answered HTTP {response.status}")
    time.sleep(idle_seconds)
    return process.rss_mb()


# --- the table ----------------------------------------------------------------------------

METRIC_NAMES = {"total_ms": "total", "first_byte_ms": "first byte", "first_text_ms": "first text",
                "chunk_delay_ms": "chunk delay"}
COLUMNS = ("scenario", "conns", "metric", "floor median ms", "proxy median ms", "added ms", "floor p99 ms",
           "proxy p99 ms", "floor rps", "proxy rps", "proxy/floor rps", "floor CPU ms/req", "proxy CPU ms/req",
           "baseline median ms", "baseline added ms", "baseline rps", "baseline CPU ms/req", "do-nothing rps",
           "errors floor/proxy", "target", "met?")


def ms(value):
    return "—" if value is None else f"{value:.3f}"


def met_cell(met):
    return "—" if met is None else ("yes" if met else "**no**")


def latency_line(scenario, figures, metric, target):
    floor, proxy, baseline = figures["floor"], figures["proxy"], figures.get("baseline")
    floor_median, proxy_median = floor[metric]["median"], proxy[metric]["median"]
    have_both = floor_median is not None and proxy_median is not None
    met = target.met(floor, proxy, baseline) if target and have_both else (False if target else None)
    baseline_median = baseline[metric]["median"] if baseline else None
    do_nothing = figures.get("do_nothing")
    return {
        "scenario": scenario.title, "conns": str(scenario.connections), "metric": METRIC_NAMES[metric],
        "floor median ms": ms(floor_median), "proxy median ms": ms(proxy_median),
        "added ms": ms(proxy_median - floor_median) if have_both else "—",
        "floor p99 ms": ms(floor[metric]["p99"]), "proxy p99 ms": ms(proxy[metric]["p99"]),
        "floor rps": f"{floor['rps']:.0f}", "proxy rps": f"{proxy['rps']:.0f}",
        "proxy/floor rps": f"{proxy['rps'] / floor['rps']:.2f}" if floor["rps"] else "—",
        "floor CPU ms/req": ms(floor["cpu_ms_per_request"]), "proxy CPU ms/req": ms(proxy["cpu_ms_per_request"]),
        "baseline median ms": ms(baseline_median),
        "baseline added ms": ms(baseline_median - floor_median) if baseline_median is not None and have_both else "—",
        "baseline rps": f"{baseline['rps']:.0f}" if baseline else "—",
        "baseline CPU ms/req": ms(baseline["cpu_ms_per_request"]) if baseline else "—",
        "do-nothing rps": f"{do_nothing['rps']:.0f}" if do_nothing else "—",
        "errors floor/proxy": f"{floor['errors']}/{proxy['errors']}"
                              + (f" (baseline {baseline['errors']})" if baseline and baseline["errors"] else ""),
        "target": target.text if target else "", "met?": met_cell(met),
    }


def footprint_line(metric, floor, proxy, unit, target_text="", limit=None):
    line = dict.fromkeys(COLUMNS, "")
    line.update({"scenario": "footprint", "metric": metric, "target": target_text,
                 "floor median ms": "—" if floor is None else f"{floor:.3f} {unit}",
                 "proxy median ms": f"{proxy:.3f} {unit}",
                 "met?": met_cell(None if limit is None else proxy <= limit)})
    return line


def hosts_line(one, two):
    """One host is this row's floor, two hosts its proxy figure."""
    line = dict.fromkeys(COLUMNS, "")
    ratio = two["rps"] / one["rps"] if one["rps"] else 0.0
    line.update({"scenario": f"two Ollama hosts vs one, {HOSTS_PARALLEL} generations at a time each",
                 "conns": str(HOSTS_CONNECTIONS), "metric": "total",
                 "floor median ms": ms(one["total_ms"]["median"]), "proxy median ms": ms(two["total_ms"]["median"]),
                 "floor p99 ms": ms(one["total_ms"]["p99"]), "proxy p99 ms": ms(two["total_ms"]["p99"]),
                 "floor rps": f"{one['rps']:.0f}", "proxy rps": f"{two['rps']:.0f}",
                 "proxy/floor rps": f"{ratio:.2f}", "errors floor/proxy": f"{one['errors']}/{two['errors']}",
                 "target": "≈ 2× rps", "met?": met_cell(ratio >= 1.8)})
    return line


def markdown(lines):
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    out += ["| " + " | ".join(line[column] for column in COLUMNS) + " |" for line in lines]
    return "\n".join(out)


# --- main ---------------------------------------------------------------------------------------

def run(args, log_dir, baseline):
    seconds = args.seconds
    rounds = 1 if args.smoke else 2
    processes = []

    def started(process):
        processes.append(process)
        return process

    try:
        standin_port = free_port()
        standin = started(Process("standin", [sys.executable, str(STANDIN_SCRIPT), "--port", str(standin_port)],
                                  log_dir))
        wait_until_ready(standin, standin_port, "/api/version")
        redis_reason = redis_available()
        proxy_settings = {"memory": {}, "info": {"LOG_LEVEL": "INFO"}}
        if redis_reason is None:
            redis, redis_port = start_redis(log_dir)
            started(redis)
            proxy_settings["redis"] = {"REDIS_URL": f"redis://{HOST}:{redis_port}/0", "CACHE_MAX_ENTRIES": "0"}
        scripts = {name: PROXY_SCRIPT for name in proxy_settings}
        if baseline:
            proxy_settings["baseline"] = {}
            scripts["baseline"] = baseline
        proxies = {}
        for name, settings in proxy_settings.items():
            port = free_port()
            proxies[name] = (started(Process(f"proxy-{name}", [sys.executable, str(scripts[name])], log_dir,
                                             env=proxy_env(port, standin_port, **settings))), port)
        for process, port in proxies.values():
            wait_until_ready(process, port, "/health")
        proxies["do_nothing"] = start_do_nothing_server(proxies["memory"][1], log_dir, started)
        if redis_reason is None:
            redis_state = json.loads(http_get(proxies["redis"][1], "/health")[1])["cache"]["redis"]["state"]
            if redis_state != "up":
                raise RuntimeError(f"the Redis-tier proxy reports Redis {redis_state}")
        idle_rss = warm_and_idle_rss(*proxies["memory"], idle_seconds=0.2 if args.smoke else 1.0)
        metrics_cost = measure_metrics_cost(*proxies["memory"])

        results, lines, failures, notes = {}, [], [], []
        for scenario in build_scenarios(standin, standin_port, proxies, redis_reason):
            if args.only and not any(scenario.key.startswith(prefix) for prefix in args.only.split(",")):
                continue
            print(f"… {scenario.title}, {scenario.connections} conn(s)", file=sys.stderr, flush=True)
            try:
                figures = measure(scenario, seconds, rounds, standin, standin_port)
            except Exception as exc:  # one broken scenario must not hide the others' figures
                failures.append(f"{scenario.key}: {type(exc).__name__}: {exc}")
                continue
            results[scenario.key] = figures
            for side in figures:
                if figures[side]["errors"]:
                    failures.append(f"{scenario.key} {side}: {figures[side]['error_kinds']}")
                if figures[side]["requests"] == 0:
                    failures.append(f"{scenario.key} {side}: no request completed")
                if figures[side]["client_busy"] >= CLIENT_BUSY_NOTE and scenario.connections > 1:
                    notes.append(f"{scenario.title}, {scenario.connections} conns, {side}: the load generator "
                                 f"was {figures[side]['client_busy']:.0%} busy, so this rps is partly its limit")
            lines += [latency_line(scenario, figures, metric, target) for metric, target in scenario.lines]
        if redis_reason is not None:
            notes.append(f"Redis-tier rows skipped: {redis_reason}")

        print("… several hosts", file=sys.stderr, flush=True)
        hosts = measure_hosts(seconds, log_dir)
        results["hosts"] = hosts
        for count, figures in hosts.items():
            if figures["errors"] or figures["requests"] == 0:
                failures.append(f"{count} host(s): {figures['requests']} requests, {figures['error_kinds']}")
        lines.append(hosts_line(hosts[1], hosts[2]))

        print("… start-up", file=sys.stderr, flush=True)
        startup = measure_startup(standin_port, 1 if args.smoke else 3, log_dir)
        peak = results.get("streams_200", {}).get("proxy", {}).get("peak_rss_mb")
        lines.append(footprint_line("start → GET / answers", startup["floor_root_s"], startup["proxy_root_s"], "s",
                                    "≤ 0.2 s", 0.2))
        lines.append(footprint_line("start → /health 200", None, startup["proxy_health_s"], "s"))
        lines.append(footprint_line("idle RSS", startup["floor_rss_mb"], idle_rss, "MB", "≤ 30 MB", 30))
        lines.append(footprint_line("metrics: recording one request", None, metrics_cost["record_us"], "µs"))
        lines.append(footprint_line("metrics: CPU of one GET /metrics", None, metrics_cost["scrape_cpu_ms"], "ms"))
        if peak is not None:
            floor_peak = results["streams_200"]["floor"]["peak_rss_mb"]
            lines.append(footprint_line("peak RSS, 200 streams", floor_peak, peak, "MB"))
        footprint = dict(startup, proxy_idle_rss_mb=idle_rss, proxy_peak_rss_200_streams_mb=peak,
                         metrics_record_us=metrics_cost["record_us"],
                         metrics_scrape_cpu_ms=metrics_cost["scrape_cpu_ms"])
        return lines, results, footprint, failures, notes
    finally:
        for process in reversed(processes):
            process.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every scenario, tiny durations; checks it all works")
    parser.add_argument("--seconds", type=float, help="measured seconds per side of each row (default 4, smoke 0.25)")
    parser.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    parser.add_argument("--keep-logs", action="store_true", help="keep the subprocesses' logs and print where")
    parser.add_argument("--baseline", metavar="REV",
                        help=f"also measure simple_api_proxy.py of this git revision on the rows the speed targets "
                             f"compare, a version or a commit (default {release_label(BASELINE_REVISION)}, left out "
                             "with a note when the clone "
                             "lacks it; a revision given here must be there)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline release")
    parser.add_argument("--only", metavar="KEYS", help="comma list of scenario key prefixes to run (hit_memory, "
                                                       "miss, stream_0ms, ...); the footprint rows always run")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 0.25 if args.smoke else 4.0
    if not 0 < args.seconds <= 120:
        parser.error("--seconds must be > 0 and ≤ 120")
    began = time.monotonic()
    load_before = os.getloadavg()[0]  # others' load on this machine; the run's own comes after
    log_dir = tempfile.mkdtemp(prefix="simple_api_proxy_bench_")
    try:
        asked = args.baseline is not None
        revision = None if args.no_baseline else (args.baseline or BASELINE_REVISION)
        baseline, baseline_note = baseline_script(revision, asked, log_dir)
        lines, results, footprint, failures, notes = run(args, log_dir, baseline)
        if baseline_note:
            notes.append(baseline_note)
    except BaselineUnavailable as exc:
        print(f"bench/run.py: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep_logs:
            print(f"logs: {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
    wall = time.monotonic() - began

    mode = "smoke (figures too short to judge)" if args.smoke else f"{args.seconds:g} s per side per row"
    print(f"simple_api_proxy benchmark — {datetime.datetime.now():%Y-%m-%d %H:%M}, {mode}, "
          f"Python {platform.python_version()}, {os.cpu_count()} cores, load average before the run "
          f"{load_before:.2f}, proxy LOG_LEVEL=WARNING\n")
    print(markdown(lines))
    if baseline:
        print(f"\nbaseline: simple_api_proxy.py {release_label(revision)}, run the same way as the proxy "
              "(memory cache) in the same rounds. do-nothing: a ThreadingHTTPServer answering every request with "
              "the bytes of a cache hit (bench/do_nothing_server.py), what http.server alone costs.")
    print("\nfloor: the same client straight to the stand-in Ollama with the same reply settings; for cache hits "
          "its cheapest answer, a small non-streamed reply. CPU ms/req: the serving process's CPU (the stand-in "
          "for the floor, the proxy alone for the proxy). Footprint floors: `python3 -m http.server` for start-up "
          "and idle RSS, the stand-in for peak RSS. chunk delay: stand-in send to client receive, per token. "
          "Two hosts vs one: the floor columns are the proxy in front of one stand-in, the proxy columns the "
          "proxy in front of two, each stand-in generating 4 replies at once like a GPU.")
    for note in notes:
        print(f"- note: {note}")
    for failure in failures:
        print(f"- FAILED: {failure}")
    print(f"\nwall time {wall:.1f} s; {'FAILED' if failures else 'every scenario completed without errors'}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"mode": "smoke" if args.smoke else "full", "seconds_per_side": args.seconds,
                       "python": platform.python_version(), "cores": os.cpu_count(), "wall_s": wall,
                       "load_average_before": load_before,
                       "table": lines, "scenarios": results, "footprint": footprint,
                       "failures": failures, "notes": notes}, out, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
