"""The grader's end of the probe's channel: a Unix socket in a directory only the grader can write.

Nothing of the probe passes through the student's working directory: the plan's arrays go into the
kernel's channel directory (``Kernel.channel_dir``) beside the socket, and the answer comes back
here. The sandbox binds that directory read-only: the kernel can connect
(the socket is mode 0666 for the job's uid) but can't create, replace or link anything there, and
the grader opens no path a notebook chose.

A thread reads every connection non-blocking, at most :data:`MAX_ANSWER_BYTES` from each and
:data:`MAX_OPEN` at once, until a deadline, so no notebook can make the grader wait for ever or read
without end. The answer is the one complete message that begins with the plan's header (it names
the nonce); anything else is counted and ignored. Two messages with the header void both: only one
can be the probe's, and nothing says which.
"""
from __future__ import annotations

import json
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_ANSWER_BYTES = 8_000_000  # the lab's answers are about 0.6 MB, a 784-128-10 network's 2 MB more
MAX_OPEN = 4
CLOSE_GRACE_S = 2.0  # for what the kernel sent before it stopped, still in the socket's buffer
_CHUNK = 1 << 16


def socket_name(nonce: str) -> str:
    return f"probe-{nonce}.sock"


def header(nonce: str) -> str:
    return f"labgrader-probe {nonce}\n"


@dataclass(frozen=True)
class Received:
    """What the grader's end of the channel got while the probe ran."""

    message: Any | None = None  # the decoded JSON of the one answer
    answers: int = 0  # complete messages that began with the header
    ignored: int = 0  # other connections: another beginning, too many bytes, or unfinished
    problem: str | None = None  # why there is no message, in the student's terms
    sent: bool = False  # whether the probe's code was sent at all (not when the kernel died first)

    def findings(self, probe_error: str | None) -> tuple[str, ...]:
        """Integrity findings the grader itself makes. ``probe_error``: the epilogue's error, if any."""
        found = []
        if self.answers > 1:
            found.append(f"the probe's channel received {self.answers} answers carrying its nonce; only "
                         "one can be the probe's, so none was used")
        if self.ignored:
            found.append(f"{self.ignored} other connection(s) to the probe's channel were ignored")
        if self.sent and self.answers == 0 and probe_error is None:
            found.append("the probe's code ran without error but sent no answer (did the notebook change "
                         "the code the kernel runs?)")
        return tuple(found)

    def to_json(self) -> dict[str, Any]:
        return {"message": self.message, "answers": self.answers, "ignored": self.ignored,
                "problem": self.problem, "sent": self.sent}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "Received":
        return cls(**raw)


class Channel:
    """Listen for one probe's answer; :meth:`close` says what came.

    ``timeout``: how long to listen at most, from now, even if :meth:`close` is never called."""

    def __init__(self, directory: Path, nonce: str, timeout: float):
        self.path = Path(directory) / socket_name(nonce)
        self._header = header(nonce).encode()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(str(self.path))
            os.chmod(self.path, 0o666)  # the job's uid connects; the directory stays the grader's
            self._listener.listen(MAX_OPEN)
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            raise
        self._until = time.monotonic() + timeout
        self._stop = threading.Event()
        self._received = Received(sent=True, problem="the probe sent no answer")
        self._thread = threading.Thread(target=self._serve, name="labgrader-probe-channel", daemon=True)
        self._thread.start()

    def close(self, grace: float = CLOSE_GRACE_S) -> Received:
        """Stop listening once what is pending has been read (``grace`` seconds at most)."""
        self._until = min(self._until, time.monotonic() + grace)
        self._stop.set()
        self._thread.join()
        return self._received

    def _serve(self) -> None:
        reading: dict[socket.socket, bytearray] = {}
        answers: list[bytes] = []
        ignored = 0
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            try:
                while (left := self._until - time.monotonic()) > 0:
                    events = selector.select(min(left, 0.1))
                    if not events and not reading and self._stop.is_set():
                        break  # told to stop, and nothing is waiting or half read
                    for key, _ in events:
                        if key.fileobj is self._listener:
                            ignored += self._accept(selector, reading)
                        else:
                            ignored += self._read(key.fileobj, selector, reading, answers)
            finally:
                ignored += len(reading)  # never finished
                for connection in reading:
                    connection.close()
                self._listener.close()
                self.path.unlink(missing_ok=True)
        self._received = _decode(answers, ignored)

    def _accept(self, selector: selectors.BaseSelector, reading: dict[socket.socket, bytearray]) -> int:
        """Take every waiting connection; those past :data:`MAX_OPEN` are closed at once."""
        refused = 0
        while True:
            try:
                connection, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return refused
            if len(reading) >= MAX_OPEN:
                connection.close()
                refused += 1
                continue
            connection.setblocking(False)
            selector.register(connection, selectors.EVENT_READ)
            reading[connection] = bytearray()

    def _read(self, connection: Any, selector: selectors.BaseSelector,
              reading: dict[socket.socket, bytearray], answers: list[bytes]) -> int:
        """Read what one connection has; 1 when it turned out not to be an answer."""
        buffer = reading[connection]
        try:
            chunk = connection.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            chunk = None  # reset by the peer: whatever came is all there is, and it is unfinished
        if chunk:
            buffer += chunk
            start = bytes(buffer[:len(self._header)])
            if self._header.startswith(start) and len(buffer) <= len(self._header) + MAX_ANSWER_BYTES:
                return 0
        selector.unregister(connection)
        connection.close()
        del reading[connection]
        if chunk == b"" and buffer.startswith(self._header):
            # Only the first is kept whole; later ones are counted: two answers void each other.
            answers.append(b"" if answers else bytes(buffer[len(self._header):]))
            return 0
        return 1


def _decode(answers: list[bytes], ignored: int) -> Received:
    if len(answers) != 1:
        problem = ("the probe sent no answer" if not answers else
                   f"the probe's channel received {len(answers)} answers carrying its nonce, so none was used")
        return Received(answers=len(answers), ignored=ignored, problem=problem, sent=True)
    try:
        message = json.loads(answers[0])
    except (ValueError, RecursionError) as error:
        return Received(answers=1, ignored=ignored, sent=True,
                        problem=f"the probe's answer was not valid JSON ({type(error).__name__})")
    return Received(message=message, answers=1, ignored=ignored, sent=True)
