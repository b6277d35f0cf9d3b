"""The README's commands, pasted into a fresh clone in the order a user reads them.

Every fenced `bash` and `python` block of README.md runs, in one bash session (so the Quickstart's
`source .venv/bin/activate`, a variable set in one block and a server started in the background stay for
the blocks after it), in a copy of the working tree with nothing built in it: no checkpoints, no compiled
steps. A block is left out by a marker on the line before it, `<!-- readme-test: skip (why) -->` (a GPU,
torchrun, the hub, or minutes of work); `<!-- readme-test: server -->` and `<!-- readme-test: client -->`
mark the server's block (it leaves the server running in the background) and the Python client's. The
copy's `.venv` is this interpreter's virtual environment: the Quickstart's setup.sh finds its packages
installed and its native kernels built, as on a machine that ran it before.
"""
import os
import re
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!--\s*readme-test:\s*(\w+)")
TIMEOUT_S = 1500


def readme_blocks(text: str) -> list:
    """(line number, language, code, marker or None) of each fenced bash/python block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^```(bash|python)\s*$", lines[i])
        if fence:
            start = i
            i += 1
            while not lines[i].startswith("```"):
                i += 1
            marker = MARKER.search(lines[start - 1]) if start else None
            blocks.append((start + 1, fence.group(1), "\n".join(lines[start + 1:i]), marker and marker.group(1)))
        i += 1
    return blocks


def test_readme_blocks_are_marked_as_the_test_expects():
    """Markers name what this test knows; the Quickstart is a bash block that runs."""
    blocks = readme_blocks((ROOT / "README.md").read_text())
    assert {marker for *_, marker in blocks} <= {None, "skip", "server", "client"}
    assert blocks[0][1] == "bash" and blocks[0][3] is None and "scripts/setup.sh" in blocks[0][2]
    assert sum(marker is None or marker in ("server", "client") for *_, marker in blocks) >= 8


def session_script(blocks: list, folder: Path) -> str:
    """One bash script: each runnable block after a line naming it; a failing command ends the script."""
    parts = ["set -eo pipefail"]
    for number, (line, language, code, marker) in enumerate(blocks):
        if marker == "skip":
            continue
        parts.append(f"echo \">>> README block at line {line} (${{SECONDS}} s)\" >&2")
        if language == "python":
            path = folder / f"readme_block_{number}.py"
            path.write_text(code + "\n")
            parts.append(f"python {path}")
        else:
            parts.append(code)
    return "\n".join(parts + ['echo ">>> done (${SECONDS} s)" >&2']) + "\n"


def fresh_copy(target: Path):
    """The files of the working tree that git tracks or would track (what a clone of it after a commit has)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: no fresh copy to make")
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


@pytest.mark.slow
def test_readme_commands_work_in_a_fresh_copy(tmp_path):
    if not (Path(sys.prefix) / "bin" / "activate").exists():
        pytest.skip("the tests run outside a virtual environment: the Quickstart's .venv cannot be this one")
    clone = tmp_path / "clone"
    clone.mkdir()
    fresh_copy(clone)
    (clone / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    script = session_script(readme_blocks((clone / "README.md").read_text()), tmp_path)
    environment = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    log = tmp_path / "session.log"  # a file, not a pipe: the server left in the background holds its output open
    with open(log, "w") as output_file:
        process = subprocess.Popen(["bash", "-c", script], cwd=clone, env=environment, stdout=output_file,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        finally:
            try:
                os.killpg(process.pid, signal.SIGTERM)  # the server the README leaves running, and anything else
            except ProcessLookupError:
                pass
    output = log.read_text(errors="replace")
    print("\n".join(line for line in output.splitlines() if line.startswith(">>> ")))  # each block's start time
    assert process.returncode != -signal.SIGKILL, f"the README's commands did not finish in {TIMEOUT_S} s:\n{output[-6000:]}"
    assert process.returncode == 0, f"a README command failed (exit {process.returncode}):\n{output[-6000:]}"
    assert "Paris" in output  # the Quickstart's answer (and the server's)
    assert "\"choices\"" in output  # the curl call got a completion


def heading_anchors(markdown: str) -> set:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("name", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_and_their_anchors_resolve(name):
    path = ROOT / name
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{name} links to {target}: no such file"
        if anchor and linked.suffix == ".md":
            assert anchor in heading_anchors(linked.read_text()), f"{name} links to {target}: no such heading"
