"""Build hook: the wheel carries the clone's top-level `conf/` as `ctseg/conf` (see pyproject)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithConfigs(build_py):
    """`build_py` that also copies `conf/` (every YAML of the config tree) into the package."""

    def run(self) -> None:
        """Build the package, then copy the config tree beside its modules."""
        super().run()
        if not self.editable_mode:  # an editable install reads <clone>/conf itself
            self.copy_tree("conf", str(Path(self.build_lib) / "ctseg" / "conf"))


setup(cmdclass={"build_py": BuildWithConfigs})
