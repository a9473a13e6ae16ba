"""The executor's client: nbclient's :class:`NotebookClient`, with what grading needs on top.

* output is counted as it arrives, comm (widget) messages included; past ``output_bytes`` the rest
  is dropped, a note says so, and the kernel is stopped. ZMQ's per-message size cap and receive
  queue bound this process's memory even against a kernel that sends huge messages on purpose;
* a timed-out cell is interrupted and gets ``INTERRUPT_GRACE`` seconds to stop before the kernel is
  killed;
* :meth:`GradingClient.run_trusted` runs the grader's own code (set-up, probe), never recorded as a
  cell;
* :func:`connected` is how the grader waits for a kernel to answer, without jupyter_client's 0.2 s of
  waiting for IOPub to fall silent.
"""
from __future__ import annotations

import asyncio
import contextlib
import queue
import time
from typing import Any, Callable

import nbformat
import zmq
import zmq.asyncio
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionComplete, DeadKernelError
from zmq.utils.monitor import parse_monitor_message

INTERRUPT_GRACE = 5.0  # seconds a timed-out cell gets to stop after the interrupt
STARTUP_TIMEOUT = 60.0  # seconds for the kernel to start and answer


def message_size(msg: dict[str, Any]) -> int:
    """Bytes a kernel message adds: its content's strings by length, anything else 8, and its binary
    buffers (widgets send data there). A loop, not recursion: the kernel can send content nested
    as deep as the JSON parser allows, which is deeper than the rest of the stack leaves room for."""
    total = sum(memoryview(buffer).nbytes for buffer in msg.get("buffers") or ())
    pending = [msg["content"]]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            total += sum(len(str(key)) for key in item)
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        else:
            total += 8
    return total


async def connected(kc, timeout: float) -> None:
    """Wait until the kernel answers a kernel_info request of ``kc``'s and ``kc``'s IOPub socket has
    received that request's closing ``idle`` status. Raises RuntimeError when the kernel dies or has
    not answered within ``timeout`` seconds.

    jupyter_client's ``wait_for_ready`` accepts any IOPub message as proof that IOPub is connected,
    then reads until IOPub has been silent for 0.2 s: a fifth of each notebook's time outside its
    cells. The request's own ``idle`` is stronger proof and needs no silence: ZMQ delivers a
    connection's messages in order, so nothing the kernel published before it is still on the way.
    A request whose ``idle`` does not come (IOPub subscribed too late for it) is asked again."""
    deadline = time.monotonic() + timeout
    while True:
        request = kc.kernel_info()
        reply = await _received(kc.shell_channel, lambda msg: _parent(msg) == request, 1)
        idle = reply is not None and await _received(
            kc.iopub_channel, lambda msg: _parent(msg) == request and msg["msg_type"] == "status"
            and msg["content"].get("execution_state") == "idle", 0.5)
        if idle:
            kc._handle_kernel_info_reply(reply)  # the protocol version, as wait_for_ready takes it
            return
        if not await kc.is_alive():
            raise RuntimeError("the kernel died before it answered")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the kernel did not answer in {timeout:g} s")


def _parent(msg: dict) -> str | None:
    return msg.get("parent_header", {}).get("msg_id")


