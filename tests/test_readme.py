"""The README is a front door: short, its config-group table true to `conf/`, and every page
under docs/ linked from it; every relative link of the README and docs/ leads to a file."""

from __future__ import annotations

import re

from helpers import REPO

from ctseg.config import CONFIG_DIR

README = REPO / "README.md"


def group_table(text: str) -> dict[str, set[str]]:
    """group -> options, read from the table under "## Config groups"."""
    section = text.split("## Config groups", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([\w/]+)` \| ([^|]+) \|", section, re.MULTILINE)
    return {group: set(re.findall(r"`([\w-]+)`", options)) for group, options in rows}


def conf_groups() -> dict[str, set[str]]:
    """group -> options, read from the YAML files under conf/."""
    groups: dict[str, set[str]] = {}
    for path in CONFIG_DIR.rglob("*.yaml"):
        group = path.parent.relative_to(CONFIG_DIR).as_posix()
        if group != ".":
            groups.setdefault(group, set()).add(path.stem)
    return groups


def test_the_config_group_table_lists_every_group_and_option_of_conf():
    table = group_table(README.read_text())
    assert len(table) > 10  # the table was found
    assert table == conf_groups()


def test_a_stale_table_is_caught():
    text = README.read_text().replace(", `vista3d_small`", "")
    assert text != README.read_text()
    assert group_table(text) != conf_groups()


def test_the_readme_is_short_and_links_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)\)", text))
    assert linked == {p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md")}


def test_every_relative_link_leads_to_a_file_and_heading():
    pages = [README, *(REPO / "docs").glob("*.md"), *(REPO / "benchmarks").glob("*.md")]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#:\s]*)(#[\w-]+)?\)", page.read_text()):
            path = (page.parent / target[0]).resolve() if target[0] else page
            if not path.exists():
                broken.append(f"{page.name}: {target[0]}")
            elif target[1] and path.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE)
                anchors = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-")
                           for h in headings}
                if target[1][1:] not in anchors:
                    broken.append(f"{page.name}: {target[0]}{target[1]}")
    assert broken == []
