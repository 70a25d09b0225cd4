"""launch/autoshard_pipeline.sh (`make autoshard`) runs for hours, so a renamed flag or module
would surface only deep into a run: every launcher it calls must exist and define each flag it
passes, and every --config.X override must name a key of the sharder config."""

import pathlib
import re
import subprocess

from launch.configs import sharder_runlocal

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "autoshard_pipeline.sh"


def _commands() -> list[tuple[str, list[str]]]:
    """(module, flags) of each `-m launch.X ...` command, continuation lines joined."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        m = re.search(r"-m (launch\.\w+)(.*)", line)
        if m:
            out.append((m.group(1), re.findall(r"--([\w.]+)=", m.group(2))))
    return out


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_launcher_defines_the_flags_the_script_passes():
    commands = _commands()
    assert {m for m, _ in commands} == {
        "launch.collect_costs", "launch.train_cost_model", "launch.train_sharder",
        "launch.mine_plan_costs", "launch.reproduce_autoshard"}
    common = (ROOT / "launch" / "common.py").read_text()
    config = sharder_runlocal.get_config()
    for module, flags in commands:
        source = (ROOT / (module.replace(".", "/") + ".py")).read_text() + common
        for flag in flags:
            if flag.startswith("config."):
                node = config
                for key in flag.split(".")[1:]:
                    assert key in node, f"{module}: --{flag} is not a key of the sharder config"
                    node = node[key]
            else:
                assert re.search(rf"DEFINE_\w+\(\s*\"{flag}\"", source), \
                    f"{module} defines no --{flag}"
