"""Every CLI's --help groups its flags under titles and says each flag's default (or that it is required)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cli

ROOT = Path(__file__).resolve().parent.parent
TOOLS = sorted(str(path.relative_to(ROOT)) for path in [*ROOT.glob("*.py"), *ROOT.glob("scripts/*.py")]
               if "__main__" in path.read_text() and "ArgumentParser" in path.read_text())  # every CLI
TITLES = {"model", "generation", "compile", "quantization", "drafting", "server", "evaluation", "benchmark",
          "training", "output", "diagnostics", "torchrun"}
UNTITLED = {"options", "optional arguments"}  # argparse's own group: -h only (its name before Python 3.10: the latter)


def sections(text: str) -> dict:
    """{group title: [(invocation, help text), ...]} of a --help output, its wrapped lines joined."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.rstrip(":") in UNTITLED)  # the description comes before
    found, blocks = {}, None
    for line in lines[start:]:
        if re.match(r"\S.*:$", line):  # a group's title
            blocks = found.setdefault(line[:-1], [])
        elif re.match(r"  -", line):  # an option's first line: its invocation, then (after 2+ spaces) its help
            invocation, _, help_text = line.strip().partition("  ")
            blocks.append([invocation, help_text.strip()])
        elif line.startswith("   ") and blocks:  # the help, continued (or begun, after a long invocation)
            blocks[-1][1] = f"{blocks[-1][1]} {line.strip()}".strip()
    return {title: [tuple(block) for block in blocks] for title, blocks in found.items()}


def states_default(help_text: str) -> bool:
    return "default" in help_text.lower() or "(required" in help_text


@pytest.mark.slow
@pytest.mark.parametrize("tool", TOOLS)
def test_help_groups_flags_and_says_defaults(tool):
    result = subprocess.run([sys.executable, tool, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    found = sections(result.stdout)
    titled = set(found) - UNTITLED
    assert len(titled) >= 2, f"{tool}: groups {sorted(found)}"
    assert titled <= TITLES, f"{tool}: titles outside the common set: {sorted(titled - TITLES)}"
    untitled = [invocation for title in UNTITLED for invocation, _ in found.get(title, [])]
    assert untitled == ["-h, --help"], f"{tool}: flags in no titled group: {untitled}"
    blocks = [block for title in titled for block in found[title]]
    assert len(blocks) >= 3, f"{tool}: too few options parsed: {blocks}"
    silent = [invocation for invocation, help_text in blocks if not states_default(help_text)]
    assert silent == [], f"{tool}: options whose help says no default: {silent}"


def test_the_formatter_appends_each_kind_of_default():
    parser = cli.ArgumentParser(prog="tool", description="first line\n    kept as written")
    group = parser.add_argument_group("model")
    group.add_argument("--number", type=int, default=3, help="a number, 100%% of it")
    group.add_argument("--switch", action="store_true", help="turn it on")
    group.add_argument("--nothing", help="unset")
    group.add_argument("--needed", required=True)
    group.add_argument("--stated", default=7, help="seven (Default: whatever)")
    group.add_argument("--formatted", default="x", help="an x (%(default)s by default)")
    group.add_argument("--percent", default="50%", help="a share")
    group.add_argument("--bare", default=2)
    found = dict(sections(parser.format_help())["model"])
    assert found == {
        "--number NUMBER": "a number, 100% of it (default: 3)",
        "--switch": "turn it on (default: off)",
        "--nothing NOTHING": "unset (default: none)",
        "--needed NEEDED": "(required)",
        "--stated STATED": "seven (Default: whatever)",
        "--formatted FORMATTED": "an x (x by default)",
        "--percent PERCENT": "a share (default: 50%)",
        "--bare BARE": "(default: 2)",
    }
    assert "first line\n    kept as written" in parser.format_help()  # RawDescriptionHelpFormatter's description
