"""The suite's schedule names real groups: a stale name in LONGEST_FIRST would let its group
start last and keep one pytest-xdist worker busy while the other idles."""

from __future__ import annotations

from helpers import REPO
from suite_schedule import LONGEST_FIRST, TRAINED_FIXTURES
from test_commands_as_typed import PLAN, Run, chain


def test_every_group_named_longest_first_exists():
    chains = {f"commands_as_typed:{chain(c)}" for c, plan in PLAN.items() if isinstance(plan, Run)}
    unknown = [group for group in LONGEST_FIRST
               if not ((REPO / group).is_file() or group in TRAINED_FIXTURES or group in chains)]
    assert not unknown, unknown
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
