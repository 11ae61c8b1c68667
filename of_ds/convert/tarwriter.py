"""A tar writer whose output depends only on the members written: fixed mtime, owner, mode and format."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


class DeterministicTar:
    """Write (name, bytes) members in call order; the same calls give byte-identical files."""

    def __init__(self, path: str | Path):
        self._tar = tarfile.open(path, "w", format=tarfile.GNU_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> "DeterministicTar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
