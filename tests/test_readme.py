"""README.md against the code: its settings table, its metric names and its quick-start commands
say what the program does.
"""

import re
import shlex

import simple_api_proxy as proxy

from standins.proxy import running_proxy
from standins.support import ROOT

README = (ROOT / "README.md").read_text()


def table_rows(heading_pattern, first_column=r"`([A-Z_a-z0-9]+)`"):
    """{first cell's name: the row's cells} of the table under the heading matched."""
    section = re.search(r"^#+ " + heading_pattern + r"\n(.*?)(?=^#+ |\Z)", README, re.M | re.S)
    assert section, f"README has no heading matching {heading_pattern!r}"
    rows = {}
    for line in section.group(1).splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        match = re.fullmatch(first_column, cells[0]) if line.startswith("|") else None
        if match:
            rows[match.group(1)] = cells
    return rows


def readme_default(cell):
    return cell.strip("`") if cell.startswith("`") else None


def test_the_settings_table_lists_every_setting_with_its_default():
    rows = table_rows("Configuration")
    assert list(rows) == [name for name, *_ in proxy.SETTINGS]  # every one, in --help's order
    for name, kind, default, _help in proxy.SETTINGS:
        shown = readme_default(rows[name][1])
        if shown is None:  # "(none)" or the like: the default is empty
            assert default in ("", None), (name, rows[name][1])
        else:
            assert kind(shown) == default, (name, shown, default)


def test_the_metrics_table_names_every_metric_the_endpoint_writes(ollama):
    documented = set(table_rows("Metrics", r"`(simple_api_proxy_[a-z_]+)`"))
    with running_proxy(ollama.url) as gateway:
        page = gateway.call("GET", "/metrics")[2].decode()
    written = set(re.findall(r"^# TYPE (\S+) ", page, re.M))
    assert documented == written


def test_the_quick_start_commands_are_ones_the_programs_take():
    start = re.search(r"^## Quick start\n(.*?)(?=^## )", README, re.M | re.S)
    assert start, "README has a Quick start"
    commands = [line.strip() for block in re.findall(r"```(?:sh|bash|shell)?\n(.*?)```", start.group(1), re.S)
                for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.strip().startswith("#")]
    commands += re.findall(r"`(\./claude_start\.sh [^`]*)`", start.group(1))
    settings = {name for name, *_ in proxy.SETTINGS}
    flags = {"--" + name.lower().replace("_", "-") for name in settings}
    checked = 0
    for command in commands:
        words = shlex.split(command, comments=True)
        for word in words:
            assignment = re.fullmatch(r"([A-Z][A-Z0-9_]+)=.*", word)
            if assignment and assignment.group(1) not in ("ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN",
                                                          "ANTHROPIC_MODEL", "ANTHROPIC_API_KEY"):
                assert assignment.group(1) in settings, f"{command}: {assignment.group(1)} is no setting"
        if "simple_api_proxy.py" in command:
            given = [word.split("=")[0] for word in words if word.startswith("--")]
            assert set(given) <= flags | {"--help"}, command
            checked += 1
        if "claude_start.sh" in command:
            launcher_help = (ROOT / "claude_start.py").read_text() if (ROOT / "claude_start.py").exists() \
                else (ROOT / "claude_start.sh").read_text()
            for word in words:
                if word.startswith("--"):
                    assert word.split("=")[0] in launcher_help, f"{command}: {word} is not a launcher flag"
            checked += 1
    assert checked >= 2, commands  # the proxy's command and the launcher's
