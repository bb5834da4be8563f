"""The training corpus: the Python standard library source of the running interpreter.

Every machine with Python has it offline. Files are split by a hash of their path relative to the
stdlib root, so the split does not depend on the order files are listed or on the machine; the
list's hash and the Python version go into the checkpoint's metadata so a different standard
library is noticed, not silently mixed in.
"""
from __future__ import annotations

import dataclasses
import hashlib
import platform
import sysconfig
from pathlib import Path

SPLITS = ("train", "validation", "test")
# Per mille of files in validation and test; the rest train.
HELD_OUT_PER_MILLE = {"validation": 25, "test": 50}
# Third-party packages are not the standard library.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The stdlib's .py files by split; ``fingerprint`` is the SHA-256 of the sorted path list."""

    root: Path
    files: dict[str, tuple[str, ...]]
    fingerprint: str
    python_version: str

    def texts(self, split: str) -> list[str]:
        if split not in self.files:
            raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        return [_read(self.root / rel) for rel in self.files[split]]

    def metadata(self) -> dict:
        return {
            "source": "Python standard library (.py files), PSF licence",
            "root": str(self.root), "python_version": self.python_version, "file_list_sha256": self.fingerprint,
            "split_rule": ("sha256(relative path) mod 1000: < 25 validation, < 75 test, else train; "
                           f"directories {sorted(EXCLUDED_DIRS)} excluded"),
            "files": {split: len(names) for split, names in self.files.items()},
            "bytes": {split: sum((self.root / r).stat().st_size for r in names) for split, names in self.files.items()},
        }

    def differences(self, recorded: dict) -> list[str]:
        """What differs from a checkpoint's recorded corpus metadata (empty when the same)."""
        out = []
        if recorded.get("python_version") != self.python_version:
            out.append(f"Python {self.python_version} here, {recorded.get('python_version')} when trained")
        if recorded.get("file_list_sha256") != self.fingerprint:
            out.append("the standard library's file list differs from the one the model was trained on "
                       f"({sum(len(v) for v in self.files.values())} files here)")
        return out


def split_of(relative_path: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "little") % 1000
    if bucket < HELD_OUT_PER_MILLE["validation"]:
        return "validation"
    if bucket < HELD_OUT_PER_MILLE["validation"] + HELD_OUT_PER_MILLE["test"]:
        return "test"
    return "train"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def load_corpus(root: Path | None = None) -> Corpus:
    """The corpus under ``root`` (default: this interpreter's standard library)."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"corpus root {root} is not a directory")
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if p.is_file() and not EXCLUDED_DIRS & set(p.relative_to(root).parts))
    if not paths:
        raise ValueError(f"no .py files under {root}")
    files = {split: tuple(p for p in paths if split_of(p) == split) for split in SPLITS}
    fingerprint = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    return Corpus(root, files, fingerprint, platform.python_version())


def _read(path: Path) -> str:
    # A few stdlib files are not UTF-8 on purpose (encoding tests): keep their bytes as U+FFFD.
    return path.read_bytes().decode("utf-8", errors="replace")
