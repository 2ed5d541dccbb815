"""A run directory's contents: which files are jaxmlp's, what a directory holds, and how one
run replaces another.

jaxmlp writes five files in a run directory (`checkpoint.RUN_FILES`: run.json, checkpoint.msgpack,
losses.npy, loss.png, metrics.json) and their temporary `.NAME.tmp` while writing them. Those
are the only files it ever removes, and a directory counts as a run only if its run.json
carries jaxmlp's format marker. A `--force` run trains in `OUT.partial` and takes OUT's place
once it has finished, if OUT still holds the run it was planned to replace, byte for byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import NamedTuple

from jaxmlp import checkpoint as ckpt
from jaxmlp.errors import RunError

STAGING, REPLACED = ".partial", ".replaced"  # OUT.partial: a --force run until it finishes


def own_names() -> set[str]:
    """Every name jaxmlp writes in a run directory, temporary files included."""
    return {*ckpt.RUN_FILES, *(f".{name}.tmp" for name in ckpt.RUN_FILES)}


def foreign_entries(directory: Path) -> list[str]:
    """The entries of `directory` that jaxmlp did not write (sorted)."""
    return sorted(set(os.listdir(directory)) - own_names())


def fingerprint(directory: Path) -> str:
    """SHA-256 over the run files of `directory`: the same run, byte for byte, or not."""
    h = hashlib.sha256()
    for name in ckpt.RUN_FILES:
        path = directory / name
        if path.is_file():
            h.update(f"{name}\0".encode())
            h.update(ckpt.read_file(path))
    return h.hexdigest()


def remove_run(directory: Path, keep_dir: bool = False) -> None:
    """Delete the files jaxmlp writes in `directory` (and the directory, if then empty);
    RunError naming anything else in it, which is never touched."""
    foreign = foreign_entries(directory)
    if foreign:
        raise RunError(f"{str(directory)!r} holds {_names(foreign)}, which jaxmlp did not "
                       "write; move them out (jaxmlp removes only its own run files)")
    for name in own_names():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / name)
    if not keep_dir:
        os.rmdir(directory)


def _names(entries: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(e) for e in entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


class Holding(NamedTuple):
    """What a new run's directory holds: "new" (nothing there), "empty", "unstarted" (only
    jaxmlp's files and no checkpoint: a run stopped before its first one) or "run" (a jaxmlp
    run that `force` replaces, with its fingerprint)."""

    kind: str
    fingerprint: str = ""


def check_out_dir(out: Path, force: bool) -> Holding:
    """Validate a new run's directory (nothing is written); see `Holding`.

    Without `force` only a new, empty or unstarted directory is accepted. With it, also a
    jaxmlp run that holds nothing but jaxmlp's own files; never the directory one is in.
    """
    shown, real = str(out), real_path(out)
    for path in (real, staging_dir(real)):
        try:
            os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            pass  # reported below
        except OSError as e:
            raise RunError(f"cannot use --out {shown!r} ({e.strerror}); choose another --out"
                           ) from None
    if real.exists() and not real.is_dir():
        raise RunError(f"--out {shown!r} is a file; choose a directory path")
    if not real.exists():
        parent = next(p for p in real.parents if p.exists())
        if not parent.is_dir():
            raise RunError(f"cannot create --out {shown!r}: {str(parent)!r} is a file; choose "
                           "another --out")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise RunError(f"cannot create --out {shown!r}: no permission to write in "
                           f"{str(parent)!r}; choose another --out")
        return Holding("new")
    if not os.access(real, os.W_OK | os.X_OK):
        raise RunError(f"cannot write in --out {shown!r} (permission denied); choose another "
                       "--out")
    entries = os.listdir(real)
    if not entries:
        return Holding("empty")
    foreign = foreign_entries(real)
    if not foreign and not (real / ckpt.CKPT_FILE).exists() and not ckpt.is_finished(real):
        return Holding("unstarted")
    if not ckpt.is_run_spec(real / ckpt.SPEC_FILE):
        what = ("its run.json is not a jaxmlp run's" if (real / ckpt.SPEC_FILE).exists()
                else f"no {ckpt.SPEC_FILE}")
        raise RunError(f"--out {shown!r} is not empty and holds no jaxmlp run ({what}); choose "
                       "a new or empty directory")
    if not force:
        if ckpt.is_finished(real):
            raise RunError(f"--out {shown!r} already holds a finished run; pass --force to "
                           "replace it (once the new run finishes) or choose another --out")
        raise RunError(f"--out {shown!r} holds an unfinished run; continue it with --resume "
                       f"{shown}, replace it with --force, or choose another --out")
    if foreign:
        raise RunError(f"--force replaces only jaxmlp's own files, and --out {shown!r} also "
                       f"holds {_names(foreign)}; move them out or choose another --out")
    if Path.cwd().resolve().is_relative_to(real):
        raise RunError(f"--force cannot replace --out {shown!r}: it holds the current "
                       "directory; cd out of it, or choose another --out")
    staging = staging_dir(real)
    if staging.exists() and (not staging.is_dir() or foreign_entries(staging)):
        raise RunError(f"{str(staging)!r} is in the way (a --force run trains there first); "
                       "move it away")
    return Holding("run", fingerprint(real))


def real_path(path: str | Path) -> Path:
    """The absolute path with symlinks resolved: a --out that is a link names its target."""
    return Path(os.path.realpath(path))


def staging_dir(out: str | Path) -> Path:
    """Where a --force run trains until it finishes and replaces `out` (a sibling of it)."""
    out = real_path(out)
    return out.with_name(out.name + STAGING)


def replace_run(staging: Path, out: Path, expected: str) -> None:
    """Move the finished run in `staging` to `out`, replacing the run there only if it is
    still the one it was planned to replace (its `fingerprint` is `expected`)."""
    trash = out.with_name(out.name + REPLACED)
    moved_away = RunError(f"--out {str(out)!r} no longer holds the run this --force run "
                          f"replaces (it was changed or moved); the finished run is in "
                          f"{str(staging)!r}: move it where you want it")
    if out.exists():
        with run_lock(out):
            if (not out.is_dir() or foreign_entries(out)
                    or fingerprint(out) != expected):
                raise moved_away
            if trash.exists():
                remove_run(trash)
            os.rename(out, trash)
            os.rename(staging, out)
    else:
        os.rename(staging, out)
    if trash.exists() and fingerprint(trash) == expected:
        remove_run(trash)  # also after a crash between the two renames


@contextlib.contextmanager
def run_lock(run: str | Path):
    """Hold an exclusive advisory lock on a run directory while writing to it.

    The OS drops the lock when the process ends however it ends (even SIGKILL), so a stale
    lock never blocks a resume. A no-op where `fcntl` is missing (Windows).
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(run, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"run directory {str(run)!r} is in use by another jaxmlp process; "
                           "wait for it to finish or stop it first") from None
        yield
    finally:
        os.close(fd)
