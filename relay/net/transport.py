"""Try-first socket I/O for Trio: the cheapest way Trio can move bytes.

This module owns the byte transport under every WebSocket the relay, the simulator
and the bench speak: a stdlib socket (plain, or ``ssl.SSLSocket`` for TLS) in
non-blocking mode. Each operation is attempted at once; only when the kernel (or
OpenSSL) says it would block do we await ``trio.lowlevel.wait_readable`` /
``wait_writable``. ``trio.SocketStream`` instead passes through the scheduler on
every call (a checkpoint before and after), and most of a relay's CPU per message
is scheduler passes, not parsing. To stay fair and cancellable while data keeps
flowing, a transport yields to the scheduler once every
:data:`CHECKPOINT_EVERY_OPS` operations that did not block.

Backpressure: :meth:`Transport.send_all` returns only when the kernel took every
byte; with ``TCP_NOTSENT_LOWAT`` at :data:`NOTSENT_LOWAT_BYTES` the kernel holds
at most that much unsent data per socket before the socket stops being writable,
so a slow peer stops our reader quickly instead of filling buffers.

Errors are translated here, once: any reset, broken pipe or TLS failure becomes
:class:`TransportClosed`.

:class:`ByteStream` is what a WebSocket needs of its transport; :class:`Transport`
is the one over a socket, and tests put in-memory streams in its place.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
import ssl
import sys
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

import trio

from relay.net.hub import ReadHub, running_hub

#: What a socket's ``send`` raises when the kernel (or TLS) takes nothing now: the
#: write waits, the connection is fine. (For a caller that writes ``sock.send`` itself.)
WRITE_WOULD_BLOCK: Final = (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError)

#: Operations that complete without blocking before we yield to the scheduler anyway.
CHECKPOINT_EVERY_OPS: Final = 32
#: Unsent bytes the kernel may hold per socket before it stops being writable.
NOTSENT_LOWAT_BYTES: Final = 64 * 1024
#: Receive size per read: the size of the receive buffer every connection of a thread shares.
RECEIVE_BYTES: Final = 64 * 1024
#: Listen backlog for our own listeners.
LISTEN_BACKLOG: Final = 1024

_TCP_NOTSENT_LOWAT: Final = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


class TransportClosed(Exception):
    """The peer reset the connection, or it was closed under us."""


class ByteStream(Protocol):
    """What :class:`~relay.net.websocket.WebSocket` needs of the bytes under it.

    :class:`Transport` (a socket) is the product's; an in-memory double with bounded
    buffers stands in for it in tests. Failures are :class:`TransportClosed`, and
    :meth:`close` wakes a task blocked in a read or write with it.
    """

    @property
    def peer(self) -> tuple[str, int] | None: ...

    @property
    def is_tls(self) -> bool: ...

    @property
    def closed(self) -> bool: ...

    async def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0) -> int:
        """Read what is available into ``buffer``; 0 means the peer ended the stream.

        Nothing may suspend between filling ``buffer`` and returning: the buffer is
        shared by every connection of a thread.
        """
        ...

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write every byte, waiting while the peer does not take them.

        Must not read ``data`` after its first suspension (copy what is left
        first): callers pass views of a receive buffer other tasks reuse.
        """
        ...

    def send_now(self, data: bytes | bytearray | memoryview) -> int:
        """Write what can go at once, without waiting: how many bytes of ``data`` went.

        Never suspends (no checkpoint either): the caller's reads keep its loop fair
        and cancellable. Fewer than ``len(data)`` (0, even): the rest is the caller's
        to finish with :meth:`send_all`.
        """
        ...

    def close(self) -> None: ...

    def abort(self) -> None:
        """Close as a dropped connection (a TCP reset, no FIN)."""
        ...


def tune_stream_socket(sock: socket.socket) -> None:
    """Non-blocking, no Nagle delay, bounded unsent bytes."""
    sock.setblocking(False)
    _set_tcp_options(sock)


