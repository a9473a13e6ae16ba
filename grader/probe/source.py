"""The code the grader sends into the kernel: :mod:`grader.probe.inkernel` before the first cell,
and after the last a call of the probe with the plan.

The plan's arrays (1.3 MB) go into one file in the kernel's channel directory, the grader's, which
the sandbox binds read-only, beside the socket the answer comes back on; the code carries only the
file's layout and the settings, as literals. So no file of the probe is ever put in, or read from,
the student's working directory, and the notebook can't change the inputs. Until 2026-12-01 the
arrays travelled inside the code as 1.7 MB of base64: the epilogue's round trip took 0.9-1.5 s
against 0.35 s for the probe's own work (the kernel echoes the code on IOPub, IPython transforms it,
both ends encode and sign the messages); with the file it takes about the probe's own time. The
kernel reads the file with ``_io.FileIO`` and decodes it with ``torch.frombuffer``, which a notebook
can't replace.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from grader.probe import channel, inkernel
from grader.probe.plan import Plan

_SOURCE = Path(inkernel.__file__).read_text()


def prelude_code(seed: int, threads: int, fast_data: bool) -> str:
    """Run :func:`inkernel.prelude` in a namespace of its own, with its own copy of ``builtins``
    (taken before any cell ran, so the probe's code never sees a builtin the notebook replaced);
    the student's names are untouched."""
    return ("import builtins as __labgrader\n"
            "__labgrader = {'__name__': 'labgrader', '__builtins__': dict(vars(__labgrader))}\n"
            f"exec(compile({_SOURCE!r}, '<labgrader>', 'exec'), __labgrader)\n"
            f"__labgrader['prelude']({seed!r}, {threads!r}, {fast_data!r})\n"
            "del __labgrader\n")


def probe_code(plan: Plan, channel_dir: Path | str, inner_channel_dir: str | None = None) -> str:
    """Call the probe the prelude left, with ``plan``, whose arrays this writes into the channel
    directory ``channel_dir``; it answers on the socket there. ``inner_channel_dir``: that directory
    as the kernel sees it (the same path when None).

    The class is looked up among ``object``'s subclasses by attribute access on a literal: no
    builtin, import or name the notebook could have replaced is involved. The prelude made it before
    any cell ran, so it comes first, before any class of the same name a notebook may define."""
    inner = (inner_channel_dir or str(channel_dir)).rstrip("/")
    payload = probe_payload(plan, Path(channel_dir), inner)
    return (f"__labgrader_plan = {payload!r}\n"
            + "for __labgrader in ().__class__.__base__.__subclasses__():\n"
            f"    if __labgrader.__name__ == {inkernel.PROBE_CLASS!r} and __labgrader.__module__ == 'labgrader':\n"
            "        __labgrader.probe(__labgrader_plan)\n"
            "        break\n"
            "else:\n"
            "    raise RuntimeError(\"labgrader's probe is gone from the kernel: the notebook removed it\")\n"
            "del __labgrader, __labgrader_plan\n")


def probe_payload(plan: Plan, channel_dir: Path, inner_channel_dir: str) -> dict:
    """What the probe is called with: the plan's settings, where its arrays are (written here into
    ``channel_dir``: one file of their bytes, end to end) and where to send the answer."""
    layout, offset = {}, 0
    for name, array in plan.arrays.items():
        layout[name] = (str(array.dtype), list(array.shape), offset, array.nbytes)
        offset += array.nbytes
    # A new file or none (O_EXCL, O_NOFOLLOW): nothing planted under its name is written through.
    descriptor = os.open(channel_dir / inputs_name(plan.nonce), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW)
    with os.fdopen(descriptor, "wb") as inputs:
        os.fchmod(descriptor, 0o644)  # the job's uid reads it; the directory stays the grader's
        for array in plan.arrays.values():
            inputs.write(np.ascontiguousarray(array).tobytes())
    return {
        "header": channel.header(plan.nonce),
        "socket": f"{inner_channel_dir}/{channel.socket_name(plan.nonce)}",
        "inputs": f"{inner_channel_dir}/{inputs_name(plan.nonce)}",
        "settings": plan.settings(),
        "arrays": layout,
    }


def inputs_name(nonce: str) -> str:
    return f"inputs-{nonce}.bin"
