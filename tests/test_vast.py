"""claude_start.sh --vast against a stand-in vast.ai API whose instances are real sshd boxes.

The provider (claude_vast.py) talks to tests/standins/vast_api.py over real HTTP; the rented boxes
are sshd servers in private mount namespaces on 127.0.0.1, which boot after a delay, lose their
processes when stopped, and come back on a new port with a new host key, running the on-start script.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import claude_vast
from standins.proxy import free_port
from standins.support import ROOT, STANDIN_BIN, need
from standins.vast_api import Laptop, VastStandIn, ollama_image, offer


def _mount_namespaces_work():
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def laptop(tmp_path_factory):
    need(hasattr(os, "geteuid") and os.geteuid() == 0, "the vast boxes run sshd in a mount namespace (need root)")
    for tool in ("unshare", "ssh", "ssh-keygen"):
        need(shutil.which(tool), "%s is not installed (openssh-client, util-linux)" % tool)
    need(shutil.which("sshd") or os.access("/usr/sbin/sshd", os.X_OK), "sshd is not installed (openssh-server)")
    need(_mount_namespaces_work(), "`unshare -m true` fails: the box tests need mount namespaces")
    root = tmp_path_factory.mktemp("vast-laptop")
    home = root / "home"
    (home / ".ssh").mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / ".ssh" / "id_ed25519")],
                   check=True)
    return home


@pytest.fixture
def vast(laptop, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(laptop))
    standin = VastStandIn(tmp_path / "vast", laptop / ".ssh" / "id_ed25519.pub", boot_delay=0.2,
                          offers=[offer(1, "RTX 4090", dph_base=0.40), offer(2, "RTX 3090", dph_base=0.20),
                                  offer(3, "RTX 4090", dph_base=0.30, reliability=0.90),
                                  offer(4, "RTX 4090", dph_base=0.31, cuda=11.8)])
    yield standin
    standin.close()


def provider_for(vast, key=None, source="VAST_API_KEY", timeout=10.0):
    return claude_vast.VastProvider(claude_vast.VastApi(key or vast.key, source, vast.url, timeout=timeout,
                                                        backoff=(0.05, 0.05, 0.05)))


def rental(vast, tmp_path, provider=None, said=None, **options):
    options.setdefault("poll", 0.05)
    options.setdefault("boot_timeout", 30)
    return claude_vast.Rental(provider or provider_for(vast), state_dir=str(tmp_path / "state"),
                              say=(said.append if said is not None else lambda text: None), vast_url=vast.url,
                              **options)


def ssh(target, *command, timeout=30):
    return subprocess.run(target.command(*command), capture_output=True, text=True, timeout=timeout)


def test_rent_from_nothing_picks_the_cheapest_fitting_offer_and_ssh_answers(vast, tmp_path):
    said = []
    query = claude_vast.OfferQuery(gpus=["RTX 4090"], max_price=0.50, disk_gb=40)
    target = rental(vast, tmp_path, said=said, query=query).acquire()
    assert ssh(target, "echo", "hello").stdout == "hello\n"
    # offer 3 is cheaper but unreliable, offer 4 has CUDA 11.8, offer 2 is another GPU
    (instance,) = vast.instances.values()
    assert instance["offer"] == 1 and instance["label"] == "simple_api_proxy"
    assert vast.count("PUT", r"^/api/v0/asks/") == 1
    assert any("renting RTX 4090 at $0.408/h in Sweden, SE, reliability 99.5%" in line for line in said), said
    assert any(line.startswith("credit: $25.00") for line in said), said
    laptop_key = (Path(os.environ["HOME"]) / ".ssh/id_ed25519.pub").read_text().strip()
    assert [k["ssh_key"] for k in vast.ssh_keys] == [laptop_key]
    # the key only ever travelled as a Bearer header
    assert all(vast.key not in query for _, _, query, _ in vast.requests)
    assert {whose for _, _, _, whose in vast.requests} == {"account"}


def test_the_create_body_is_the_clis_with_cancel_unavail_and_no_public_ports(vast, tmp_path):
    rental(vast, tmp_path).acquire()
    (row,) = vast.instances.values()
    assert row["image_runtype"] == "ssh_direc ssh_proxy"
    env = dict(row["extra_env"])
    assert env["OLLAMA_HOST"] == "127.0.0.1:11434" and not any(k.startswith("-p") for k in env)
    assert row["onstart"] == claude_vast.ON_START


def test_reuse_a_running_instance_and_resume_a_stopped_one_on_its_new_port(vast, tmp_path):
    first = rental(vast, tmp_path).acquire()
    said = []
    again = rental(vast, tmp_path, said=said).acquire()
    assert (again.host, again.port) == (first.host, first.port) and vast.count("PUT", r"^/api/v0/asks/") == 1
    assert any(line.startswith("using running instance") for line in said), said
    (instance_id,) = vast.instances
    provider_for(vast).stop(instance_id)
    assert ssh(first, "true").returncode != 0  # its sshd went with the stop
    said = []
    resumed = rental(vast, tmp_path, said=said).acquire()
    assert resumed.port != first.port and ssh(resumed, "true").returncode == 0  # new host key accepted
    assert any(line.startswith("starting stopped instance %d" % instance_id) for line in said), said
    assert vast.count("PUT", r"^/api/v0/asks/") == 1
    # the on-start script ran at each container start, and is safe to run twice
    home = vast.containers[instance_id].home
    assert (home / ".no_auto_tmux").exists()
    env = claude_vast.read_env_file(home / ".simple_api_proxy" / "instance.env")
    assert env["CONTAINER_ID"] == str(instance_id)
    assert env["CONTAINER_API_KEY"] == vast.instances[instance_id]["instance_api_key"]
    twice = ssh(resumed, "sh", "/root/onstart.sh", "&&", "sh", "/root/onstart.sh", "&&", "echo", "twice")
    assert twice.stdout == "twice\n"


def test_a_boot_that_never_finishes_is_destroyed(vast, tmp_path):
    for row in vast.offers.values():
        row["boots"] = False
    said = []
    with pytest.raises(claude_vast.BootFailed, match="not usable within 1s"):
        rental(vast, tmp_path, said=said, boot_timeout=1).acquire()
    assert vast.instances == {} and vast.count("DELETE", r"^/api/v0/instances/\d+/$") == 1
    assert any("destroying instance" in line and "nothing keeps billing" in line for line in said), said


def test_no_matching_offer_rents_nothing_and_names_the_filter_to_loosen(vast, tmp_path):
    cheap = claude_vast.OfferQuery(gpus=["RTX 4090"], max_price=0.10)
    with pytest.raises(claude_vast.NoOffer,
                       match=r"cheapest that fits otherwise is RTX 4090 at \$0.408/h.*raise --max-price"):
        rental(vast, tmp_path, query=cheap).acquire()
    absent = claude_vast.OfferQuery(gpus=["H100 SXM"])
    with pytest.raises(claude_vast.NoOffer, match="no H100 SXM is offered.*RTX 3090, RTX 4090"):
        rental(vast, tmp_path, query=absent).acquire()
    assert vast.count("PUT", r"^/api/v0/asks/") == 0 and vast.instances == {}


def test_out_of_credit_says_so_before_renting(vast, tmp_path):
    vast.credit = 0.05
    with pytest.raises(claude_vast.OutOfCredit,
                       match="credit is \\$0.050.*add credit at https://cloud.vast.ai/billing/"):
        rental(vast, tmp_path).acquire()
    assert vast.count("PUT", r"^/api/v0/asks/") == 0


def test_a_rejected_key_says_where_it_was_read(vast, tmp_path, monkeypatch):
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    (Path(os.environ["HOME"]) / ".config" / "vastai").mkdir(parents=True, exist_ok=True)
    key_path = Path(os.environ["HOME"]) / ".config" / "vastai" / "vast_api_key"
    key_path.write_text("not-the-key\n")
    try:
        key, source = claude_vast.read_api_key(os.environ)
        assert (key, source) == ("not-the-key", str(key_path))
        with pytest.raises(claude_vast.KeyRejected, match="rejected the API key read from %s \\(HTTP 401" % key_path):
            rental(vast, tmp_path, provider=provider_for(vast, key, source)).acquire()
    finally:
        key_path.unlink()
    assert vast.count("PUT", r"^/api/v0/asks/") == 0


def test_429_is_retried_and_success_false_is_a_failure(vast, tmp_path):
    vast.fail("GET", r"^/api/v0/users/current", "429", times=2)
    assert provider_for(vast).credit() == 25.0
    assert vast.count("GET", r"^/api/v0/users/current") == 3
    vast.fail("PUT", r"^/api/v0/asks/", "success_false")
    with pytest.raises(claude_vast.ApiFailure, match="told to refuse"):
        rental(vast, tmp_path).acquire()
    assert vast.instances == {}


def test_a_timeout_on_create_does_not_rent_twice(vast, tmp_path):
    vast.fail("PUT", r"^/api/v0/asks/", ("late", 1.5))
    said = []
    target = rental(vast, tmp_path, provider=provider_for(vast, timeout=0.5), said=said).acquire()
    assert ssh(target, "true").returncode == 0
    assert vast.count("PUT", r"^/api/v0/asks/") == 1 and len(vast.instances) == 1
    assert any("looking for it by its label instead of renting again" in line for line in said), said


def _deploy_watchdog(vast, target, instance_id, arrival_grace=0.5, **settings):
    """What the launcher leaves on the box: claude_vast.py, watchdog.json, and the watchdog running."""
    values = {"provider": "vast", "vast_url": vast.url, "idle_stop": 1.0, "idle_action": "stop",
              "proxy_port": None, "tick": 0.1}
    values.update(settings)
    claude_vast.arm_watchdog(lambda remote: target.command(remote), values, arrival_grace=arrival_grace)
    return vast.containers[instance_id].home / ".simple_api_proxy"


def test_the_watchdog_stops_an_idle_box_with_the_instance_key_and_comes_back_with_it(vast, tmp_path):
    target = rental(vast, tmp_path).acquire()
    (instance_id,) = vast.instances
    folder = _deploy_watchdog(vast, target, instance_id)
    vast.wait_for(lambda: vast.instances[instance_id]["intended_status"] == "stopped")
    stops = [whose for method, path, _, whose in vast.requests
             if method == "PUT" and path == "/api/v0/instances/%d/" % instance_id]
    assert stops == ["instance"]
    log = (folder / "watchdog.log").read_text()
    assert "act: idle" in log and "no launcher attached: stop the instance" in log
    assert "asking vast.ai to stop instance %d with its own key" % instance_id in log
    # started again, the on-start script brings the watchdog back, which stops it again when idle
    rental(vast, tmp_path).acquire()
    vast.wait_for(lambda: vast.instances[instance_id]["intended_status"] == "stopped")
    assert (folder / "watchdog.log").read_text().count("watchdog started") == 2


def test_the_watchdog_never_stops_a_box_with_a_launcher_attached(vast, tmp_path):
    target = rental(vast, tmp_path).acquire()
    (instance_id,) = vast.instances
    # as the launcher does it: arm (the launcher counts as arriving), then attach
    folder = _deploy_watchdog(vast, target, instance_id, idle_stop=0.5, arrival_grace=30)
    attachment = claude_vast.Attachment(lambda remote: target.command(remote), interval=0.2).start()
    try:
        assert attachment.attached.wait(30)
        log = folder / "watchdog.log"
        # many ticks, each well past idle_stop since boot, all keeping the box
        deadline = time.monotonic() + 30
        while log.read_text().count("keep: a launcher is attached") < 15:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert vast.instances[instance_id]["intended_status"] == "running"
    finally:
        attachment.close()
    vast.wait_for(lambda: vast.instances[instance_id]["intended_status"] == "stopped")
    (left,) = os.listdir(folder / "attached")  # detached: its last beat is where the idle time began
    assert (folder / "attached" / left).read_text() == "0"
    text = log.read_text()
    assert "act:" not in text[:text.rindex("keep: a launcher is attached")]


def test_status_stop_and_destroy(vast, tmp_path):
    run = rental(vast, tmp_path)
    run.acquire()
    (instance_id,) = vast.instances
    lines = run.status_lines()
    assert lines[0] == "credit: $25.00"
    assert lines[1].startswith("instance %d  running    RTX 3090       $0.208/h  up " % instance_id), lines
    assert run.stop_all() == [instance_id] and vast.instances[instance_id]["intended_status"] == "stopped"
    assert "stopped" in run.status_lines()[1]
    assert run.destroy_all(lambda instance: False) == [] and instance_id in vast.instances
    assert run.destroy_all(lambda instance: True) == [instance_id] and vast.instances == {}
    assert run.status_lines()[1] == "no instance labelled simple_api_proxy: nothing bills"


def test_the_official_vastai_cli_is_a_second_client_of_the_stand_in(vast, tmp_path):
    """The stand-in answers what the official `vastai` package (its api layer, which needs only
    requests; `pip install --no-deps vastai`) sends, and it reads what the stand-in answers."""
    try:
        from vastai.api import billing, instances, keys, offers
        from vastai.api.client import VastClient
    except ImportError:
        need(False, "the official vastai package is not installed (pip install --no-deps vastai)")
    client = VastClient(api_key=vast.key, server_url=vast.url, retry=2)
    assert billing.show_user(client)["credit"] == 25.0
    found = offers.search_offers(client, query={"gpu_name": {"in": ["RTX 4090"]}, "reliability": {"gte": 0.98},
                                                "cuda_max_good": {"gte": 12.0}},
                                 order=[["dph_total", "asc"]], storage=40)
    assert [o["id"] for o in found] == [1]
    assert keys.create_ssh_key(client, (Path(os.environ["HOME"]) / ".ssh/id_ed25519.pub").read_text())["success"]
    created = instances.create_instance(client, 1, image="ollama/ollama:latest", disk=40, label="by-the-cli",
                                        onstart_cmd=claude_vast.ON_START, env="-e OLLAMA_HOST=127.0.0.1:11434",
                                        cancel_unavail=True, ssh=True, direct=True)
    instance_id = created["new_contract"]
    row = vast.instances[instance_id]
    assert row["image_runtype"] == "ssh_direc ssh_proxy"
    assert dict(row["extra_env"]) == {"OLLAMA_HOST": "127.0.0.1:11434"}
    vast.wait_for(lambda: vast.instances[instance_id]["actual_status"] == "running")
    assert instances.show_instance(client, instance_id)["ssh_port"] == vast.containers[instance_id].ssh_port
    listed = instances.show_instances(client, select_filters={"label": {"in": ["by-the-cli"]}})
    assert [r["id"] for r in listed] == [instance_id]
    # what the CLI created, our provider finds and reads
    (ours,) = provider_for(vast).list_by_label("by-the-cli")
    assert (ours.state, ours.ssh_host, ours.ssh_port) == ("running", "127.0.0.1", vast.containers[instance_id].ssh_port)
    assert instances.stop_instance(client, instance_id)["success"]
    assert provider_for(vast).show(instance_id).state == "stopped"
    assert instances.start_instance(client, instance_id)["success"]
    vast.wait_for(lambda: vast.instances[instance_id]["actual_status"] == "running")
    assert instances.destroy_instance(client, instance_id)["success"]
    assert instances.show_instance(client, instance_id) is None and provider_for(vast).show(instance_id) is None


def test_the_proxys_health_says_how_long_it_has_been_idle_and_the_watchdog_reads_it(tmp_path):
    port, dead = free_port(), free_port()
    env = dict(os.environ, API_HOST="127.0.0.1", API_PORT=str(port), OLLAMA_HOST="127.0.0.1:%d" % dead,
               LOG_FILE="", OLLAMA_WARMUP="off")
    proxy = subprocess.Popen([sys.executable, str(ROOT / "simple_api_proxy.py")], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        watchdog = claude_vast.Watchdog(str(tmp_path))
        deadline = time.monotonic() + 30
        while watchdog.proxy_activity(port) is None:  # a 503 (no Ollama) still reports idle_s
            assert proxy.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        idle, in_flight = watchdog.proxy_activity(port)
        while idle < 0.5:  # /health itself is not a request that counts
            time.sleep(0.05)
            idle, in_flight = watchdog.proxy_activity(port)
        assert in_flight == 0
        request = urllib.request.Request("http://127.0.0.1:%d/v1/messages" % port, method="POST", data=json.dumps(
            {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError):  # no Ollama: an error, but a request all the same
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30)
        assert watchdog.proxy_activity(port)[0] < idle
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)


def test_a_restart_that_waits_for_its_gpu_says_so_and_how_to_rent_another(vast, tmp_path):
    rental(vast, tmp_path).acquire()
    (instance_id,) = vast.instances
    vast.offers[vast.instances[instance_id]["offer"]]["gpu_taken"] = True
    provider_for(vast).stop(instance_id)
    with pytest.raises(claude_vast.BootFailed, match="still waits for its GPU after 1s.*claude_start.sh --vast "
                                                     "--destroy --yes && claude_start.sh --vast"):
        rental(vast, tmp_path, boot_timeout=1).acquire()
    assert instance_id in vast.instances  # a resumed instance holds the user's disk: never destroyed unasked


def test_idle_action_destroy_destroys_with_the_instance_key(vast, tmp_path):
    target = rental(vast, tmp_path).acquire()
    (instance_id,) = vast.instances
    _deploy_watchdog(vast, target, instance_id, idle_action="destroy")
    vast.wait_for(lambda: instance_id not in vast.instances)
    assert [whose for method, path, _, whose in vast.requests
            if method == "DELETE" and path == "/api/v0/instances/%d/" % instance_id] == ["instance"]


def test_an_image_without_python3_is_waited_for_until_the_on_start_script_installs_it(vast, tmp_path):
    """The ollama/ollama image has no python3: the on-start script installs it; until then SSH
    answers but the box is not usable yet."""
    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None)
    need(python, "no python3 outside /root to install into the box (the box's /root is its own)")
    bare = tmp_path / "bare-bin"
    bare.mkdir()
    for tool in ("sh", "mkdir", "chmod", "touch", "mv", "head", "cat", "nohup", "sleep", "ln"):
        os.symlink(shutil.which(tool), bare / tool)
    vast.path_dirs, vast.system_path = [str(bare)], False
    # what apt-get does on the image: python3 appears after a while
    (bare / "apt-get").write_text("#!/bin/sh\n[ \"$1\" = install ] && sleep 1 && ln -s %s %s/python3\nexit 0\n"
                                  % (python, bare))
    (bare / "apt-get").chmod(0o755)
    said = []
    target = rental(vast, tmp_path, said=said).acquire()
    assert any("waiting for its on-start script to install python3" in line for line in said), said
    assert ssh(target, "python3", "-c", "'print(1)'").stdout == "1\n"


###############################################################################
# The launcher: claude_start.sh --vast, from nothing to Claude Code's answer
###############################################################################


@pytest.fixture
def laptop_run(laptop, tmp_path, monkeypatch):
    ollama_dir = tmp_path / "ollama-bin"
    ollama_dir.mkdir()
    shutil.copy(STANDIN_BIN / "box_ollama.py", ollama_dir / "ollama")
    (ollama_dir / "ollama").chmod(0o755)
    monkeypatch.setenv("HOME", str(laptop))
    standin = VastStandIn(tmp_path / "vast", laptop / ".ssh" / "id_ed25519.pub", path_dirs=[ollama_dir],
                          boot_delay=0.2, image_setup=ollama_image,
                          offers=[offer(1, "RTX 4090", dph_base=0.40), offer(2, "RTX 3090", dph_base=0.20)])
    (tmp_path / "laptop").mkdir()
    yield Laptop(laptop, standin, tmp_path / "laptop")
    standin.close()


def _said(done):
    return [line[len("claude_start: "):] for line in done.stderr.splitlines() if line.startswith("claude_start: ")]


def test_rent_answer_exit_idle_stop_resume_destroy(laptop_run):
    vast = laptop_run.vast
    first = laptop_run.run("--gpu", "RTX 4090", "--max-price", "0.5", "--idle-stop", "1s")
    assert first.returncode == 0, first.stderr
    (instance_id,) = vast.instances
    assert first.stdout == "Answer from vast instance %d.\n" % instance_id
    said = _said(first)
    assert "renting RTX 4090 at $0.408/h in Sweden, SE, reliability 99.5% (offer 1)" in said, said
    assert "credit: $25.00; this box costs $0.408/h" in said
    assert any(line.startswith("session ") and "on instance %d at $0.408/h" % instance_id in line for line in said)
    assert any("keeps running and billing $0.408/h until it stops itself after 1s idle" in line for line in said)
    assert "credit left: $25.00" in said
    # exit -> the box's watchdog stops it, with the instance's own key
    vast.wait_for(lambda: vast.instances[instance_id]["intended_status"] == "stopped")
    stops = [w for m, p, _, w in vast.requests if m == "PUT" and p == "/api/v0/instances/%d/" % instance_id]
    assert stops == ["instance"]
    # resume: started again, on a new port with a new host key, deployed, answered
    again = laptop_run.run("--idle-stop", "off", "--on-exit", "stop")
    assert again.returncode == 0, again.stderr
    assert again.stdout == "Answer from vast instance %d.\n" % instance_id
    said = _said(again)
    assert any(line.startswith("starting stopped instance %d" % instance_id) for line in said), said
    assert any("instance %d stopped: its disk still bills a little" % instance_id in line for line in said), said
    assert vast.count("PUT", r"^/api/v0/asks/") == 1 and vast.instances[instance_id]["intended_status"] == "stopped"
    status = _said(laptop_run.run("--status"))
    assert status[0] == "credit: $25.00" and status[1].startswith("instance %d  stopped" % instance_id), status
    refused = laptop_run.run("--destroy", stdin="n\n")
    assert "nothing destroyed" in _said(refused) and instance_id in vast.instances
    destroyed = laptop_run.run("--destroy", "--yes")
    assert _said(destroyed) == ["destroyed instance(s) %d: nothing of them bills any more" % instance_id]
    assert vast.instances == {}
    assert _said(laptop_run.run("--status"))[1] == "no instance labelled simple_api_proxy: nothing bills"


def test_a_session_with_the_launcher_attached_is_never_stopped(laptop_run):
    vast = laptop_run.vast
    vast.offers[2]["rented"] = True  # one offer left, so the instance's id (and its log's path) is known
    log = vast.root / "instance-7000001" / "home" / ".simple_api_proxy" / "watchdog.log"
    # The stand-in Claude Code stays (a user reading) until the box's watchdog has kept the box 10
    # times (2 s at a look every 0.2 s), the last ones long past --idle-stop since the last request.
    done = laptop_run.run("--idle-stop", "0.5s", STUB_CLAUDE_WAIT_LOG=log,
                          STUB_CLAUDE_WAIT_TEXT="keep: a launcher is attached", STUB_CLAUDE_WAIT_COUNT=10)
    assert done.returncode == 0, done.stderr
    vast.wait_for(lambda: vast.instances[7000001]["intended_status"] == "stopped")
    text = log.read_text()
    assert text.index("act: idle") > text.rindex("keep: a launcher is attached")  # only once the launcher left


def test_no_offer_or_a_rejected_key_rents_nothing(laptop_run):
    vast = laptop_run.vast
    done = laptop_run.run("--gpu", "H100 SXM")
    assert done.returncode == 1 and "no H100 SXM is offered" in done.stderr and "Nothing was rented" in done.stderr
    done = laptop_run.run(VAST_API_KEY="wrong")
    assert done.returncode == 1 and "rejected the API key read from VAST_API_KEY (HTTP 401" in done.stderr
    assert vast.count("PUT", r"^/api/v0/asks/") == 0 and vast.instances == {}


def test_check_runs_the_usual_checks_on_our_running_instance(laptop_run):
    nothing = laptop_run.run("--check")
    assert nothing.returncode == 1 and "no running instance labelled simple_api_proxy" in nothing.stderr
    assert laptop_run.run("--idle-stop", "off").returncode == 0
    done = laptop_run.run("--check")
    assert done.returncode == 0, done.stderr
    assert "ssh reachable" in done.stdout and "local health" in done.stdout and "failed" not in done.stdout, done.stdout
    assert _said(done)[-1] == "all checks passed"


def test_the_launcher_destroys_a_rental_that_never_boots_and_says_so(laptop_run):
    vast = laptop_run.vast
    for row in vast.offers.values():
        row["boots"] = False
    done = laptop_run.run("--boot-timeout", "1s")
    assert done.returncode == 1
    said = _said(done)
    assert any("destroying instance 7000001, rented by this run, so that nothing keeps billing" in line
               for line in said), said
    assert said[-1] == "instance 7000001 was not usable within 1s (--boot-timeout)"
    assert vast.instances == {}


def test_a_session_ended_by_a_signal_still_settles_the_box(laptop_run):
    vast = laptop_run.vast
    # the stand-in Claude Code answers, then stays (it waits for a text that never comes)
    launcher = laptop_run.start("--on-exit", "stop", STUB_CLAUDE_WAIT_LOG=laptop_run.root / "never",
                                STUB_CLAUDE_WAIT_TEXT="never")
    try:
        assert launcher.stdout.readline().startswith("Answer from vast instance")
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode == 128 + signal.SIGTERM
    (instance_id,) = vast.instances
    assert "claude_start: instance %d stopped: its disk still bills a little" % instance_id in err, err
    assert vast.instances[instance_id]["intended_status"] == "stopped"


@pytest.mark.parametrize("moment", ["booting", "creating"])
def test_a_signal_before_the_rental_is_usable_destroys_it(laptop_run, moment):
    vast = laptop_run.vast
    for row in vast.offers.values():
        row["boots"] = False
    if moment == "creating":
        vast.fail("PUT", r"^/api/v0/asks/", ("late", 20))  # the create acts; its answer is slow to come
    launcher = laptop_run.start("--boot-timeout", "10m")
    try:
        if moment == "booting":  # the launcher knows the instance: it asks how it is
            vast.wait_for(lambda: vast.count("GET", r"^/api/v0/instances/7000001/$"))
        else:
            vast.wait_for(lambda: vast.instances)
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert "destroyed instance 7000001, rented by this run and not set up yet" in err, err
    assert vast.instances == {}


@pytest.mark.parametrize("args, word", [
    (["--status"], "--status goes with --vast"), (["--gpu", "RTX 4090"], "--gpu goes with --vast"),
    (["--vast", "--ssh", "root@box"], "leave out --ssh"), (["--vast", "--deploy"], "deploys by itself"),
    (["--vast", "--status", "--destroy"], "one at a time"), (["--vast", "--idle-stop", "soon"], "not a duration"),
    (["--vast", "--on-exit", "pause"], "--on-exit is keep, stop or destroy"),
    (["--vast", "--max-price", "0"], "--max-price must be"),
])
def test_vast_usage_errors(args, word, tmp_path):
    done = subprocess.run([str(ROOT / "claude_start.sh"), *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert done.returncode == 2 and word in done.stderr, done.stderr
