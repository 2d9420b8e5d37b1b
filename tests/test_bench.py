"""bench/: the benchmark and the soak keep working (no speed is asserted).
"""

import os
import re
import shutil
import subprocess
import sys

from standins.support import need, ROOT


def test_benchmark_smoke_run_completes():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| cache hit, memory tier |" in result.stdout and "every scenario completed without errors" in result.stdout
    assert "| two Ollama hosts vs one" in result.stdout and "metrics: recording one request" in result.stdout


def test_hot_path_profile_prints_every_component_for_this_file_and_the_baseline():
    against = ["--against", "1.0.0"] if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", "bcac229"],
                                                          capture_output=True).returncode == 0 else []
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "hot_path.py"), "--loops", "5", "--repeat", "1"]
                            + against, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    for component in ("request line and headers", "upstream chunked parse and line split", "NDJSON decode",
                      "StreamTranslator feeds", "SSE encode", "everything else", "**total**"):
        assert re.search(r"\d+ µs", rows[component]), result.stdout
    assert ("1.0.0 (bcac229)" in rows["component"]) == bool(against)  # a release named by version and commit


def test_benchmark_without_git_history_leaves_the_default_baseline_out(tmp_path):
    # A tarball or a shallow clone: bench/ without the baseline revision in reach.
    shutil.copytree(ROOT / "bench", tmp_path / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "simple_api_proxy.py", tmp_path)
    check = ("import sys, tempfile; sys.path.insert(0, sys.argv[1]); import run\n"
             "print(run.baseline_script(run.BASELINE_REVISION, False, tempfile.mkdtemp()))\n"
             "try:\n    run.baseline_script(run.BASELINE_REVISION, True, tempfile.mkdtemp())\n"
             "except run.BaselineUnavailable as exc:\n    print('asked:', exc)\n")
    result = subprocess.run([sys.executable, "-c", check, str(tmp_path / "bench")], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, GIT_CEILING_DIRECTORIES=str(tmp_path.parent)))
    assert result.returncode == 0, result.stderr
    left_out, asked = result.stdout.splitlines()
    assert left_out.startswith("(None, 'baseline left out: cannot read simple_api_proxy.py at revision")
    assert asked.startswith("asked: cannot read simple_api_proxy.py at revision") and "--no-baseline" in asked


def test_soak_short_run_passes():
    need(shutil.which("redis-server"), "redis-server is not installed")
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--seconds", "8"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "answers lost: 0; corrupted: 0" in result.stdout and "soak: passed" in result.stdout
