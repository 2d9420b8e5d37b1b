#!/usr/bin/env python3
"""How long `claude_start.sh --deploy` takes on the box side: first deploy to a bare box, then repeats.

    python3 bench/deploy.py             # 1 first deploy, 5 repeats
    python3 bench/deploy.py --repeats 10 --transcript
    python3 bench/deploy.py --repeats 10 --baseline ../old/claude_start.sh   # two launchers, same run

It uses the tests' boxes (needs root, sshd, unshare): a real OpenSSH server on a loopback port in a
private mount namespace, with the stand-in `ollama` command on its PATH (installed, stopped), and the
real ssh client on the laptop side. Claude Code is a stand-in that exits at once, so the time is
the launcher's own.

For each run it reports, from the launcher's start:
  box part   until the box reports the proxy ready (ssh connection, copy if needed, Ollama, model,
             proxy, /health): meant to stay under 3 s for a repeat;
  tunnel     until the tunnel answers with the box's proxy instance;
  total      until the launcher exits (after closing the tunnel).
With --baseline, another checkout's launcher deploys to a box of its own (a second set of
boxes) in the same run, the two taking turns, so that load on a shared machine hits both alike.
Loopback has no network latency: on a real link add about 2 round trips for the box part (one to
connect, one per box call) and 2 for the tunnel.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from standins.sshlab import SshLab  # noqa: E402  (the tests' sshd boxes and stand-in ollama)
from standins.support import LAUNCHER_SCRIPT  # noqa: E402


def timed_deploy(lab, box, launcher=LAUNCHER_SCRIPT):
    """Runs one --deploy; returns (seconds to box ready, to tunnel up, to exit) and the transcript."""
    started = time.monotonic()
    proc = subprocess.Popen([str(launcher), "--ssh", "box-" + box.name, "--remote-port",
                             str(box.proxy_port), "--deploy"], env=lab.env(), cwd=lab.laptop,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marks, transcript = {}, []
    for line in proc.stderr:
        now = time.monotonic() - started
        transcript.append("%6.2f s  %s" % (now, line.rstrip()))
        if "box ready" in line:
            marks["box"] = now
        elif "is up (ssh pid" in line:
            marks["tunnel"] = now
    proc.wait()
    if proc.returncode != 0 or len(marks) != 2:
        sys.exit("deploy failed:\n" + "\n".join(transcript))
    return (marks["box"], marks["tunnel"], time.monotonic() - started), transcript


class Contender:
    """One launcher with a lab of its own, and its times."""

    def __init__(self, name, launcher, folder):
        self.name, self.launcher = name, launcher
        self.lab = SshLab(folder)
        self.box = self.lab.boxes["a"]
        self.first, self.repeats = None, []

    def deploy(self, transcript, title):
        times, said = timed_deploy(self.lab, self.box, self.launcher)
        if transcript:
            print("%s, %s:\n%s\n" % (self.name, title, "\n".join(said)))
        return times

    def stop(self):
        self.lab.cleanup()
        for each in self.lab.boxes.values():
            each.stop()

    def table(self):
        print("\n%-22s %9s %9s %9s" % (self.name, "box part", "tunnel", "total"))
        print("%-22s %8.2fs %8.2fs %8.2fs" % ("first deploy", *self.first))
        if self.repeats:
            for label, pick in (("repeat, median", statistics.median), ("repeat, max", max)):
                print("%-22s %8.2fs %8.2fs %8.2fs"
                      % ((label,) + tuple(pick(r[i] for r in self.repeats) for i in range(3))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="repeat deploys after the first (default 5)")
    parser.add_argument("--transcript", action="store_true", help="print what the launcher said, timed")
    parser.add_argument("--baseline", type=Path, help="another checkout's claude_start.sh, run in turns with this one")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench/deploy.py runs sshd in a mount namespace: run it as root")
    with tempfile.TemporaryDirectory(prefix="deploy-bench-") as tmp:
        contenders = []
        try:
            contenders.append(Contender("this launcher", LAUNCHER_SCRIPT, Path(tmp, "this")))
            if args.baseline:
                contenders.append(Contender("baseline", args.baseline.resolve(), Path(tmp, "baseline")))
            for contender in contenders:
                contender.box.reset()
                contender.first = contender.deploy(args.transcript, "first deploy (bare box: Ollama installed "
                                                                    "but stopped, no proxy)")
            for number in range(args.repeats):
                # Taking turns, the first of each round alternating.
                for contender in contenders[::1 if number % 2 == 0 else -1]:
                    contender.repeats.append(contender.deploy(args.transcript and number == 0, "repeat deploy"))
        finally:
            for contender in contenders:
                contender.stop()
    for contender in contenders:
        contender.table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
