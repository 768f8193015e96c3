"""The read hub: a Trio run's quiet plain sockets, their reads handled inline.

This module owns :class:`ReadHub`. A relay pump whose socket has nothing to read parks
here with a *handler* instead of in ``trio.lowlevel.wait_readable``. The hub keeps the
socket registered edge-triggered (once per socket, not re-armed per message as Trio's
one-shot registrations are), and when it turns readable calls its handler right there:
the read, the frame walk and the write of the usual message run without waking the
pump at all. That saves the scheduler pass and the re-registration per message that
make up most of a Trio proxy's own work per message (``bench/stranger.py``: the
splice, the relay).

How the hub learns of readiness (:data:`DISPATCH_ENV`):

- ``inline`` (the default): the sockets sit in Trio's own epoll, and Trio's I/O manager
  hands their events to :meth:`ReadHub.dispatch` as it takes them from ``epoll_wait``
  (:func:`_install_inline_dispatch`, on the Trio releases in
  :data:`INLINE_TRIO_VERSIONS`). One system call per wake-up, as nginx makes, and no
  task woken (``bench/instructions.py``: 78k -> 39k instructions per relayed message).
  While Trio would sleep, wake-ups that wake no task are handled and waited past inside
  Trio's ``get_events``, without a pass of its run loop each
  (:func:`_wait_past_hub_wakeups`).
- ``nested``: an epoll of the hub's own, registered in Trio's and waited on by the
  hub's system task: per wake-up, Trio's wait, the re-arm of that one-shot
  registration, the hub's own poll and a task switch.

A handler returns ``None`` when it dealt with the readiness (the pump stays parked),
or anything else to wake its pump with that value: the message needs the pump's
slower paths (a partial frame, a control frame, a write the kernel did not take
whole, the end of the stream). What a handler raises wakes its pump with the
exception. A handler must not block, and reads at most one buffer per call.

A socket no task reads for a while can be *watched* instead (:meth:`ReadHub.watch`): a
callback, not a parked task, runs on its readiness (the REST proxy's watch on a client
whose response streams: a task and a nursery per request cost more than the response's
own reads).

Only plain sockets come here: a TLS socket may hold decrypted bytes that epoll cannot
see. Inline, every wait on a socket the hub may hold is the hub's (reads and
:meth:`ReadHub.wait_writable`): a Trio wait on it would share its one registration in
the shared epoll. ``Transport`` routes them so for the transports made while the hub
ran (``Transport.hub``), the only ones a pump parks here.

Cancelling a parked pump takes it out at once; :meth:`ReadHub.forget` (from
``Transport.close``) wakes one with :class:`~relay.net.transport.TransportClosed`
before its socket closes, so a reused descriptor number is never mistaken for it.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Final, Protocol, TypeVar

import outcome
import trio

LOGGER = logging.getLogger("relay.hub")

#: Readiness events taken from the hub's epoll per wake-up: a bound on the handlers one
#: pass of the hub runs before it lets other tasks in.
MAX_EVENTS_PER_WAKEUP: Final = 256

#: Edge-triggered: an event per arrival, none while bytes already reported sit unread.
_READ_EDGES: Final = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
#: The peer's end (FIN, reset, error): its edge is the last the socket will give, even
#: when the bytes before it are still unread.
_HANG_UPS: Final = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
#: What wakes a writer waiting in :meth:`ReadHub.wait_writable` (an error or a hang-up
#: too: its write then fails at once), and what is a read's business.
_WRITE_EVENTS: Final = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_READ_EVENTS: Final = select.EPOLLIN | _HANG_UPS
#: Handler calls in a row on a hung-up socket before the hub gives up on the handler (a
#: correct one wakes its pump by the second: a short read, then the end of the stream).
MAX_HANDLER_CALLS_AFTER_HANG_UP: Final = 8

#: The environment variable that picks how the hub learns of readiness: ``inline`` (the
#: default: its sockets sit in Trio's own epoll and their events are handled as Trio
#: takes them, see :class:`ReadHub`) or ``nested`` (an epoll of its own that Trio waits
#: on, as a hub task). Read when a run's hub starts.
DISPATCH_ENV: Final = "RELAY_READ_HUB"
DISPATCH_MODES: Final = ("inline", "nested")
#: Trio releases whose epoll I/O manager the inline dispatch was checked against (its
#: private ``_epoll``, ``get_events`` and ``process_events``); any other falls back to
#: ``nested``, logged once.
INLINE_TRIO_VERSIONS: Final = ("0.35.",)

Handler = Callable[[], object]
#: A watch's callback: True once it is done watching (the watch then ends).
Watcher = Callable[[], bool]


class _Parked:
    __slots__ = ("handler", "task")

    def __init__(self, task: trio.lowlevel.Task, handler: Handler) -> None:
        self.task = task
        self.handler = handler


class ReadHub:
    """Inline read handling for one Trio run (see the module docstring).

    Two ways to learn of readiness, the same handlers either way:

    - *inline* (``io`` given: this run's Trio epoll I/O manager): the hub's sockets are
      registered in Trio's own epoll, and :func:`_install_inline_dispatch` has Trio hand
      their events to :meth:`dispatch` as it takes them from ``epoll_wait``, before any
      task runs. Per readiness that is one system call (Trio's wait) where the nested
      way makes three (Trio's wait, the re-arm of the hub's one-shot registration, the
      hub's own poll) and a task switch. A socket of the hub is then never waited for
      by Trio itself (that would change its registration): its write waits come here
      too (:meth:`wait_writable`).
    - *nested*: an epoll of the hub's own, which its system task waits on through
      Trio.
    """

    def __init__(self, io: Any = None) -> None:
        #: Trio's epoll I/O manager when dispatching inline, else None.
        self._io = io
        self._epoll: select.epoll = io._epoll if io is not None else select.epoll()
        #: The sockets registered, by descriptor: a number reused by a new socket is a
        #: new registration, not a match.
        self._registered: dict[int, socket.socket] = {}
        self._parked: dict[int, _Parked] = {}
        #: Registered sockets that turned readable while their pump was not parked.
        self._ready: set[int] = set()
        #: Registered sockets whose peer has ended: no edge will come for what is left
        #: to read, so their handler runs until it wakes the pump.
        self._hung_up: set[int] = set()
        #: Watched sockets' callbacks (no task parked), by descriptor.
        self._watched: dict[int, Watcher] = {}
        #: Tasks waiting for a registered socket to take more bytes (inline only).
        self._writers: dict[int, trio.lowlevel.Task] = {}
        # Installed now, not when the hub's task first runs: a socket registered before
        # that would have its edge taken (and lost) by Trio's own dispatch.
        self._restore = _install_inline_dispatch(io, self) if io is not None else None

    @property
    def inline(self) -> bool:
        """Whether readiness is dispatched from Trio's own epoll (see the class docstring)."""
        return self._io is not None

    @property
    def parked(self) -> int:
        """Pumps parked now (for tests and the idle-memory figures)."""
        return len(self._parked)

    async def serve(self, sock: socket.socket, handler: Handler) -> object:
        """Park until ``handler`` (called by the hub on each readiness) returns a value.

        Returns that value, or raises what the handler raised. ``sock`` must be a plain
        non-blocking socket whose last read came back short (the kernel had nothing
        more), so that the next byte to arrive is an edge the hub sees.
        """
        fd = sock.fileno()
        if self._claim(fd, sock):
            # Bytes (or the peer's end) came while the pump was busy: their edge is
            # spent, so the handler runs now, after a checkpoint (as a wait would have
            # been). The mark is cleared after it: an edge the hub saw during the
            # checkpoint is covered by this read, and nothing runs between the read and
            # the park below.
            await trio.lowlevel.checkpoint()
            self._ready.discard(fd)
            result = self._handle(fd, handler, hung_up=fd in self._hung_up)
            if result is not None:
                return result
        task = trio.lowlevel.current_task()
        self._parked[fd] = _Parked(task, handler)

        def abort(_: object) -> trio.lowlevel.Abort:
            parked = self._parked.get(fd)
            if parked is not None and parked.task is task:
                del self._parked[fd]
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def wake(self, sock: socket.socket, task: trio.lowlevel.Task, value: object) -> bool:
        """Wake ``task`` with ``value`` if it is parked on ``sock`` with a handler of its
        own (so ``serve`` hands ``value`` to its loop); else False. A task in
        :meth:`wait_readable` is never woken this way: its caller would just read again."""
        fd = sock.fileno()
        parked = self._parked.get(fd)
        if (
            parked is None
            or parked.task is not task
            or parked.handler is _wake
            or self._registered.get(fd) is not sock
        ):
            return False
        del self._parked[fd]
        trio.lowlevel.reschedule(task, outcome.Value(value))
        return True

    def watch(self, sock: socket.socket, callback: Watcher) -> None:
        """Call ``callback`` on each readiness of ``sock`` until it returns True or
        :meth:`unwatch`; at once if bytes (or the peer's end) came since the socket's
        last read. No task may read ``sock`` meanwhile; the callback must not block."""
        fd = sock.fileno()
        if self._claim(fd, sock):
            self._ready.discard(fd)
            if callback():
                return
        self._watched[fd] = callback

    def _claim(self, fd: int, sock: socket.socket) -> bool:
        """Make ``sock`` this reader's (registered if new); True when bytes or the peer's
        end came since its last read, so no edge will announce them."""
        if fd in self._parked or fd in self._watched:
            # As Trio's wait_readable: one reader per socket (a second would leave the
            # first parked for ever).
            raise trio.BusyResourceError("another task is already reading this socket")
        if self._registered.get(fd) is not sock:
            self._register(fd, sock)
            return False
        return fd in self._ready or fd in self._hung_up

    def unwatch(self, sock: socket.socket) -> None:
        """End a watch of ``sock`` (nothing if its callback already ended it)."""
        try:
            fd = sock.fileno()
        except OSError:
            return
        if self._registered.get(fd) is sock:
            self._watched.pop(fd, None)

    def forget(self, sock: socket.socket) -> None:
        """``sock`` is about to close: drop it, waking its parked pump with TransportClosed."""
        from relay.net.transport import TransportClosed  # transport imports this module

        try:
            fd = sock.fileno()
        except OSError:
            return
        if self._registered.get(fd) is not sock:
            return
        del self._registered[fd]
        self._ready.discard(fd)
        self._hung_up.discard(fd)
        self._watched.pop(fd, None)
        # No unregister: closing the socket ends its registration (the relay never dups
        # a socket), and a system call per leg is a cost every session pays.
        parked = self._parked.pop(fd, None)
        if parked is not None:
            trio.lowlevel.reschedule(
                parked.task, outcome.Error(TransportClosed("connection closed"))
            )
        writer = self._writers.pop(fd, None)
        if writer is not None:
            trio.lowlevel.reschedule(writer, outcome.Error(TransportClosed("connection closed")))

    @staticmethod
    def _handle(fd: int, handler: Handler, *, hung_up: bool) -> object:
        """``handler``'s answer; on a hung-up socket, called again while it reads."""
        result = handler()
        if result is None and hung_up:
            for _ in range(MAX_HANDLER_CALLS_AFTER_HANG_UP - 1):
                result = handler()
                if result is not None:
                    return result
            raise RuntimeError(f"a read-hub handler ignored the end of stream on fd {fd}")
        return result

    def _register(self, fd: int, sock: socket.socket) -> None:
        self._ready.discard(fd)
        self._hung_up.discard(fd)
        try:
            self._epoll.register(fd, _READ_EDGES)
        except FileExistsError:
            if self._io is not None:
                # Inline, Trio's epoll may still hold this socket's spent one-shot
                # registration (Trio waited for its connect): take it over.
                self._epoll.modify(fd, _READ_EDGES)
            else:
                # The number outlived a socket closed behind our back (dup'd elsewhere):
                # the registration is the old description's; replace it.
                self._epoll.unregister(fd)
                self._epoll.register(fd, _READ_EDGES)
        # A new registration reports the bytes already there as an edge on the next poll.
        self._registered[fd] = sock

    def wait_readable(self, sock: socket.socket) -> Coroutine[Any, Any, object]:
        """Trio's ``wait_readable`` for a drained plain socket, over the hub's epoll: the
        socket is registered once for its life, where each Trio wait registers (or
        re-arms) it and a close unregisters it, a system call each. (The park itself,
        not a coroutine around it: each level of awaits is paid again on every wake.)"""
        return self.serve(sock, _wake)

    async def wait_writable(self, sock: socket.socket) -> None:
        """Trio's ``wait_writable`` for a plain socket of a transport that uses the hub.

        Inline, the wait is the hub's (registering the socket if it is new): a Trio wait
        on a socket the hub holds, or comes to hold while Trio waits (its reader parks),
        would share one registration in the shared epoll, and each side's change would
        undo the other's. Writability is added to the registration while a writer waits.
        Nested, it is Trio's wait (the hub's epoll is its own).
        """
        if self._io is None:
            await trio.lowlevel.wait_writable(sock)
            return
        fd = sock.fileno()
        if fd in self._writers:
            raise trio.BusyResourceError("another task is already writing this socket")
        if self._registered.get(fd) is not sock:
            self._register(fd, sock)
        # A modification reports the state now: a socket already writable is an event
        # on the next epoll_wait, not a lost wake-up.
        self._epoll.modify(fd, _READ_EDGES | select.EPOLLOUT)
        task = trio.lowlevel.current_task()
        self._writers[fd] = task

        def abort(_: object) -> trio.lowlevel.Abort:
            if self._writers.get(fd) is task:
                del self._writers[fd]
                self._stop_writing(fd)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _stop_writing(self, fd: int) -> None:
        if self._registered.get(fd) is not None:
            try:
                self._epoll.modify(fd, _READ_EDGES)
            except OSError:  # closed meanwhile: its registration went with it
                pass

    def dispatch(self, events: Iterable[tuple[int, int]]) -> list[tuple[int, int]] | None:
        """Run the handlers of the sockets ``events`` (from an epoll) report ready; the
        events of sockets not registered here (inline: Trio's own), or None for none."""
        parked = self._parked
        registered = self._registered
        writers = self._writers
        handle = self._handle
        reschedule = trio.lowlevel.reschedule
        others: list[tuple[int, int]] | None = None
        for event in events:
            fd, events_of = event
            if fd not in registered:
                if others is None:
                    others = [event]
                else:
                    others.append(event)
                continue
            if events_of & _WRITE_EVENTS and writers:
                writer = writers.pop(fd, None)
                if writer is not None:
                    self._stop_writing(fd)
                    reschedule(writer)
                if not events_of & _READ_EVENTS:
                    continue
            ended = events_of & _HANG_UPS
            if ended and fd in registered:  # (a handler before this one may have closed it)
                self._hung_up.add(fd)
            waiting = parked.get(fd)
            if waiting is None:
                watcher = self._watched.get(fd)
                if watcher is not None:
                    try:
                        done = watcher()
                    except Exception:  # a watcher's own failure ends its watch
                        done = True
                    if done:
                        self._watched.pop(fd, None)  # (a callback may close its socket)
                elif fd in registered:
                    self._ready.add(fd)
                continue
            try:
                # The usual readiness: one handler call (no hang-up, no loop).
                result = (
                    waiting.handler() if not ended else handle(fd, waiting.handler, hung_up=True)
                )
            except Exception as exc:  # the pump's to handle, not the hub's
                del parked[fd]
                reschedule(waiting.task, outcome.Error(exc))
                continue
            if result is not None:
                del parked[fd]
                reschedule(waiting.task, outcome.Value(result))
        return others

    async def run(self) -> None:
        """The hub's system task: nested, wait for the epoll and dispatch what is ready;
        inline, only hold the hub's lifetime (Trio dispatches)."""
        epoll = self._epoll
        poll = epoll.poll
        dispatch = self.dispatch
        restore = self._restore
        try:
            if restore is not None:
                await trio.sleep_forever()
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                dispatch(poll(0, MAX_EVENTS_PER_WAKEUP))
        finally:
            if restore is not None:
                restore()
            error = trio.ClosedResourceError("hub stopped")
            for fd, waiting in list(self._parked.items()):
                del self._parked[fd]
                trio.lowlevel.reschedule(waiting.task, outcome.Error(error))
            for fd, writer in list(self._writers.items()):
                del self._writers[fd]
                trio.lowlevel.reschedule(writer, outcome.Error(error))
            self._watched.clear()
            if self._io is None:
                epoll.close()
            else:
                for fd in list(self._registered):
                    try:
                        epoll.unregister(fd)
                    except OSError:
                        pass
                self._registered.clear()


def trio_epoll_manager() -> Any:
    """This run's Trio epoll I/O manager if the inline dispatch knows it, else None."""
    from trio._core import _io_epoll, _run  # private: checked below, else nested

    if not trio.__version__.startswith(INLINE_TRIO_VERSIONS):
        return None
    try:
        io = _run.GLOBAL_RUN_CONTEXT.runner.io_manager
    except AttributeError:
        return None
    if type(io) is not _io_epoll.EpollIOManager or not isinstance(
        getattr(io, "_epoll", None), select.epoll
    ):
        return None
    return io


def _install_inline_dispatch(io: Any, hub: ReadHub) -> Callable[[], None]:
    """Have ``io`` (Trio's epoll I/O manager) give ``hub`` its sockets' events; returns
    the undo. The manager's class is swapped for a subclass with no state of its own
    (the same slots) that overrides two methods:

    - ``get_events`` asks the kernel for room for the hub's events too (Trio sizes the
      batch by its own registrations), and while Trio would sleep handles the hub's
      wake-ups itself (:func:`_wait_past_hub_wakeups`);
    - ``process_events`` hands the hub's events to :meth:`ReadHub.dispatch` and the
      rest to Trio, as Trio would have handled them.
    """
    from trio._core import _run  # private: the runner's queue, deadlines and clock

    base = type(io)
    registered = hub._registered
    dispatch = hub.dispatch

    def guarded(events: list[tuple[int, int]]) -> list[tuple[int, int]] | None:
        """One pass of ``dispatch``: the hub's handled, Trio's handed back."""
        try:
            return dispatch(events)
        except BaseException:  # never into Trio's loop: that ends the run
            LOGGER.exception("read hub: dispatch failed")
            return [event for event in events if event[0] not in registered]

    runner = _run.GLOBAL_RUN_CONTEXT.runner
    instruments = runner.instruments
    # Only on the real clock: a test's MockClock (autojump) must see every wake-up.
    waits_inline = type(runner.clock) is _run.SystemClock and not runner.is_guest

    def get_events(self: Any, timeout: float) -> Any:
        room = max(1, len(self._registered) + min(len(registered), MAX_EVENTS_PER_WAKEUP))
        events = self._epoll.poll(timeout, room)
        if (
            not events
            or timeout <= 0
            or not waits_inline
            or runner.waiting_for_idle
            or "before_io_wait" in instruments
            or "after_io_wait" in instruments
        ):
            return events
        return _wait_past_hub_wakeups(self._epoll, room, events, runner, guarded)

    def process_events(self: Any, events: Any) -> None:
        # (_TriosEvents: the hub's were handled in get_events already.)
        theirs = events if type(events) is _TriosEvents else guarded(events)
        if theirs:
            base.process_events(self, theirs)

    inline_class = type(
        "InlineHubEpollIOManager",
        (base,),
        {"__slots__": (), "get_events": get_events, "process_events": process_events},
    )
    io.__class__ = inline_class

    def restore() -> None:
        if type(io) is inline_class:
            io.__class__ = base

    return restore


class _TriosEvents(list[tuple[int, int]]):
    """Events ``get_events`` already took the hub's out of (and handled)."""

    __slots__ = ()


#: The longest wait Trio asks of its I/O manager (its ``_MAX_TIMEOUT``, in seconds).
_MAX_WAIT_S: Final = 24 * 60 * 60


def _wait_past_hub_wakeups(
    epoll: select.epoll,
    room: int,
    events: list[tuple[int, int]],
    runner: Any,
    dispatch: Callable[[list[tuple[int, int]]], list[tuple[int, int]] | None],
) -> Any:
    """Trio asked to sleep until its next deadline and ``events`` came first: handle the
    hub's here, and while they wake no task and none of Trio's came, wait again
    (to the same deadline, which a handler may have moved) instead of going back
    round Trio's run loop. Returns Trio's events (:class:`_TriosEvents`), or an empty
    poll when the deadline came.

    A relay streaming to many clients is woken about once per message, each time for one
    socket of the hub's. The pass round the run loop (its timeout, its deadline expiry,
    its empty batch of tasks, the generator's round trip) then has nothing to do: no
    task is runnable (Trio would not have slept otherwise) and the handlers woke none.
    Skipping it saves about 7 % of the CPU of a parked REST body pump per event (README,
    "REST proxy", run 9). Anything that needs Trio ends the wait at once: a task a
    handler woke, an event of Trio's own (its wake-up socket carries signals and
    ``run_sync_soon``), the deadline (tests/test_read_hub_waits.py). Not used on a
    MockClock, in guest mode, with I/O-wait instruments or while a task waits for all
    to block: each of those must see every wake-up.
    """
    runq = runner.runq
    deadlines = runner.deadlines
    offset = runner.clock.offset  # SystemClock: current_time() is offset + perf_counter()
    perf_counter = time.perf_counter
    poll = epoll.poll
    while True:
        theirs = dispatch(events)
        if theirs or runq:
            return _TriosEvents(theirs or ())
        timeout = deadlines.next_deadline() - (offset + perf_counter())
        if timeout <= 0:
            return _TriosEvents()  # Trio expires the deadline
        events = poll(min(timeout, _MAX_WAIT_S), room)
        if not events:
            return events


def _wake() -> object:
    """The handler of :meth:`ReadHub.wait_readable`: any readiness wakes the waiter."""
    return True


_HUB: trio.lowlevel.RunVar[ReadHub] = trio.lowlevel.RunVar("relay_read_hub")


class RunService(Protocol):
    """An object one Trio run holds once, with a system task (:meth:`run`) behind it."""

    async def run(self) -> None: ...


_Service = TypeVar("_Service", bound=RunService)


def run_service(
    var: trio.lowlevel.RunVar[_Service], make: Callable[[], _Service], name: str
) -> _Service:
    """``var``'s object in this run, made and its ``run`` started as a system task on first
    use (the read hub, the timers)."""
    try:
        return var.get()
    except LookupError:
        service = make()
        var.set(service)
        trio.lowlevel.spawn_system_task(service.run, name=name)
        return service


def current_hub() -> ReadHub:
    """This Trio run's hub, started (as a system task) on first use, dispatching as
    :data:`DISPATCH_ENV` says (inline when this Trio allows it)."""
    return run_service(_HUB, _new_hub, "relay read hub")


_inline_refused_logged = False


def dispatch_mode() -> str:
    """The dispatch :data:`DISPATCH_ENV` asks for; ValueError for an unknown one (the
    command line checks it before anything starts)."""
    mode = os.environ.get(DISPATCH_ENV, "inline")
    if mode not in DISPATCH_MODES:
        raise ValueError(f"{DISPATCH_ENV} must be one of {', '.join(DISPATCH_MODES)}, not {mode!r}")
    return mode


def _new_hub() -> ReadHub:
    global _inline_refused_logged
    if dispatch_mode() == "nested":
        return ReadHub()
    io = trio_epoll_manager()
    if io is None and not _inline_refused_logged:
        _inline_refused_logged = True
        LOGGER.warning(
            "read hub: trio %s is not one the inline dispatch knows; dispatching nested",
            trio.__version__,
        )
    return ReadHub(io)


def running_hub() -> ReadHub | None:
    """This run's hub if one was started (``Transport.close`` asks), else ``None``."""
    try:
        return _HUB.get()
    except (LookupError, RuntimeError):
        return None
