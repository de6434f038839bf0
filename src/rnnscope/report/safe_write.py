"""Contained, atomic writes into an output folder (--out): the one way rnnscope writes files.

Rules, for every command that writes (compare, inspect, experiment, replot, plot-log):

- Every target is checked before any work: a command names all the files it may write, and
  refuses at once, listing them, if any of them exists and `overwrite` is False.
- Nothing is written through a symlink. Inside the folder, a subfolder (e.g. figures/) that is
  a symlink is refused always, since writing into it would land outside the folder. A target
  file that is a symlink (dangling or not) counts as an existing file: without `overwrite` it
  is refused; with `overwrite` the link itself is replaced by a regular file, and whatever it
  pointed to is left untouched. The folder itself (the --out the user named) may be a symlink
  to a folder: that is where the user asked the files to go.
- Every file is first written to a fresh temporary name in its own folder (created with
  O_CREAT|O_EXCL, so it can never be an existing file or a link) and then renamed over the
  target with os.replace, which replaces a directory entry and never follows a link. A crash
  leaves either the old file or the new one, never half of one; the temporary file is removed
  if writing fails.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from pathlib import Path

_SHOWN = 4  # at most this many existing files are named in a refusal


class OutputFolderError(OSError):
    """The output folder cannot be written safely (a symlinked subfolder, a file in the way)."""

    def __str__(self) -> str:  # OSError would prefix "[Errno ...]" for two-argument forms
        return self.args[0] if self.args else ""


class OutputFolder:
    """A folder rnnscope writes into, with every target checked first and written atomically.

    Example:
        >>> import tempfile
        >>> out = OutputFolder(tempfile.mkdtemp(), overwrite=False, option="--out")
        >>> out.check(["results.json", "figures/a.png"])
        >>> p = out.write_text("results.json", "{}")
        >>> p.read_text()
        '{}'

    Args:
        root: the folder; created (with its parents) on the first write.
        overwrite: whether existing targets may be replaced.
        option: how the user named the folder, for messages (e.g. "--out").
    """

    def __init__(self, root, *, overwrite: bool, option: str = "--out"):
        self.root = Path(root)
        self.overwrite = overwrite
        self.option = option

    # ---- checks ---------------------------------------------------------------------------

    def path(self, relative: str) -> Path:
        """The target for `relative` ("results.json", "figures/x.png"), refused if it could
        leave the folder (absolute, "..", empty components)."""
        parts = relative.split("/")
        if any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
            raise OutputFolderError(f"refusing to write {relative!r}: not a plain name inside "
                                    f"{self.option} {self.root}")
        return self.root.joinpath(*parts)

    def check(self, targets: Iterable[str]) -> None:
        """Refuse now, before any work, if any target cannot be written or would be replaced
        without `overwrite`.

        Raises:
            OutputFolderError: the folder or a subfolder on the way is not a real folder (a
                file, or a symlink inside the folder).
            FileExistsError: targets exist (files or symlinks) and `overwrite` is False; all of
                them are counted, a few named.
        """
        if self.root.exists() and not self.root.is_dir():
            raise OutputFolderError(f"{self.option} {self.root} exists and is not a folder")
        if self.root.is_symlink() and not self.root.exists():
            raise OutputFolderError(f"{self.option} {self.root} is a symlink to "
                                    f"{os.readlink(self.root)}, which does not exist; create "
                                    f"that folder or choose another {self.option}")
        existing = []
        for rel in dict.fromkeys(targets):
            target = self.path(rel)
            self._check_folders(target.parent)
            if os.path.lexists(target):
                if target.is_dir() and not target.is_symlink():
                    raise OutputFolderError(f"{target} is a folder; rnnscope writes a file "
                                            f"there. Move it away or choose another "
                                            f"{self.option}")
                existing.append(target)
        if existing and not self.overwrite:
            links = [p for p in existing if p.is_symlink()]
            shown = ", ".join(str(p) for p in existing[:_SHOWN])
            more = f" and {len(existing) - _SHOWN} more" if len(existing) > _SHOWN else ""
            note = (f" ({len(links)} of them symlinks: --overwrite replaces the link itself, "
                    f"never the file it points to)" if links else "")
            verb = "exists" if len(existing) == 1 else "exist"
            raise FileExistsError(f"{shown}{more} already {verb}{note}; pass --overwrite (or "
                                  f"choose another {self.option}) to replace "
                                  f"{'it' if len(existing) == 1 else 'them'}")

    def _check_folders(self, folder: Path) -> None:
        """Every folder between the root and `folder` must be a real folder, not a symlink."""
        rel = folder.relative_to(self.root)
        cur = self.root
        for part in rel.parts:
            cur = cur / part
            if cur.is_symlink():
                raise OutputFolderError(f"{cur} is a symlink (to {os.readlink(cur)}); rnnscope "
                                        f"writes only inside {self.option} {self.root} and does "
                                        f"not follow links out of it. Remove the link or choose "
                                        f"another {self.option}")
            if cur.exists() and not cur.is_dir():
                raise OutputFolderError(f"{cur} is a file where rnnscope needs a folder; move "
                                        f"it away or choose another {self.option}")

    # ---- writes ---------------------------------------------------------------------------

    def write_bytes(self, relative: str, data: bytes) -> Path:
        """Write `data` to the target atomically (temporary name, then os.replace)."""
        target = self.path(relative)
        self.check([relative])  # the folder may have changed since the first check
        target.parent.mkdir(parents=True, exist_ok=True)
        self._check_folders(target.parent)  # mkdir follows an existing link: look again
        tmp, fd = self._temporary(target)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return target

    def write_text(self, relative: str, text: str) -> Path:
        return self.write_bytes(relative, text.encode("utf-8"))

    def remove(self, relative: str) -> None:
        """Remove a target of an earlier run (only with overwrite); a link is removed, never
        what it points to."""
        target = self.path(relative)
        if not self.overwrite:
            raise FileExistsError(f"{target} exists; pass --overwrite")
        self._check_folders(target.parent)
        if os.path.lexists(target) and not (target.is_dir() and not target.is_symlink()):
            os.unlink(target)

    @staticmethod
    def _temporary(target: Path) -> tuple[Path, int]:
        """A new file next to `target`: O_EXCL makes sure it is fresh (never a link), and the
        mode 0o666 lets the umask set the permissions a plain open() would give."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(
            os, "O_BINARY", 0)
        for _ in range(100):
            tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
            try:
                return tmp, os.open(tmp, flags, 0o666)
            except FileExistsError:
                continue
        raise OutputFolderError(f"cannot create a temporary file next to {target}")
