"""Fail-closed output: everything is written under a temporary name and appears under its real name
only when complete and on disk, so an interrupted, cancelled or colliding run never leaves something
that looks like a checkpoint, and never touches what another run is writing."""

import contextlib
import ctypes
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from converter_core.errors import ConversionError, Interrupted, require

# The pid of the process that asked for the output; a child whose parent has gone does not commit.
_owner_pid = None


def set_owner(pid):
    global _owner_pid
    _owner_pid = pid


def still_wanted():
    return _owner_pid is None or os.getppid() == _owner_pid


def fsync_path(path):
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def start_writeback(fd, offset, length):
    """Have the kernel start writing [offset, offset + length) of `fd` to the disk now, without waiting:
    the disk then works while the conversion goes on, and the fsync at commit finds little left to do.
    Linux's sync_file_range; elsewhere (or if it fails) the fsync does it all, as before."""
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def _load_sync_file_range():
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


SYNC_FILE_RANGE_WRITE = 2
_sync_file_range = _load_sync_file_range()


def fsync_tree(folder):
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def _created_parents(path):
    """The folders above `path` that do not exist yet, deepest first."""
    return [folder for folder in Path(path).parents if not folder.exists()]


def _remove_if_empty(folders):
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def _chmod_as_umask(path, mode):
    """mkstemp/mkdtemp make private files; the output gets the modes a plain open/mkdir would give."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def write_atomically(path, text):
    """Replace `path` in one step by a file holding `text`. The temporary file is created exclusively
    under a fresh name (a planted file or symlink is never followed) and is on disk before the rename."""
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        _chmod_as_umask(temporary, 0o666)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        require(still_wanted(), f"{path}: the run was cancelled; not writing it")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


@contextlib.contextmanager
def writing(path):
    """Turns a failed write (disk full, read-only or over quota, including the bare RuntimeError
    torch's zip writer raises for them) into one line naming the file."""
    try:
        yield
    except ConversionError:
        raise
    except (OSError, RuntimeError) as error:
        raise ConversionError(f"{path}: cannot write ({_write_failure(path, error)})") from None


def _write_failure(path, error):
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    try:
        disk = os.statvfs(Path(path).parent)
    except OSError:
        disk = None
    if disk and disk.f_flag & os.ST_RDONLY:
        return "read-only file system"
    if disk and disk.f_bavail == 0:
        return "no space left on device"
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# Stop signals that arrived while a cleanup ran (None when none is running): our handler
# (orchestrator) parks them here, so a stop cannot cut a cleanup in half.
_deferred_signals = None


def defer_signal(signum):
    """True if a cleanup is running and `signum` was parked until it ends."""
    if _deferred_signals is None:
        return False
    _deferred_signals.append(signum)
    return True


@contextlib.contextmanager
def signals_deferred():
    global _deferred_signals
    _deferred_signals = []
    try:
        yield
    finally:
        pending, _deferred_signals = _deferred_signals, None
        if pending:
            raise Interrupted(pending[0])


class StagedFolder:
    """A folder built under a unique hidden name next to `target` and renamed onto it by commit()."""

    def __init__(self, target, must_be_new=True):
        self.target = Path(target)
        require(not self.target.is_symlink(), f"{self.target}: is a symbolic link; choose a real --save-dir")
        require(not self.target.exists() or self.target.is_dir(), f"{self.target}: exists and is not a folder")
        if must_be_new:
            require(not self.target.exists() or not any(self.target.iterdir()),
                    f"{self.target}: already exists and is not empty; choose a new --save-dir")
        self.created_parents = _created_parents(self.target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))
        _chmod_as_umask(self.path, 0o777)

    def commit(self):
        """Make the output appear, once all of it is on disk, unless the run is no longer wanted."""
        require(still_wanted(), f"{self.target}: the run was cancelled; output not committed")
        fsync_tree(self.path)
        if self.target.exists():
            self.target.rmdir()  # only ever an empty folder here
        os.replace(self.path, self.target)
        fsync_path(self.target.parent)

    def abandon(self):
        """Remove the staged folder, and the folders above it that this run created, if still empty.
        A stop signal arriving meanwhile waits until that is done, so it cannot leave half a folder."""
        with signals_deferred():
            shutil.rmtree(self.path, ignore_errors=True)
            _remove_if_empty(self.created_parents)


class SaveDirLock:
    """An exclusive lock on --save-dir for the whole run, held by the parent (and inherited by its
    children): a second conversion into the same folder is refused instead of mixing files."""

    def __init__(self, save_dir):
        target = Path(os.path.abspath(save_dir))
        self.created_parents = _created_parents(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.path = target.parent / f".{target.name}.converter_core.lock"
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            _remove_if_empty(self.created_parents)
            raise ConversionError(f"{self.path}: cannot create the --save-dir lock ({error.strerror})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ConversionError(f"{save_dir}: another conversion is writing there (it holds {self.path}); "
                                  "wait for it to end or choose another --save-dir") from None

    def release(self):
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        _remove_if_empty(self.created_parents)
