"""Fixtures several test files share: a stand-in Ollama and a proxy in front of it.

Puts the repository root on sys.path, so `python3 -m pytest -q` from the root imports simple_api_proxy.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # simple_api_proxy, from anywhere

import pytest

from standins.ollama import StandInOllama
from standins.proxy import running_proxy
from standins.support import anthropic_module


@pytest.fixture
def ollama():
    stand_in = StandInOllama()
    yield stand_in
    stand_in.stop()


@pytest.fixture
def gateway(ollama):
    with running_proxy(ollama.url) as running:
        yield running


@pytest.fixture
def sdk(gateway):
    anthropic = anthropic_module()
    return anthropic, anthropic.Anthropic(base_url=gateway.url, api_key="dummy", max_retries=0, timeout=30)


@pytest.fixture
def hosts():
    """Two stand-in Ollama servers with the same models; a test may stop and restart them."""
    made = [StandInOllama(), StandInOllama()]
    yield made
    for host in made:
        host.stop()
