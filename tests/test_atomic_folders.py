"""Multi-file outputs are swapped in whole (`swapped_folder`): a rewrite leaves no stale file, a
process SIGKILLed between any two steps leaves the old or the new folder whole, and the same
command run again finishes the work and removes every leftover; scratch folders carry the
cleanup mark; no module of ctseg makes a temporary folder any other way."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

from ctseg.atomic import ASIDE, TEMP_MARK, remove_leftovers, swapped_folder
from ctseg.errors import ConfigError

OLD = {"a.txt": "old a", "stale.txt": "old stale", "sub/deep.txt": "old deep"}
NEW = {"a.txt": "new a", "b.txt": "new b", "sub/deep.txt": "new deep"}

# Writes NEW as folder argv[1] with swapped_folder; pauses (touching argv[3], then sleeping until
# killed) where argv[2] says: while writing, before the rename of the old folder aside (the
# first os.rename), before the rename of the new one in (the second), before the old one is
# deleted (shutil.rmtree); "none" runs to the end. Python's audit hooks see each call before it
# runs; nothing of the os module is replaced.
WRITER = f"""
import sys, time
from pathlib import Path
from ctseg.atomic import swapped_folder

target, stage, flag = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
NEW = {NEW!r}
renames = 0


def pause():
    flag.write_text("paused")
    time.sleep(600)


def hook(event, args):
    global renames
    if event == "os.rename" and Path(args[1]).parent == target.parent:  # not an import's .pyc
        renames += 1
        if (stage, renames) in (("aside", 1), ("swap", 2)):
            pause()
    elif event == "shutil.rmtree" and stage == "delete":
        pause()


sys.addaudithook(hook)
with swapped_folder(target) as tmp:
    for name, text in NEW.items():
        (tmp / name).parent.mkdir(exist_ok=True)
        (tmp / name).write_text(text)
    if stage == "writing":
        pause()
"""


def content(folder: Path) -> dict[str, str]:
    """Every file under `folder` by its relative path, with its text."""
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def write(folder: Path, files: dict[str, str]) -> None:
    """Create `folder` holding `files`."""
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def writer(target: Path, stage: str, flag: Path) -> subprocess.Popen:
    """The writer process of WRITER."""
    return subprocess.Popen([sys.executable, "-c", WRITER, str(target), stage, str(flag)],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)


def test_a_rewrite_replaces_the_whole_folder(tmp_path):
    target = tmp_path / "out"
    write(target, OLD)
    umask = os.umask(0o022)
    try:
        with swapped_folder(target) as tmp:
            write(tmp, NEW)
    finally:
        os.umask(umask)
    assert content(target) == NEW  # stale.txt and the old deep.txt are gone
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o755  # not mkdtemp's 0700


def test_kept_entries_survive_and_a_foreign_folder_is_refused(tmp_path):
    target = tmp_path / "out"
    write(target, {**OLD, "wandb/run/log.txt": "other writer"})
    with swapped_folder(target, keep=("wandb", "missing")) as tmp:
        write(tmp, NEW)
    assert content(target) == {**NEW, "wandb/run/log.txt": "other writer"}
    foreign = tmp_path / "mine"
    write(foreign, {"notes.txt": "keep me"})
    with pytest.raises(ConfigError, match=rf"^{foreign}: exists and is not an output of this "
                                          r"command \(no summary.json in it\)"), \
            swapped_folder(foreign, own="summary.json") as tmp:
        write(tmp, NEW)
    assert content(foreign) == {"notes.txt": "keep me"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]


@pytest.mark.parametrize("stage", ["writing", "aside", "swap", "delete"])
def test_a_kill_between_steps_leaves_a_whole_folder_and_a_rerun_finishes(tmp_path, stage):
    """SIGKILL at each step of the swap; the old or the new folder is whole (between the two
    renames: the old one, under its marked name, which `remove_leftovers` renames back); the
    same command run again writes the new folder and no temporary stays."""
    target = tmp_path / "out"
    write(target, OLD)
    flag = tmp_path.parent / f"{tmp_path.name}.flag"
    proc = writer(target, stage, flag)
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    leftovers = [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]
    assert leftovers
    if stage == "swap":
        assert not target.exists()
        (aside,) = [p for p in leftovers if p.name.endswith(ASIDE)]
        assert content(aside) == OLD
        assert remove_leftovers(tmp_path) == sorted(leftovers)  # a reader's cleanup
        assert content(target) == OLD
    else:
        assert content(target) == (NEW if stage == "delete" else OLD)
    again = writer(target, "none", flag)
    assert again.wait(timeout=120) == 0, again.stderr.read()
    assert content(target) == NEW
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


SCRATCH = """
import sys, time
from ctseg.atomic import scratch_folder

with scratch_folder("work") as folder:
    (folder / "part.bin").write_bytes(b"0" * 1000)
    print(folder, flush=True)
    if sys.argv[1] == "pause":
        time.sleep(600)
"""


def test_a_killed_scratch_folder_is_removed_by_the_next_one(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", SCRATCH, "pause"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)
    left = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert left.parent == tmp_path and TEMP_MARK in left.name and (left / "part.bin").is_file()
    subprocess.run([sys.executable, "-c", SCRATCH, "go"], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=120)
    assert list(tmp_path.iterdir()) == []


def test_only_the_atomic_module_makes_temporary_folders():
    """Every temporary folder or file of ctseg is named by ctseg.atomic (TEMP_MARK), so a kill
    never leaves one that the next run does not recognise."""
    unmarked = re.compile(r"TemporaryDirectory\(|mkdtemp\(|gettempdir\(|"
                          r"(?:mkstemp|NamedTemporaryFile)\((?![^)]*temp_prefix)")
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
             for path in sorted((REPO / "ctseg").rglob("*.py")) if path.name != "atomic.py"
             for number, line in enumerate(path.read_text().splitlines(), start=1)
             if unmarked.search(line)]
    assert found == []
