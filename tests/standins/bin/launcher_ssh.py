#!/usr/bin/env python3
# Stand-in for ssh. With a remote command it runs it here with `sh -c`; with
# -N -L L:127.0.0.1:R it forwards 127.0.0.1:L to 127.0.0.1:R until SIGTERM. A
# master connection (-M) and its control commands (-O) just succeed.
# Knobs: STUB_SSH_UNREACHABLE (exit 255 like a refused connection),
# STUB_SSH_TUNNEL_FAIL (tunnel exits 255), STUB_SSH_TUNNEL_BLACKHOLE (tunnel
# accepts and drops connections, so /health never answers).
import json, os, signal, socket, subprocess, sys, threading
WITH_ARG = set("BbcDEeFIiJLlmOopQRSWw")
args = sys.argv[1:]
i, forward, no_command, kind = 0, None, False, "command"
while i < len(args):
    a = args[i]
    if a == "--":
        i += 1
        break
    if not a.startswith("-") or a == "-":
        break
    if a[1] in WITH_ARG:
        value = a[2:] if len(a) > 2 else args[i + 1]
        i += 1 if len(a) > 2 else 2
        if a[1] == "L":
            forward = value
        if a[1] == "O":
            kind = "control"
    else:
        no_command = no_command or "N" in a[1:]
        if "M" in a[1:]:
            kind = "master"
        i += 1
if kind == "command" and no_command:
    kind = "tunnel"
dest, command = args[i], " ".join(args[i + 1:])
record_dir = os.environ.get("STUB_SSH_RECORD_DIR")
if record_dir:
    with open(os.path.join(record_dir, "ssh-%d.json" % os.getpid()), "w") as f:
        json.dump({"pid": os.getpid(), "argv": sys.argv[1:], "dest": dest,
                   "command": command, "tunnel": kind == "tunnel", "kind": kind}, f)
if os.environ.get("STUB_SSH_UNREACHABLE"):
    sys.stderr.write("ssh: connect to host %s port 22: Connection refused\n" % dest)
    sys.exit(255)
if kind in ("master", "control"):
    sys.exit(0)
if not no_command:
    sys.exit(subprocess.call(["sh", "-c", command]))
lport, _, rport = forward.split(":")
if os.environ.get("STUB_SSH_TUNNEL_FAIL"):
    sys.stderr.write("channel_setup_fwd_listener_tcpip: cannot listen to port: %s\n"
                     "Could not request local forwarding.\n" % lport)
    sys.exit(255)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    listener.bind(("127.0.0.1", int(lport)))
except OSError as e:
    sys.stderr.write("bind [127.0.0.1]:%s: %s\n" % (lport, e))
    sys.exit(255)
listener.listen(16)

def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

while True:
    conn, _ = listener.accept()
    if os.environ.get("STUB_SSH_TUNNEL_BLACKHOLE"):
        conn.close()
        continue
    try:
        upstream = socket.create_connection(("127.0.0.1", int(rport)), timeout=5)
        upstream.settimeout(None)
    except OSError:
        conn.close()
        continue
    for a, b in ((conn, upstream), (upstream, conn)):
        threading.Thread(target=pump, args=(a, b), daemon=True).start()
