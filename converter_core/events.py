"""The progress events convert() hands its `progress` callback, typed. Each event is still the dict it
always was (event["name"], json.dumps(event), == a dict), and also an object of its kind's class, so
event.name works and a type checker knows the fields. The parent adds the job's state to every
"sent", "written" and "finish" event (fraction, bytes_done, seconds, eta_seconds): a display needs
no bookkeeping of its own."""

import time


class Event(dict):
    """Any event: `event` names its kind. Fields read as attributes too; a missing one is an AttributeError.
    In a job split over ranks (processes=, torchrun) every event also says which `rank` sent it."""
    event: str

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} event has no field {name!r}") from None


class JobEvent(Event):
    """The whole job's state, on every SentEvent, WrittenEvent and FinishEvent."""
    fraction: float            # of the job done, 0 to 1 (1.0 at the end): messages written by the saver over all
    bytes_done: int            # tensor bytes written so far; on FinishEvent, the output files' total size
    seconds: float             # since the run started
    eta_seconds: float | None  # estimated seconds left: None until something is done, 0.0 at the end


class StartEvent(Event):
    """The loader has read the source: `messages` will cross (embeddings, one per layer, final norm, ...)."""
    messages: int
    layers: int


class SentEvent(JobEvent):
    """The loader sent message `count` of `total`, `bytes` of tensors."""
    name: str
    bytes: int
    count: int
    total: int


class WrittenEvent(SentEvent):
    """The saver has written (or placed) message `count` of `total`."""


class NoteEvent(Event):
    """A line for the person running the conversion."""
    message: str


class WarningEvent(NoteEvent):
    """Something the output may not be what one expects from (also in Result.warnings)."""


class SavedEvent(NoteEvent):
    """The saver has written everything; its output is committed next."""


class FinishEvent(JobEvent):
    """The output is complete: `files` files, `bytes` in all, in `save_dir`."""
    save_dir: str
    files: int
    bytes: int


KINDS = {"start": StartEvent, "sent": SentEvent, "written": WrittenEvent, "note": NoteEvent,
         "warning": WarningEvent, "saved": SavedEvent, "finish": FinishEvent}


class Tracker:
    """Turns one run's raw event dicts into typed events with the job's state. The fraction counts messages
    written by the saver, or sent by the loader for a saver that reports no writes; it never goes back.
    A job split over `world` ranks (converter_core.distributed) is one job: every rank streams every
    message (writing its own files of it), so the fraction is all ranks' messages over world times the
    total, and the bytes done are the ranks' mean, each message's bytes counted once (events carry "rank")."""

    def __init__(self, world=1):
        self.started = time.monotonic()
        self.world = world
        self.ranks = {}  # {rank: {"sent": [count, bytes], "written": [count, bytes]}}
        self.total = None
        self.fraction = 0.0

    def __call__(self, raw):
        kind = raw.get("event")
        event = KINDS.get(kind, Event)(raw)
        if kind == "start":
            self.total = raw.get("messages")
        if kind in ("sent", "written"):
            counts = self.ranks.setdefault(raw.get("rank", 0), {"sent": [0, 0], "written": [0, 0]})[kind]
            counts[0] = raw.get("count") or counts[0] + 1
            counts[1] += raw.get("bytes") or 0
            self.total = raw.get("total") or self.total
            sides = [rank["written"] if rank["written"][0] else rank["sent"] for rank in self.ranks.values()]
            if self.total:
                done = sum(count for count, _ in sides)
                self.fraction = max(self.fraction, min(1.0, done / (self.total * self.world)))
            self._job(event, sum(size for _, size in sides) // self.world)
        return event
    def finish(self, save_dir, files, size, seconds):
        """The last event: the whole output is there."""
        self.fraction = 1.0
        return self._job(FinishEvent(event="finish", save_dir=str(save_dir), files=files, bytes=size), size, seconds)

    def _job(self, event, size, seconds=None):
        seconds = time.monotonic() - self.started if seconds is None else seconds
        eta = seconds * (1 - self.fraction) / self.fraction if self.fraction else None
        event.update(fraction=self.fraction, bytes_done=size, seconds=seconds, eta_seconds=eta)
        return event