def _set_tcp_options(sock: socket.socket) -> None:
    """No Nagle delay, bounded unsent bytes (TCP sockets; a listener's are inherited)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, NOTSENT_LOWAT_BYTES)
        except OSError:  # pragma: no cover - not on every kernel
            pass


#: Linux copies a listener's ``TCP_NODELAY`` and ``TCP_NOTSENT_LOWAT`` to the sockets it
#: accepts, so they are set once on the listener instead of twice per connection.
ACCEPTED_INHERIT_TCP_OPTIONS: Final = sys.platform == "linux"
#: ``SOCK_NONBLOCK`` at creation: a dialed socket is non-blocking without an ioctl.
_NONBLOCKING_STREAM: Final = getattr(socket, "SOCK_NONBLOCK", 0)


class Transport:
    """One connected stream socket with try-first async reads and writes.

    Not safe for two tasks writing at once: callers serialise writes (see
    ``relay.net.websocket``). One reader task and one writer task at a time is fine.
    """

    __slots__ = (
        "_closed",
        "_drained",
        "_hub",
        "_ops_without_yield",
        "_plain",
        "_trio_waits",
        "answered",
        "peer",
        "sock",
    )

    def __init__(self, sock: socket.socket, *, peer: tuple[str, int] | None = None) -> None:
        self.sock = sock
        self.peer = peer
        self._ops_without_yield = 0
        self._closed = False
        self._plain = not isinstance(sock, ssl.SSLSocket)
        #: A plain socket's last read returned less than asked: the kernel had no
        #: more at that instant, so the next read waits for readiness first instead
        #: of a try that would fail (a system call and an exception per message).
        #: Not for TLS, where OpenSSL may hold decrypted bytes epoll cannot see.
        self._drained = False
        #: Set by whoever starts answering a request on this connection (an HTTP
        #: answer, a 101, a hand-off to hypercorn): a failure after that point must
        #: not write a second answer. Not touched on the per-frame path.
        self.answered = False
        #: Tasks in a Trio wait on this socket now. Only they need Trio's
        #: ``notify_closing`` (a system call and a registry walk per socket): Trio keeps
        #: nothing for a socket once its waits are over, and the kernel drops a closed
        #: socket's epoll registration itself. Every Trio wait on ``sock`` goes through
        #: this class (the read hub has its own epoll, told by ``forget``).
        self._trio_waits = 0
        #: The run's read hub when this transport was made (looked up once: a lookup
        #: that finds none raises inside Trio, a cost per read). Plain reads wait there.
        self._hub = running_hub() if self._plain else None

    @property
    def is_tls(self) -> bool:
        return not self._plain

    @property
    def hub(self) -> ReadHub | None:
        """The read hub this transport's plain-socket waits go through (the run's when
        the transport was made), else None (TLS, or no hub running then). Only with it
        may the socket be handed to the hub: every wait on a socket the hub holds must
        go through the hub, which may hold it in Trio's own epoll."""
        return self._hub

    @property
    def drained(self) -> bool:
        """A plain socket whose last read came back short: nothing to read until an edge."""
        return self._drained

    def recv_now(self, buffer: bytearray | memoryview) -> int:
        """:meth:`recv_into` without waiting, for a :mod:`relay.net.hub` handler.

        -1: nothing to read now (the socket stays drained); 0: the peer ended the stream.
        """
        try:
            received = self.sock.recv_into(buffer)
        except BlockingIOError:
            return -1
        except (OSError, ValueError) as exc:
            raise TransportClosed(_describe(exc)) from None
        self._drained = 0 < received < len(buffer)
        return received

    def hub_reader(
        self, view: memoryview, consume: Callable[[int], object], full: object
    ) -> Callable[[], object]:
        """A :mod:`relay.net.hub` handler for this plain socket: each readiness, one read
        into ``view`` handed to ``consume`` (0: the peer ended), whose answer it returns;
        ``full`` instead of None when the read filled ``view`` (more may wait, and no edge
        will announce it). :meth:`recv_now` and its caller in one frame: a frame fewer
        per read on the hot path."""
        sock = self.sock
        whole = len(view)

        def read() -> object:
            try:
                received = sock.recv_into(view)
            except BlockingIOError:
                return None  # nothing after all: parked on
            except (OSError, ValueError) as exc:
                raise TransportClosed(_describe(exc)) from None
            self._drained = 0 < received < whole
            answer = consume(received)
            return full if answer is None and received == whole else answer

        return read

    async def _maybe_yield(self) -> None:
        self._ops_without_yield += 1
        if self._ops_without_yield >= CHECKPOINT_EVERY_OPS:
            self._ops_without_yield = 0
            await trio.lowlevel.checkpoint()

    async def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0) -> int:
        """Read what is available into ``buffer``; 0 means the peer ended the stream.

        The periodic yield comes *before* the read, so nothing can run between the
        bytes landing in ``buffer`` and this returning: a caller may read into a
        buffer other tasks share, as long as it is done with the bytes (or has
        copied them) before its next await.
        """
        sock = self.sock
        if self._drained:
            self._drained = False
            self._ops_without_yield = 0
            # A wait is a scheduler pass, so the periodic yield too. Only plain sockets
            # are drained: this is _wait(readable=True)'s hub branch, without its layer.
            if self._closed:
                raise TransportClosed("connection closed")
            hub = self._hub
            if hub is not None:
                await hub.wait_readable(sock)
            else:  # _wait's Trio branch, inline (a coroutine per message fewer)
                self._trio_waits += 1
                try:
                    await trio.lowlevel.wait_readable(sock)
                except trio.ClosedResourceError:
                    raise TransportClosed("connection closed") from None
                finally:
                    self._trio_waits -= 1
        else:
            # _maybe_yield, inline: a coroutine per read is a cost on the hot path.
            self._ops_without_yield += 1
            if self._ops_without_yield >= CHECKPOINT_EVERY_OPS:
                self._ops_without_yield = 0
                await trio.lowlevel.checkpoint()
        while True:
            try:
                received = sock.recv_into(buffer, nbytes)
            except (BlockingIOError, ssl.SSLWantReadError):
                self._ops_without_yield = 0
                await self._wait(readable=True)
                continue
            except ssl.SSLWantWriteError:
                await self._wait(readable=False)
                continue
            except ssl.SSLZeroReturnError:
                return 0
            except (OSError, ValueError) as exc:
                raise TransportClosed(_describe(exc)) from None
            if self._plain and 0 < received < (nbytes or len(buffer)):
                self._drained = True
            return received

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write every byte, waiting for the socket to drain when the kernel is full.

        Before its first wait it copies what is left to send, so ``data`` may be a
        view of a buffer that other tasks reuse meanwhile (the shared receive
        buffer); the copy is made only when the kernel is full.
        """
        sock = self.sock
        total = len(data)
        # The usual write: the kernel takes it all at once.
        try:
            sent = sock.send(data)
        except WRITE_WOULD_BLOCK:
            sent = 0
        except (OSError, ValueError) as exc:
            raise TransportClosed(_describe(exc)) from None
        if sent < total:
            await self._send_rest(memoryview(data), sent)
        self._ops_without_yield += 1  # _maybe_yield, inline
        if self._ops_without_yield >= CHECKPOINT_EVERY_OPS:
            self._ops_without_yield = 0
            await trio.lowlevel.checkpoint()

    def send_now(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the kernel takes at once, without waiting: the bytes that went.

        send_all's first attempt, without a coroutine: the relay's pumps write each
        run this way and only await the rest (rarely) with :meth:`send_all`. No
        periodic yield here: a pump's own reads yield every
        :data:`CHECKPOINT_EVERY_OPS` (or wait), which keeps its loop fair.
        """
        try:
            return self.sock.send(data)
        except WRITE_WOULD_BLOCK:
            return 0
        except (OSError, ValueError) as exc:
            raise TransportClosed(_describe(exc)) from None

    async def _send_rest(self, view: memoryview, sent: int) -> None:
        """The rest of a write the kernel did not take at once (``sent`` bytes went)."""
        sock = self.sock
        total = len(view)
        while sent < total:
            try:
                sent += sock.send(view[sent:] if sent else view)
            except (BlockingIOError, ssl.SSLWantWriteError):
                self._ops_without_yield = 0
                view, total, sent = _keep(view, sent)
                await self._wait(readable=False)
            except ssl.SSLWantReadError:
                view, total, sent = _keep(view, sent)
                await self._wait(readable=True)
            except (OSError, ValueError) as exc:
                raise TransportClosed(_describe(exc)) from None

    async def _wait(self, *, readable: bool) -> None:
        if self._closed:
            raise TransportClosed("connection closed")
        hub = self._hub
        if hub is not None:
            if readable:
                # A plain socket's read waits in the read hub (a readable socket is
                # drained here: the last read came back short or would have blocked).
                await hub.wait_readable(self.sock)
                return
            if hub.inline:
                # The hub may hold this socket in Trio's own epoll (or come to, while
                # this waits): a Trio wait would share its registration there.
                await hub.wait_writable(self.sock)
                return
        self._trio_waits += 1
        try:
            if readable:
                await trio.lowlevel.wait_readable(self.sock)
            else:
                await trio.lowlevel.wait_writable(self.sock)
        except trio.ClosedResourceError:
            raise TransportClosed("connection closed") from None
        finally:
            self._trio_waits -= 1

    def shutdown_write(self) -> None:
        """Half-close (TCP FIN) after the last bytes; errors mean the peer is gone anyway."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """Close now. Wakes any task waiting on this socket with ``TransportClosed``."""
        if self._closed:
            return
        self._closed = True
        hub = running_hub()
        if hub is not None:
            hub.forget(self.sock)
        if self._trio_waits:
            try:
                trio.lowlevel.notify_closing(self.sock)
            except (RuntimeError, ValueError, OSError):  # outside trio, or already closed
                pass
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self) -> None:
        """Close with a TCP reset (SO_LINGER 0): a dropped connection, no FIN."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
        except (OSError, ValueError):
            pass
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed


