"""Fail-closed output: everything is written under a temporary name and appears under its real name
only when complete and on disk, so an interrupted, cancelled or colliding run never leaves something
that looks like a checkpoint, and never touches what another run is writing."""

import contextlib
import ctypes
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path

from converter_core import dry_run, file_refs
from converter_core.errors import ConversionError, Interrupted, require

RUNNING, COMMITTING, WITHDRAWN = 0, 1, 2


class CommitGate:
    """A run's commit gate, which the orchestrator puts on its saver's args (commit_gate(args)): a
    multiprocessing Value shared with the process that asked for the output, RUNNING until the saver
    claims it to commit or the owner withdraws the run (cancel, stop signal), whichever comes first, so a
    run is either committed or cancelled, never both. `owner_pid`: the parent the saver's process must
    still have when it commits (None: any); a child whose parent has gone does not commit."""

    def __init__(self, value, owner_pid=None):
        self.value, self.owner_pid = value, owner_pid

    def still_wanted(self):
        return self.owner_pid is None or os.getppid() == self.owner_pid

    def claim(self, target):
        """Called right before the output appears: from here on the run completes even if it is cancelled."""
        require(self.still_wanted(), f"{target}: the run was cancelled; output not committed")
        with self.value.get_lock():
            require(self.value.value != WITHDRAWN, f"{target}: the run was cancelled; output not committed")
            self.value.value = COMMITTING

    def withdraw(self):
        """The owner's side: True if the run is withdrawn (nothing will be committed), False if the saver
        is already committing it."""
        with self.value.get_lock():
            if self.value.value == COMMITTING:
                return False
            self.value.value = WITHDRAWN
            return True

    def committing(self):
        return self.value.get_obj().value == COMMITTING  # without the lock: a signal handler may ask inside claim


COMMIT_GATE = "commit_gate"  # the args attribute the orchestrator sets on a side's args


def commit_gate(args):
    """The run's CommitGate from a saver's args, for StagedFolder and write_atomically (None outside an
    orchestrated run: nothing to race with)."""
    return getattr(args, COMMIT_GATE, None)


def _claim(gate, target):
    if gate is not None:
        gate.claim(target)


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


def write_atomically(path, text, gate=None):
    """Replace `path` in one step by a file holding `text`. The temporary file is created exclusively
    under a fresh name (a planted file or symlink is never followed) and is on disk before the rename.
    `gate`: the run's commit_gate(args), claimed before the rename."""
    path = Path(dry_run.mirror(path))  # a dry run writes its scratch mirror only
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        _chmod_as_umask(temporary, 0o666)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        _claim(gate, path)
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


def defer_signal(signum, gate=None):
    """True if a cleanup is running and `signum` was parked until it ends, or if the run is committing
    its output through `gate`, when a stop comes too late and is dropped (the run completes)."""
    if gate is not None and gate.committing():
        return True
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
    """A folder built under a unique hidden name next to `target` and renamed onto it by commit().
    With `job` (a Share's job id) the name is the job's, `.{target name}.partial-{job}`, the same on every
    rank of the job, and whichever rank comes first creates it. `gate`: the run's commit_gate(args),
    claimed by commit(), so a run cancelled meanwhile never appears."""

    def __init__(self, target, must_be_new=True, job=None, gate=None):
        self.target = Path(os.path.abspath(target))  # "." has no name to stage beside
        require(not self.target.is_symlink(), f"{self.target}: is a symbolic link; choose a real --save-dir")
        require(not self.target.exists() or self.target.is_dir(), f"{self.target}: exists and is not a folder")
        if must_be_new:
            require(not self.target.exists() or not any(self.target.iterdir()),
                    f"{self.target}: already exists and is not empty; choose a new --save-dir", path=self.target)
        self.target = Path(dry_run.mirror(self.target))  # checked above; a dry run stages in its scratch mirror
        self.job, self.gate = job, gate
        self.created_parents = _created_parents(self.target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        if job is None:
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))
            _chmod_as_umask(self.path, 0o777)
        else:
            self.path = self.target.parent / f".{self.target.name}.partial-{_job_id(job)}"
            self.path.mkdir(exist_ok=True)  # the modes a plain mkdir gives, as for mkdtemp's above

    def commit(self):
        """Make the output appear, once all of it is on disk, unless the run is no longer wanted."""
        require(self.gate is None or self.gate.still_wanted(), f"{self.target}: the run was cancelled; output not committed")
        fsync_tree(self.path)
        file_refs.check_sources()  # no page of a source cut short was read as zeros into this output
        _claim(self.gate, self.target)
        if self.target.exists():
            self.target.rmdir()  # only ever an empty folder here
        os.replace(self.path, self.target)
        fsync_path(self.target.parent)

    def abandon(self):
        """Remove the staged folder, and the folders above it that this run created, if still empty.
        A stop signal arriving meanwhile waits until that is done, so it cannot leave half a folder.
        A job's folder holds other ranks' files too: the engine removes it (remove_job_staging) once this
        rank's side has stopped, so a rank that fails never pulls files from under one still writing."""
        if self.job is not None:
            return
        with signals_deferred():
            shutil.rmtree(self.path, ignore_errors=True)
            _remove_if_empty(self.created_parents)


