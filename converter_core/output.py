"""Fail-closed output: everything is written under a temporary name and appears under its real name
only when complete, so an interrupted run never leaves something that looks like a checkpoint."""

import os
import shutil
from pathlib import Path

from converter_core.errors import require


class StagedFolder:
    """A folder built at `<target>.partial` (next to it) and renamed onto `target` by commit()."""

    def __init__(self, target, must_be_new=True):
        self.target = Path(target)
        require(not self.target.exists() or self.target.is_dir(), f"{self.target}: exists and is not a folder")
        if must_be_new:
            require(not self.target.exists() or not any(self.target.iterdir()),
                    f"{self.target}: already exists and is not empty; choose a new --save-dir")
        self.path = self.target.with_name(f".{self.target.name}.partial")
        if self.path.exists():
            shutil.rmtree(self.path)
        self.created_parents = [folder for folder in self.path.parents if not folder.exists()]
        self.path.mkdir(parents=True)

    def commit(self):
        if self.target.exists():
            self.target.rmdir()  # only ever an empty folder here
        os.replace(self.path, self.target)

    def abandon(self):
        """Remove the staged folder, and the folders above it that this run created, if still empty."""
        shutil.rmtree(self.path, ignore_errors=True)
        for folder in self.created_parents:
            try:
                folder.rmdir()
            except OSError:
                break