def _keep(view: memoryview, sent: int) -> tuple[memoryview, int, int]:
    """What is left of ``view`` after ``sent`` bytes, as a copy the caller cannot reuse."""
    rest = memoryview(bytes(view[sent:]))
    return rest, len(rest), 0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


async def open_transport(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    tls_session: ssl.SSLSession | None = None,
) -> Transport:
    """Connect (and for TLS, handshake) to ``host:port``. Raises ``OSError`` on failure.

    ``tls_session``: a session of an earlier connection made with ``ssl_context`` to
    resume (an abbreviated handshake: no certificate chain sent or verified again).
    The caller bounds the time with a Trio cancel scope.
    """
    infos = await resolve(host, port)
    last_error: OSError = OSError(errno.EHOSTUNREACH, f"no address for {host}")
    for family, type_, proto, _, address in infos:
        sock = socket.socket(family, type_ | _NONBLOCKING_STREAM, proto)
        try:
            if _NONBLOCKING_STREAM:
                _set_tcp_options(sock)
            else:  # pragma: no cover - every platform the relay runs on has SOCK_NONBLOCK
                tune_stream_socket(sock)
            await _connect(sock, address)
        except OSError as exc:
            sock.close()
            last_error = exc
            continue
        except BaseException:
            sock.close()
            raise
        if ssl_context is None:
            return Transport(sock, peer=(str(address[0]), int(address[1])))
        return await _tls_client(sock, ssl_context, server_hostname or host, address, tls_session)
    raise last_error


