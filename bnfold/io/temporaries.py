"""The hidden temporary files and folders bnfold writers use, and the removal of those a killed
process left behind.

Every temporary is named ``.bnfold-*`` and, while in use, holds an exclusive ``flock`` (directly,
or through the lock file of the scratch folder or the model temporary it belongs to);
``remove_stale_temporaries`` removes only those older than this process that no live process holds.
"""

from __future__ import annotations

import os
import stat
import tempfile
import time
import warnings

from bnfold.errors import BnfoldWarning

TMP_PREFIX = ".bnfold-"
MODEL_TMP_SUFFIX = ".onnx.tmp"
DATA_TMP_SUFFIX = ".data.tmp"
JSON_TMP_SUFFIX = ".json.tmp"
# The writability probe of ``bnfold.io.paths.check_output_path``, removed as soon as it is made.
PROBE_PREFIX = ".bnfold-probe-"
# Scratch folders (``scratch_directory``) and the lock file that marks one in use.
SCRATCH_PREFIX = ".bnfold-scratch-"
SCRATCH_LOCK_NAME = ".lock"
# Files older than this process cannot be one of its own temporaries.
_PROCESS_START = time.time()


def lock_temporary(fd):
    """Hold an exclusive lock on the temporary file open at ``fd`` until it is closed: the lock
    tells ``remove_stale_temporaries`` of any process that the file is in use. Returns ``fd``."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (ImportError, OSError):  # no flock (Windows, some network file systems): no cleanup either
        pass
    return fd


def _held_by_live_process(path) -> bool:
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def remove_stale_temporaries(directory) -> list:
    """Remove from ``directory`` the temporary files of bnfold writers that were killed
    (SIGKILL, power loss, OOM) before they could clean up; return their paths.

    A temporary is stale when it is older than this process and no live process holds its lock:
    ``.bnfold-*.onnx.tmp`` and ``.bnfold-*.json.tmp`` hold the lock themselves, a
    ``.bnfold-*.data.tmp`` belongs to the ``.onnx.tmp`` of the same name, a
    ``.bnfold-scratch-*`` folder to the lock file inside it, and a ``.bnfold-probe-*`` file (the
    writability probe, removed at once) to nobody. Nothing else is touched."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(TMP_PREFIX):
            continue
        full = os.path.join(directory, name)
        try:
            info = os.lstat(full)
        except OSError:
            continue
        if info.st_mtime >= _PROCESS_START:
            continue
        if stat.S_ISREG(info.st_mode) and name.endswith((MODEL_TMP_SUFFIX, JSON_TMP_SUFFIX)):
            owner = full
        elif stat.S_ISREG(info.st_mode) and name.startswith(PROBE_PREFIX):
            owner = None
        elif stat.S_ISREG(info.st_mode) and name.endswith(DATA_TMP_SUFFIX):
            owner = full[: -len(DATA_TMP_SUFFIX)] + MODEL_TMP_SUFFIX
            if not os.path.exists(owner):
                owner = None
        elif stat.S_ISDIR(info.st_mode) and name.startswith(SCRATCH_PREFIX):
            owner = os.path.join(full, SCRATCH_LOCK_NAME)
            if not os.path.exists(owner):
                owner = None
        else:
            continue
        if owner is not None and _held_by_live_process(owner):
            continue
        try:
            if stat.S_ISDIR(info.st_mode):
                import shutil

                shutil.rmtree(full)
            else:
                os.unlink(full)
            removed.append(full)
        except OSError:
            pass
    if removed:
        warnings.warn(
            f"removed {len(removed)} stale temporary file(s) of an interrupted bnfold run from {directory}",
            BnfoldWarning,
            stacklevel=3,
        )
    return removed


class scratch_directory:
    """A hidden, locked temporary folder in ``directory`` (a context manager giving its path),
    removed on exit; one a killed process left is removed by ``remove_stale_temporaries``."""

    def __init__(self, directory):
        self._directory = directory

    def __enter__(self) -> str:
        self.path = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=self._directory)
        self._lock = lock_temporary(os.open(os.path.join(self.path, SCRATCH_LOCK_NAME), os.O_CREAT | os.O_RDWR, 0o600))
        return self.path

    def __exit__(self, *exc):
        import shutil

        os.close(self._lock)
        shutil.rmtree(self.path, ignore_errors=True)
        return False


def default_permissions(path, like=None) -> None:
    """mkstemp creates files readable by the owner only; outputs get the permissions of the file
    they replace (``like``), else the usual 0666 & ~umask."""
    # One stat, no isfile-then-stat: a concurrent writer of the same output may remove the file
    # replaced (its old data file) at any moment, and then the usual permissions are the answer.
    try:
        like_mode = os.stat(like).st_mode if like is not None else None
    except OSError:
        like_mode = None
    if like_mode is not None and stat.S_ISREG(like_mode):
        os.chmod(path, stat.S_IMODE(like_mode))
        return
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
