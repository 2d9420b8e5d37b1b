"""Stand-ins the tests and bench/ share: Ollama (ollama.py), the proxy and its clients (proxy.py),
a private Redis (redis.py), OpenSSH boxes (sshlab.py), and what they all need (support.py). The
stand-in programs the launcher tests put on PATH are real files in bin/.
"""