_AddressInfo = tuple[int, int, int, str, tuple[Any, ...]]
#: Resolved upstream names, reused for this long: every session dials the same few
#: hosts, and a lookup is a worker-thread round trip (an IP literal needs none).
RESOLVED_ADDRESS_TTL_S: Final = 30.0
_resolved: dict[tuple[str, int], tuple[float, list[_AddressInfo]]] = {}


@functools.lru_cache(maxsize=256)
def ip_literal_family(host: str) -> int | None:
    """``AF_INET``/``AF_INET6`` when ``host`` is an IP address literal, else None."""
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if literal.version == 6 else socket.AF_INET


async def resolve(host: str, port: int) -> list[_AddressInfo]:
    """``getaddrinfo`` for a stream socket: IP literals at once, names cached for a while."""
    family = ip_literal_family(host)
    if family is not None:
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    now = time.monotonic()
    cached = _resolved.get((host, port))
    if cached is not None and now - cached[0] < RESOLVED_ADDRESS_TTL_S:
        return cached[1]
    infos: list[_AddressInfo] = [
        (int(family), int(kind), proto, name, tuple(address))
        for family, kind, proto, name, address in await trio.socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        )
    ]
    _resolved[(host, port)] = (now, infos)
    return infos


async def _connect(sock: socket.socket, address: tuple[object, ...]) -> None:
    code = sock.connect_ex(address)
    if code == 0:
        return
    if code not in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
        raise OSError(code, errno.errorcode.get(code, "connect failed"))
    # Over loopback (an upstream or sidecar on this host) the kernel has finished the
    # handshake by the time connect returns EINPROGRESS: a peer address says so for one
    # system call, where a wait costs two epoll registrations and a scheduler pass.
    try:
        sock.getpeername()
        return
    except OSError:  # ENOTCONN: still connecting (or failed): wait and ask SO_ERROR
        pass
    await trio.lowlevel.wait_writable(sock)
    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code != 0:
        raise OSError(code, errno.errorcode.get(code, "connect failed"))


