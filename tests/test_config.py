"""Settings: flags, environment variables, their defaults and the values refused at start-up.
"""

import os
import socket
import subprocess
import sys

import pytest

import simple_api_proxy as proxy

from standins.ollama import MODEL
from standins.support import ROOT


@pytest.mark.parametrize("value, url", [
    ("localhost:11434", "http://localhost:11434"),
    ("gpu-box", "http://gpu-box:11434"),
    ("http://gpu-box", "http://gpu-box:80"),
    ("https://gpu-box", "https://gpu-box:443"),
    ("https://gpu-box:8443", "https://gpu-box:8443"),
    (":5000", "http://127.0.0.1:5000"),
    ("0.0.0.0:11434", "http://127.0.0.1:11434"),
    ("[::1]:11434", "http://[::1]:11434"),
])
def test_ollama_host_follows_ollamas_port_rules(value, url):
    assert proxy.parse_ollama_host(value).url == url


def test_defaults_are_the_documented_ones():
    settings = proxy.load_config([], {})
    assert (settings.api_host, settings.api_port) == ("127.0.0.1", 8000)
    assert [h.url for h in settings.ollama_addresses] == ["http://localhost:11434"]
    assert settings.ollama_model == MODEL and settings.ollama_num_ctx == 32768
    assert (settings.ollama_timeout, settings.ollama_first_token_timeout) == (30, 300)
    assert settings.cache_ttl == 86400 and settings.cache_enabled and settings.redis_url == ""
    assert settings.log_file == "simple_api_proxy.log"


def test_flags_win_over_environment_and_bad_values_are_refused(capsys):
    settings = proxy.load_config(["--api-port", "9001"], {"API_PORT": "9000", "MODEL_MAP": "haiku=llama3.2:3b"})
    assert settings.api_port == 9001 and settings.model_map == {"haiku": "llama3.2:3b"}
    with pytest.raises(SystemExit):
        proxy.load_config([], {"API_PORT": "eighty"})
    assert "API_PORT must be an integer, not 'eighty'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        proxy.load_config([], {"MODEL_MAP": "haiku"})


def test_redis_settings_become_a_url_and_the_password_never_shows():
    settings = proxy.load_config([], {"REDIS_HOST": "r.example", "REDIS_PORT": "12000", "REDIS_PASSWORD": "s3cr:t",
                                      "REDIS_SSL": "on", "REDIS_DB": "2"})
    assert settings.redis_url == "rediss://:s3cr%3At@r.example:12000/2"
    assert "s3cr" not in settings.describe() and "***" in settings.describe()


def test_help_lists_every_setting():
    result = subprocess.run([sys.executable, str(ROOT / "simple_api_proxy.py"), "--help"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for name, *_ in proxy.SETTINGS:
        assert name in result.stdout


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_timeouts_must_be_finite(value, capsys):
    with pytest.raises(SystemExit):
        proxy.load_config([], {"CLIENT_TIMEOUT": value})
    assert "CLIENT_TIMEOUT must be a number greater than 0" in capsys.readouterr().err


def test_taken_port_is_a_one_line_error(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        result = subprocess.run([sys.executable, str(ROOT / "simple_api_proxy.py"), "--api-port", str(port)],
                                env=dict(os.environ, LOG_FILE="", CACHE="off"), cwd=tmp_path,
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "cannot listen on 127.0.0.1:%d" % port in lines[0] and "API_PORT" in lines[0]


@pytest.mark.parametrize("name", ["PING_INTERVAL", "OLLAMA_TIMEOUT", "CLIENT_TIMEOUT", "CACHE_TTL",
                                  "OLLAMA_FIRST_TOKEN_TIMEOUT"])
def test_settings_that_must_be_positive_are_checked(name, capsys):
    with pytest.raises(SystemExit):
        proxy.load_config([], {name: "0"})
    assert f"{name} must be a number greater than 0" in capsys.readouterr().err
