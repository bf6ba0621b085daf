"""Loss-free storage: atomic files, content hashes and an append-only manifest per rank.

A file counts as done only when the manifest records it with its SHA-256 and the file on
disk still has that hash (and, for images, decodes at the expected size). Everything is
written to a temporary name first and moved into place with ``os.replace``, so a crash
leaves either the old file, the new one, or a stray ``.partial`` that nothing reads.
Each rank appends to its own manifest file, so ranks never write the same file; readers
take the union of all of them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST_GLOB = "manifest-rank*.jsonl"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str | None:
    try:
        return sha256_bytes(path.read_bytes())
    except OSError:
        return None


def atomic_write_bytes(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` via a flushed temporary file; return its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return sha256_bytes(data)


def atomic_write_json(path: Path, data: Any) -> str:
    text = json.dumps(data, indent=1, sort_keys=True, default=_json_default) + "\n"
    return atomic_write_bytes(path, text.encode())


def atomic_write_image(path: Path, image) -> str:
    """A PIL image as PNG (lossless, so metrics read back exactly what was generated)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


def atomic_write_array(path: Path, array) -> str:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return atomic_write_bytes(path, buffer.getvalue())


def load_array(path: Path):
    import numpy as np

    return np.load(path, allow_pickle=False)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def image_is_valid(path: Path, size: tuple[int, int] | None = None) -> bool:
    """The file decodes completely as an image (of ``size`` = (width, height) if given)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return size is None or image.size == tuple(size)
    except Exception:  # truncated, empty or not an image at all: redo it
        return False


class Manifest:
    """Append-only JSONL records ``{"kind", "item", "files": {role: {"path", "sha256"}}, ...}``.

    ``root``: the run folder. This process appends to ``manifest-rank{rank}.jsonl``; lookups
    read every rank's file. The last record of a (kind, item) pair wins.
    """

    def __init__(self, root: Path, rank: int = 0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / f"manifest-rank{rank:05d}.jsonl"
        self._records: dict[tuple[str, str], dict[str, Any]] = {}
        self.reload()

    def reload(self) -> None:
        self._records = {}
        for path in sorted(self.root.glob(MANIFEST_GLOB)):
            for record in _read_jsonl(path):
                self._records[(record["kind"], record["item"])] = record

    def records(self, kind: str) -> dict[str, dict[str, Any]]:
        return {item: r for (k, item), r in self._records.items() if k == kind}

    def get(self, kind: str, item: str) -> dict[str, Any] | None:
        return self._records.get((kind, item))

    def append(self, record: dict[str, Any]) -> None:
        """One line, written with a single ``write`` and fsynced before returning."""
        line = json.dumps(record, sort_keys=True, default=_json_default) + "\n"
        if _ends_without_newline(self.path):
            line = "\n" + line  # close a line torn by a crash so this record stays whole
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self._records[(record["kind"], record["item"])] = record

    def verified(self, kind: str, item: str, fingerprint: str,
                 image_size: tuple[int, int] | None = None) -> dict[str, Any] | None:
        """The record if every file it names is intact and it was made for ``fingerprint``."""
        record = self.get(kind, item)
        if record is None or record.get("fingerprint") != fingerprint:
            return None
        for role, entry in record.get("files", {}).items():
            path = self.root / entry["path"]
            if sha256_file(path) != entry["sha256"]:
                return None
            if role == "image" and not image_is_valid(path, image_size):
                return None
        return record


def _ends_without_newline(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return False
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"
    except FileNotFoundError:
        return False


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of one manifest; a torn last line from a crash is skipped with a warning."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{number}: an incomplete manifest line (interrupted write) "
                              "was ignored; its item will be redone", stacklevel=3)
                continue
            if isinstance(record, dict) and "kind" in record and "item" in record:
                yield record