async def _tls_client(
    sock: socket.socket,
    context: ssl.SSLContext,
    server_hostname: str,
    address: tuple[Any, ...],
    session: ssl.SSLSession | None = None,
) -> Transport:
    tls = context.wrap_socket(
        sock, server_hostname=server_hostname, do_handshake_on_connect=False, session=session
    )
    transport = Transport(tls, peer=(str(address[0]), int(address[1])))
    try:
        await tls_handshake(transport)
    except BaseException:
        transport.close()
        raise
    return transport


async def tls_handshake(transport: Transport) -> None:
    """Run the TLS handshake of an ``ssl.SSLSocket`` transport. Raises ``OSError``."""
    assert isinstance(transport.sock, ssl.SSLSocket)
    sock = transport.sock
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            await transport._wait(readable=True)
        except ssl.SSLWantWriteError:
            await transport._wait(readable=False)


def server_tls_context(cert_file: str, key_file: str = "") -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2+, HTTP/1.1 only: WebSockets need it)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(cert_file, key_file or None)
    return context


def wrap_server_tls(sock: socket.socket, context: ssl.SSLContext | None) -> socket.socket:
    """Wrap an accepted socket for TLS; the handshake runs later (:func:`tls_handshake`)."""
    if context is None:
        return sock
    return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)


def open_listener(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket (``SO_REUSEADDR``), with the TCP options its
    connections inherit where the kernel copies them (:data:`ACCEPTED_INHERIT_TCP_OPTIONS`)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, address = infos[0]
    listener = socket.socket(family, type_, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if ACCEPTED_INHERIT_TCP_OPTIONS:
            _set_tcp_options(listener)
        listener.bind(address)
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


async def accept(listener: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
    """Accept one connection, waiting while none is pending."""
    while True:
        try:
            sock, address = listener.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)
            continue
        except OSError as exc:
            # Out of file descriptors, or a connection aborted before accept: back off.
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                await trio.sleep(0.1)
                continue
            if exc.errno == errno.ECONNABORTED:
                continue
            raise
        if ACCEPTED_INHERIT_TCP_OPTIONS:
            sock.setblocking(False)  # accept4 cannot be asked for O_NONBLOCK from Python
        else:  # pragma: no cover - not Linux
            tune_stream_socket(sock)
        return sock, (str(address[0]), int(address[1]))