async def _received(channel, wanted: Callable[[dict], bool], seconds: float) -> dict | None:
    """The first message on ``channel`` that ``wanted`` accepts within ``seconds``, or None; the
    others read meanwhile are dropped (replies and output of no request of the grader's)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = await channel.get_msg(timeout=left)
        except queue.Empty:
            return None
        if wanted(msg):
            return msg
    return None


class GradingClient(NotebookClient):
    """NotebookClient that caps output, kills on ignored interrupts, and records timeouts.

    ``killer(why)``: kills the kernel, called when the output cap is passed or an interrupt ignored."""

    def __init__(self, nb, km, *, output_bytes: int, killer: Callable[[str], None], **kw):
        super().__init__(nb, km=km, **kw)
        self.output_cap = output_bytes
        self.output_seen = 0
        self.output_truncated = False
        self.timed_out = False
        self.killed_after_interrupt = False
        self._killer = killer
        # Bound what one message and the receive queue can cost this process.
        self.zmq_context = zmq.asyncio.Context()
        self.zmq_context.setsockopt(zmq.MAXMSGSIZE, output_bytes + (4 << 20))
        self.zmq_context.setsockopt(zmq.RCVHWM, 64)
        self.zmq_context.setsockopt(zmq.LINGER, 0)
        self.closing = False
        self.current_cell = None

    async def async_start_new_kernel_client(self):
        self.kc = self.km.client(context=self.zmq_context)
        self.kc.start_channels()
        # A message over MAXMSGSIZE makes ZMQ drop the connection (and silently reconnect):
        # watch for that, it means the kernel sent more output than the cap at once.
        self._monitor = self.kc.iopub_channel.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._monitor_task = asyncio.ensure_future(self._watch_disconnects())
        await connected(self.kc, self.startup_timeout)
        self.kc.allow_stdin = False
        return self.kc

    async def _watch_disconnects(self):
        with contextlib.suppress(Exception, asyncio.CancelledError):
            while True:
                event = parse_monitor_message(await self._monitor.recv_multipart())
                if event["event"] != zmq.EVENT_DISCONNECTED:
                    continue
                # A dying kernel disconnects too: only a kernel still alive a second later
                # has had a message refused for its size.
                for _ in range(10):
                    await asyncio.sleep(0.1)
                    if self.closing or not await self.km.is_alive():
                        break
                else:
                    if self.current_cell is not None and not self.output_truncated:
                        self.output_seen = self.output_cap
                        self.truncate(self.current_cell)

    def stop(self) -> None:
        """Stop watching and listening; the kernel is the caller's to stop."""
        self.closing = True
        task = getattr(self, "_monitor_task", None)
        if task is not None:
            task.cancel()
        with contextlib.suppress(Exception):
            self.kc.iopub_channel.socket.disable_monitor()
        with contextlib.suppress(Exception):
            self._monitor.close(linger=0)
        with contextlib.suppress(Exception):
            if self.kc is not None:
                self.kc.stop_channels()

    async def async_execute_cell(self, cell, cell_index, **kw):
        self.current_cell = cell
        try:
            return await super().async_execute_cell(cell, cell_index, **kw)
        finally:
            self.current_cell = None

    # -- output cap -------------------------------------------------------------------------
    def process_message(self, msg, cell, cell_index):
        msg_type = msg["msg_type"]
        if self.output_truncated:
            if msg_type == "status" and msg["content"].get("execution_state") == "idle":
                raise CellExecutionComplete()
            return None
        # Every message counts but the kernel's busy/idle and its echo of the cell's own
        # source: comm (widget) messages too, which carry no output but cost as much.
        if msg_type not in ("status", "execute_input"):
            size = message_size(msg)
            if self.output_seen + size > self.output_cap:
                room = max(0, self.output_cap - self.output_seen)
                text = msg["content"].get("text")
                if msg_type == "stream" and room and isinstance(text, str):
                    msg["content"]["text"] = text[:room]
                    super().process_message(msg, cell, cell_index)
                self.output_seen = self.output_cap
                self.truncate(cell)
                raise CellExecutionComplete()
            self.output_seen += size
        if msg_type.startswith("comm"):
            # Not passed on: nbclient would keep every widget's state for the notebook's
            # metadata (160 MB of it grew the grader by as much) and mimic a front end's
            # Output widget; the grader needs neither.
            return None
        return super().process_message(msg, cell, cell_index)

    def truncate(self, cell):
        self.output_truncated = True
        cell.outputs.append(nbformat.v4.new_output(
            "stream", name="stderr",
            text=f"\n[labgrader] output truncated: the notebook's output passed the "
                 f"{self.output_cap}-byte limit, so the rest was dropped and the kernel "
                 f"was stopped.\n"))
        self._killer("output limit")

    # -- timeouts ---------------------------------------------------------------------------
    async def _async_handle_timeout(self, timeout, cell=None):
        """Interrupt; give the cell INTERRUPT_GRACE s to answer, else kill the kernel."""
        self.timed_out = True
        with contextlib.suppress(Exception):
            await self.km.interrupt_kernel()
        reply = await self._shell_reply(lambda msg: msg.get("msg_type") == "execute_reply", INTERRUPT_GRACE)
        if reply is not None:
            return reply
        self.killed_after_interrupt = True
        self._killer("ignored interrupt")
        raise DeadKernelError("kernel killed after ignoring the interrupt")

    # -- the grader's own code ----------------------------------------------------------------
    async def run_trusted(self, code: str, timeout: float) -> dict | None:
        """Run the grader's code (not a cell); its execute_reply, or None (timed out, kernel died:
        a kernel that has not answered within ``timeout`` is killed)."""
        msg_id = self.kc.execute(code, silent=False, store_history=False, allow_stdin=False,
                                 stop_on_error=False)
        try:
            reply = await self._shell_reply(lambda msg: msg.get("parent_header", {}).get("msg_id") == msg_id, timeout)
        except DeadKernelError:
            return None
        if reply is None:
            self._killer("grader code timed out")
        return reply

    async def _shell_reply(self, wanted: Callable[[dict], bool], seconds: float) -> dict | None:
        """The first shell message ``wanted`` accepts within ``seconds``, or None; raises
        :class:`DeadKernelError` when the kernel dies while it waits."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:  # half a second at a time, to notice a dead kernel
                msg = await _received(self.kc.shell_channel, wanted, min(left, 0.5))
            except Exception:  # noqa: BLE001 - a closed socket: whether the kernel lives decides
                msg = None
            if msg is not None:
                return msg
            if not await self.kc.is_alive():
                raise DeadKernelError("the kernel died") from None
        return None
