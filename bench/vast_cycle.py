#!/usr/bin/env python3
"""A box's whole life with `claude_start.sh --vast`, against the tests' stand-in vast.ai API:
rent -> answer -> exit -> idle stop -> resume -> answer -> exit -> status -> destroy, with timings.

    sudo python3 bench/vast_cycle.py [--idle-stop 3s]

Needs what the tests' boxes need (root, sshd, unshare). The instances are real sshd servers in
private mount namespaces that boot 0.2 s after a create or start; Claude Code is a stand-in that
asks one question through the tunnel and prints the answer. The watchdog looks every 0.2 s (30 s
by default) and the launcher polls the instance every 0.05 s (3 s by default): the times are the
launcher's and the box's own work, not vast.ai's or a network's.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from standins.support import STANDIN_BIN  # noqa: E402
from standins.vast_api import Laptop, VastStandIn, offer, ollama_image  # noqa: E402


def show(title, done, began):
    print("$ claude_start.sh --vast %s   # %.2f s, exit %d (t=%.2f s)"
          % (title, done.seconds, done.returncode, time.monotonic() - began))
    for line in done.stderr.splitlines():
        print("  " + line)
    for line in done.stdout.splitlines():
        print("  [claude] " + line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle-stop", default="3s")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        home = folder / "home"
        (home / ".ssh").mkdir(parents=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / ".ssh" / "id_ed25519")],
                       check=True)
        ollama_dir = folder / "ollama-bin"
        ollama_dir.mkdir()
        shutil.copy(STANDIN_BIN / "box_ollama.py", ollama_dir / "ollama")
        (ollama_dir / "ollama").chmod(0o755)
        vast = VastStandIn(folder / "vast", home / ".ssh" / "id_ed25519.pub", path_dirs=[ollama_dir], boot_delay=0.2,
                           image_setup=ollama_image, offers=[offer(1, "RTX 4090", dph_base=0.40),
                                                             offer(2, "RTX 3090", dph_base=0.20)])
        (folder / "laptop").mkdir()
        laptop = Laptop(home, vast, folder / "laptop")
        try:
            began = time.monotonic()
            show("--gpu 'RTX 4090' --max-price 0.5 --idle-stop %s" % options.idle_stop,
                 laptop.run("--gpu", "RTX 4090", "--max-price", "0.5", "--idle-stop", options.idle_stop), began)
            (instance_id,) = vast.instances
            exited = time.monotonic()
            vast.wait_for(lambda: vast.instances[instance_id]["intended_status"] == "stopped")
            print("# the box's watchdog stopped instance %d %.2f s after the launcher exited (with the instance's "
                  "own key: %s)" % (instance_id, time.monotonic() - exited,
                                   [w for m, p, _, w in vast.requests if m == "PUT" and "/instances/" in p]))
            log = vast.containers[instance_id].home / ".simple_api_proxy" / "watchdog.log"
            lines = log.read_text().splitlines()
            print("# its log, last lines:\n" + "\n".join("  | " + line for line in lines[-3:]))
            show("--status", laptop.run("--status"), began)
            show("--idle-stop %s   (resume)" % options.idle_stop, laptop.run("--idle-stop", options.idle_stop), began)
            show("--status", laptop.run("--status"), began)
            show("--destroy --yes", laptop.run("--destroy", "--yes"), began)
            show("--status", laptop.run("--status"), began)
            print("# creates sent: %d; instances left: %d"
                  % (vast.count("PUT", r"^/api/v0/asks/"), len(vast.instances)))
        finally:
            vast.close()


if __name__ == "__main__":
    main()
