"""PrivateRedis: a redis-server of the tests' own, on a free loopback port.
"""

import contextlib
import shutil
import socket
import subprocess
import time

from standins.proxy import free_port
from standins.support import need


class PrivateRedis:
    """A redis-server of our own on a free port, to kill and restart."""

    def __init__(self):
        need(shutil.which("redis-server"), "redis-server is not installed")
        self.port = free_port()
        self.process = None
        self.start()

    def start(self):
        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.02)
        raise RuntimeError("private redis-server did not start")

    def kill(self):
        self.process.kill()
        self.process.wait(10)
