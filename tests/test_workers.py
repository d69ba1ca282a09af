"""`--workers N`: our savers write with N threads (rank files and safetensors shards at once, torch_dist
beside the receiver); the files are byte-identical to the single-worker path."""

import torch

from helpers import convert, make_hf_model


def files_of(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_four_workers_write_the_same_bytes_as_one(tmp_path):
    source = tmp_path / "hf"
    make_hf_model(source, "llama", torch.bfloat16)
    outputs = {}
    for workers in (1, 4):
        out = tmp_path / f"w{workers}"
        common = ("--workers", workers)
        convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", out / "ranks",
                "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2, *common)
        convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", out / "dist",
                "--ckpt-format", "torch_dist", *common)
        convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", out / "ranks", "--save-dir", out / "hf",
                "--max-shard-size", "100KB", *common)
        outputs[workers] = files_of(out)
    assert len(outputs[1]) >= 15  # 4 rank files and trackers, the torch_dist files, several safetensors shards
    assert outputs[1].keys() == outputs[4].keys()
    different = [str(name) for name in outputs[1] if outputs[1][name] != outputs[4][name]]
    assert not different


def test_row_blocks_are_gathered_only_when_they_are_apart():
    """A writer needs one contiguous tensor per record: row blocks that already follow each other in one
    storage (SwiGLU's W and V from one TP shard) are used in place; others are copied."""
    from converter_core import workers

    both = torch.arange(48, dtype=torch.float32).reshape(12, 4)
    w, v = torch.chunk(both, 2)
    with workers.contiguous((w, v)) as whole:
        assert torch.equal(whole, both) and whole.data_ptr() == both.data_ptr()
    apart = (torch.ones(3, 4), torch.zeros(2, 4))
    with workers.contiguous(apart) as whole:
        assert torch.equal(whole, torch.cat(apart)) and whole.data_ptr() not in {p.data_ptr() for p in apart}
    with workers.contiguous((v, w)) as whole:  # the same storage, in the other order
        assert torch.equal(whole, torch.cat((v, w))) and whole.data_ptr() != both.data_ptr()
    columns = both[:, :2]
    with workers.contiguous(columns) as whole:
        assert torch.equal(whole, columns) and whole.is_contiguous()


def test_writes_into_one_file_take_turns(tmp_path, monkeypatch):
    """Two writers of one file: the second waits (asleep on our lock, not spinning in the kernel) until the
    first is done, whichever descriptor each uses; a writer of another file does not wait. Event-driven:
    each file's lock says when a writer has to wait for it, and each writer when it is done."""
    import os
    import threading
    import types

    from converter_core import workers

    changed = threading.Condition()
    waits = []  # (lock, thread name) for each writer that found its lock held

    class SayingLock:
        """A lock that records who had to wait for it."""
        def __init__(self):
            self._lock = threading.Lock()

        def __enter__(self):
            if not self._lock.acquire(blocking=False):
                with changed:
                    waits.append((self, threading.current_thread().name))
                    changed.notify_all()
                self._lock.acquire()
            return self

        def __exit__(self, *exc):
            self._lock.release()

    monkeypatch.setattr(workers, "threading", types.SimpleNamespace(**{**vars(threading), "Lock": SayingLock}))
    done = set()

    def writer(name, fd, data, offset):
        try:
            workers.write_all(fd, [data], offset)
        finally:
            with changed:
                done.add(name)
                changed.notify_all()

    def start(name, *args):
        thread = threading.Thread(target=writer, args=(name, *args), name=name, daemon=True)
        thread.start()
        return thread

    def wait_for(condition):
        with changed:
            assert changed.wait_for(condition, timeout=60), "hang"  # only a guard: each writer waits or ends

    shared, other = tmp_path / "shared.bin", tmp_path / "other.bin"
    shared.write_bytes(b"\0" * 8)
    fds = [os.open(path, os.O_RDWR | os.O_CREAT) for path in (shared, shared, other)]
    try:
        held = workers._file_lock(fds[0])
        with held:  # a write into shared.bin in progress
            start("free", fds[2], b"free", 0)
            wait_for(lambda: "free" in done or waits)
            assert waits == [] and other.read_bytes() == b"free"  # another file: no waiting
            late = start("late", fds[1], b"late", 4)
            wait_for(lambda: "late" in done or waits)
            assert waits == [(held, "late")] and "late" not in done  # the same file by another descriptor: it waits
            assert shared.read_bytes() == b"\0" * 8
        late.join(60)
        assert "late" in done and shared.read_bytes() == b"\0" * 4 + b"late"
    finally:
        for fd in fds:
            os.close(fd)