def _staging_names(name):
    """Names our runs stage under for an output called `name` (StagedFolder, write_atomically): the
    prefix and an 8-character suffix of tempfile's alphabet."""
    return re.compile(re.escape(f".{name}.") + r"(partial-)?[a-z0-9_]{8}")


def remove_dead_staging(save_dir):
    """Remove what runs into `save_dir` staged and never committed: staged folders beside it (HF) and
    inside it (Megatron's .iter_N.partial-*, the tracker's temporary file). Only the holder of the
    --save-dir lock calls it, so no run that staged them is alive. Returns the paths removed."""
    target = Path(os.path.abspath(dry_run.mirror(save_dir)))
    places = [(target.parent, _staging_names(target.name))]
    if target.is_dir() and not target.is_symlink():
        places += [(target, re.compile(r"\.iter_[0-9]{7}\.partial-[a-z0-9_]{8}")),
                   (target, _staging_names("latest_checkpointed_iteration.txt"))]
    removed = []
    for folder, names in places:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if not names.fullmatch(entry.name) or entry.is_symlink() or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            with signals_deferred():
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    Path(entry.path).unlink(missing_ok=True)
            removed.append(entry.path)
    return removed


def _job_id(job):
    require(isinstance(job, str) and re.fullmatch(r"[a-z0-9]{8}", job), f"job id {job!r}: not 8 of [a-z0-9]")
    return job


def remove_job_staging(save_dir, job):
    """Remove what job `job` (a Share's) staged for `save_dir` and did not commit: the HF folder staged beside
    it and Megatron's iteration folders staged inside it. Every rank calls it when the job fails, after its
    own saver stopped. Returns the paths removed."""
    target = Path(os.path.abspath(save_dir))
    suffix = f".partial-{_job_id(job)}"
    candidates = [target.parent / f".{target.name}{suffix}"]
    if target.is_dir() and not target.is_symlink():
        candidates += [target / entry.name for entry in os.scandir(target)
                       if re.fullmatch(r"\.iter_[0-9]{7}" + re.escape(suffix), entry.name)]
    removed = []
    for path in candidates:
        if path.is_dir() and not path.is_symlink():
            with signals_deferred():
                shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


class SaveDirLock:
    """An exclusive lock on --save-dir for the whole run, held by the parent (and inherited by its
    children): a second conversion into the same folder is refused instead of mixing files."""

    def __init__(self, save_dir):
        target = Path(os.path.abspath(dry_run.mirror(save_dir)))  # a dry run's is in its scratch mirror
        self.created_parents = _created_parents(target)
        self.created = [target] if not os.path.lexists(target) else []  # removed at the end if still empty
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
        _remove_if_empty(self.created + self.created_parents)
