"""Output paths: what `-o` may be, what `--force` may replace, and the work directories of saves.

Checked before the model is loaded, so a bad path costs nothing: `-o` must not be the current
directory, the source model or anything inside or around it; `--force` replaces only a lowbit
artifact (a directory whose `lowbit.json` passes its own checksum), never a model, a plain
directory or a file; the parent must be a writable directory. Saves work in a hidden directory
beside the target, tagged with the saving process's id, so that the ones a killed process left
behind are recognised and removed (or, for a replaced artifact caught mid-swap, put back).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import ArtifactError, LowbitError


class OutputPathError(ArtifactError):
    pass


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def is_artifact(path: Path) -> bool:
    """A real directory holding a lowbit header that passes its own checksum."""
    if path.is_symlink() or not path.is_dir():
        return False
    from ..artifact import read_header  # the header check lives with the artifact

    try:
        read_header(path, verify=False)
    except LowbitError:
        return False
    return True


def check_output(out: Path, *, force: bool, sources: tuple[Path, ...] = (), what: str = "output") -> None:
    """Refuse an output path that would lose the user's data or fail only after the work is done."""
    target = Path(os.path.abspath(out.expanduser()))
    real = target.resolve()
    cwd = Path.cwd().resolve()
    if _inside(cwd, real):
        raise OutputPathError(f"{what} {out} is the current directory or holds it; give a new directory name, e.g. -o out/model-int4")
    for src in sources:
        s = Path(os.path.abspath(src.expanduser())).resolve()
        if _inside(real, s) or _inside(s, real):
            raise OutputPathError(
                f"{what} {out} is the source model {src}, inside it or around it; write the artifact elsewhere (the source is never replaced)"
            )
    if target.is_symlink() or target.exists():
        if not force:
            raise OutputPathError(f"{out} already exists; choose another output directory or pass --force to replace it")
        if not is_artifact(target):
            kind = "a file" if target.is_file() else "a symbolic link" if target.is_symlink() else "a directory that is not a lowbit artifact"
            raise OutputPathError(f"--force replaces only a lowbit artifact, and {out} is {kind}; choose another output path")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot create {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot create {out}: {parent} is not writable; choose a writable location")


def check_output_file(out: Path, *, force: bool) -> None:
    """For a single-file output (an export): never replace a directory; a file only with force."""
    target = Path(os.path.abspath(out.expanduser()))
    if target.is_dir():
        raise OutputPathError(f"{out} is a directory; give a file name")
    if target.exists() and not force:
        raise OutputPathError(f"{out} already exists; choose another file name or pass --force to replace it")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot create {out}: {parent} is not a writable directory")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_work_dir(out: Path, suffix: str = ".tmp") -> Path:
    """A hidden directory beside `out`, tagged with this process's id, with the umask's mode
    (mkdtemp's 0700 would make the artifact private)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.lowbit-{os.getpid()}-", suffix=suffix, dir=out.parent))
    work.chmod(0o777 & ~_umask())
    return work


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_work_dirs(out: Path) -> list[Path]:
    """Remove the work directories that killed saves of `out` left beside it (their process is
    gone); an old artifact moved aside by an interrupted `--force` swap is put back if `out` is
    missing. Returns what was removed. Untagged `.NAME.XXXXXXXX.tmp` directories (saves before
    tagging) count as stale too."""
    if not out.parent.is_dir():
        return []
    tagged = re.compile(rf"^\.{re.escape(out.name)}\.lowbit-(\d+)-[A-Za-z0-9_]+\.(tmp|old)$")
    legacy = re.compile(rf"^\.{re.escape(out.name)}\.[A-Za-z0-9_]{{8}}\.(tmp|old)$")
    removed = []
    for entry in sorted(out.parent.iterdir()):
        m = tagged.match(entry.name) or legacy.match(entry.name)
        if not m or entry.is_symlink() or not entry.is_dir():
            continue
        if m.re is tagged and _alive(int(m.group(1))):
            continue
        kept = entry / out.name
        if entry.name.endswith(".old") and kept.is_dir() and not out.exists():
            os.replace(kept, out)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def swap_into_place(work: Path, out: Path) -> None:
    """Rename the finished work directory to `out`; an existing `out` (already checked to be
    replaceable) is moved aside first and deleted only once the new one is in place."""
    if out.exists():
        backup = make_work_dir(out, suffix=".old")
        os.replace(out, backup / out.name)
        os.replace(work, out)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(work, out)
