"""How every command writes its outputs, so that nothing of the user's is lost and no half-written set remains.

`with Outputs(folder, names, replace=...) as out:` checks everything before any work starts:
- the folder exists or can be made, and is writable (a probe file is written and removed);
- no other cmfast job is writing into it (an exclusive lock on the folder itself, held to the end; the operating
  system drops it when a process dies, so a killed job never blocks the next one);
- each output is new, or `replace` allows it: "own" (the command line's --force) replaces only files that cmfast
  wrote there itself and that nothing changed since (the folder's .cmfast-outputs.json records their size and
  modification time); True (the Python API's overwrite=True) replaces the named files whatever wrote them. A folder
  of the same name as an output, or an output that is one of the command's inputs (`protect`), is always refused;
  no other file in the folder is ever touched.
Then `out.stage(name)` gives the path to write each output to (a hidden temporary in the same folder), and
`out.commit()` moves the whole set into place: first a journal naming every move, then the moves, then the
journal's removal. A run killed during the moves is completed by the next cmfast job in that folder (the journal
is rolled forward, the working files it names removed); temporaries of killed runs are deleted then. Leaving the block without commit() (an error, ^C,
SIGTERM) deletes the temporaries and any folder the block created, so a failed run leaves nothing behind.
File modes follow the umask.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
from pathlib import Path

RECORD = ".cmfast-outputs.json"  # name -> {"size", "mtime_ns"} of the files cmfast wrote in this folder
JOURNAL = ".cmfast-commit.json"  # the moves of a commit in progress
PART = ".cmfast-part-"  # prefix of the temporaries


class OutputError(ValueError):
    """An output that cannot be written as asked; raised before any work is done."""


class OutputExists(OutputError, FileExistsError):
    """An output is there already and may not be replaced."""


def current_umask() -> int:
    mask = os.umask(0o022)  # read by setting: there is no getter
    os.umask(mask)
    return mask


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f"{PART}{os.getpid()}-{secrets.token_hex(4)}-{path.name}")
    try:
        tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish(folder: Path, journal: dict) -> None:
    """Carry out a commit's moves (those not done yet), record the files as cmfast's, drop the journal."""
    record = _read_json(folder / RECORD)
    for part, name in journal.get("moves", []):
        if isinstance(part, str) and isinstance(name, str) and part.startswith(PART) and "/" not in part + name:
            if (folder / part).exists():
                os.replace(folder / part, folder / name)
    record.update({k: v for k, v in journal.get("record", {}).items() if isinstance(v, dict)})
    _write_json(folder / RECORD, record)
    for name in journal.get("drop", []):  # cmfast's own working files that the set replaces (a job's shards)
        if isinstance(name, str) and name.startswith(".cmfast-") and "/" not in name and name != JOURNAL:
            _remove(folder / name)
    (folder / JOURNAL).unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            if child.is_file() or child.is_symlink():
                child.unlink(missing_ok=True)
        try:
            path.rmdir()
        except OSError:
            pass
    else:
        path.unlink(missing_ok=True)


def recover(folder: Path) -> None:
    """What a killed run left: a journal rolled forward, temporaries deleted. Call with the folder's lock held."""
    if (folder / JOURNAL).exists():
        _finish(folder, _read_json(folder / JOURNAL))
    for leftover in folder.glob(f"{PART}*"):
        if leftover.is_file() or leftover.is_symlink():
            leftover.unlink(missing_ok=True)


class Outputs:
    """The files one command writes into one folder, written as a set (see the module docstring)."""

    def __init__(self, folder, names, *, replace: bool | str = False, what: str = "--out", protect=()):
        if replace not in (False, True, "own"):
            raise ValueError(f"replace: expected False, True or 'own', got {replace!r}")
        self.folder, self.names, self.replace, self.what = Path(folder), list(names), replace, what
        self.protect = {Path(p).resolve() for p in protect if p is not None}
        self._staged: dict[str, Path] = {}
        self._created: list[Path] = []
        self._fd: int | None = None
        self._commits = 0

    def _error(self, text: str, kind: type = OutputError) -> OutputError:
        return kind(f"{self.what} {self.folder}: {text}")

    def _make_folder(self) -> None:
        if self.folder.exists() and not self.folder.is_dir():
            raise self._error("exists and is not a folder")
        missing = []
        for p in (self.folder, *self.folder.parents):
            if p.exists():
                break
            missing.append(p)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._error(f"cannot create it ({e.strerror or e})") from None
        self._created = missing  # deepest first

    def _lock(self) -> None:
        self._fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise self._error("another cmfast job is writing into this folder now; wait for it to finish, or "
                              "choose another folder") from None

    def _probe(self) -> None:
        probe = self.folder / f"{PART}{os.getpid()}-probe"
        try:
            probe.write_bytes(b"")
        except OSError as e:
            raise self._error(f"not writable ({e.strerror or e})") from None
        probe.unlink()

    def _owned(self, name: str, path: Path) -> bool:
        entry = _read_json(self.folder / RECORD).get(name)
        if not isinstance(entry, dict) or path.is_symlink():
            return False
        st = path.stat()
        return entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns

    def _check_targets(self) -> None:
        for name in self.names:
            path = self.folder / name
            if path.resolve() in self.protect:
                raise self._error(f"writing {name} there would replace an input of this command; choose another "
                                  "destination")
            if not (path.exists() or path.is_symlink()):
                continue
            if path.is_dir() and not path.is_symlink():
                raise self._error(f"{name} exists and is a folder; cmfast replaces files only")
            if self.replace is True:
                continue
            if self.replace == "own" and not self._owned(name, path):
                raise self._error(f"{name} exists and is not a file cmfast wrote there (or it changed since); "
                                  "--force replaces only cmfast's own outputs: move it away first", OutputExists)
            if not self.replace:
                raise self._error(f"{name} exists (--force replaces it)", OutputExists)

    def __enter__(self) -> "Outputs":
        try:
            self._make_folder()
            self._lock()
            recover(self.folder)
            self._probe()
            self._check_targets()
        except BaseException:
            self._close()
            raise
        return self

    def path(self, name: str) -> Path:
        """Where `name` will be once committed."""
        return self.folder / name

    def stage(self, name: str) -> Path:
        """The temporary to write `name` to; moved into place by commit()."""
        if name not in self.names:
            raise ValueError(f"{name}: not one of this command's outputs ({', '.join(self.names)})")
        if self._fd is None:
            raise RuntimeError("Outputs.stage: outside the with-block")
        part = self.folder / f"{PART}{os.getpid()}-{secrets.token_hex(4)}-{name}"
        self._staged[name] = part
        return part

    def commit(self, drop=()) -> None:
        """Move every staged output into place, as one set. A block may commit again (a training run's checkpoints:
        each a whole set), staging every output anew. drop: names of cmfast's own working files or folders in the
        folder (".cmfast-..."), removed as part of the commit (a killed commit's successor removes them too)."""
        missing = [n for n in self.names if n not in self._staged or not self._staged[n].is_file()]
        if missing:
            raise RuntimeError(f"Outputs.commit: {', '.join(missing)} not written")
        mode = 0o666 & ~current_umask()
        record = {}
        for name, part in self._staged.items():
            os.chmod(part, mode)
            _fsync(part)
            st = part.stat()  # a rename keeps both
            record[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        journal = {"moves": [[p.name, n] for n, p in self._staged.items()], "record": record, "drop": list(drop)}
        _write_json(self.folder / JOURNAL, journal)
        _finish(self.folder, journal)
        os.fsync(self._fd)
        self._staged.clear()
        self._commits += 1

    def _close(self) -> None:
        for part in self._staged.values():  # staged, not committed
            part.unlink(missing_ok=True)
        self._staged.clear()
        if not self._commits:
            for folder in self._created:  # made by this block: removed again if nothing was written
                try:
                    folder.rmdir()
                except OSError:
                    break
        if self._fd is not None:
            os.close(self._fd)  # drops the lock
            self._fd = None

    def __exit__(self, *exc) -> None:
        self._close()


def write_one(path, write, *, replace: bool | str = False, what: str = "output", protect=()) -> Path:
    """One file written through Outputs: write(temporary_path) fills it."""
    path = Path(path)
    with Outputs(path.parent, [path.name], replace=replace, what=what, protect=protect) as out:
        write(out.stage(path.name))
        out.commit()
    return path
