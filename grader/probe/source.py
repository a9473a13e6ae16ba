"""The code the grader sends into the kernel: :mod:`grader.probe.inkernel` before the first cell,
and after the last a call of the probe with the plan written out as literals.

The plan travels inside the code (1.7 MB of base64: measured, it compiles in 18 ms and IPython's
input transformers take 0.13 s over it), so no file of the probe is ever put in, or read from, the
student's working directory. Literals, not JSON or
``.npz``: the kernel decodes them with the compiler and ``binascii``, which a notebook can't replace.
"""
from __future__ import annotations

import binascii
from pathlib import Path

from grader.probe import channel, inkernel
from grader.probe.plan import Plan

_SOURCE = Path(inkernel.__file__).read_text()
_SPACING = 10  # lines between the plan and the code that uses it


def prelude_code(seed: int, threads: int, fast_data: bool) -> str:
    """Run :func:`inkernel.prelude` in a namespace of its own, with its own copy of ``builtins``
    (taken before any cell ran, so the probe's code never sees a builtin the notebook replaced);
    the student's names are untouched."""
    return ("import builtins as __labgrader\n"
            "__labgrader = {'__name__': 'labgrader', '__builtins__': dict(vars(__labgrader))}\n"
            f"exec(compile({_SOURCE!r}, '<labgrader>', 'exec'), __labgrader)\n"
            f"__labgrader['prelude']({seed!r}, {threads!r}, {fast_data!r})\n"
            "del __labgrader\n")


def probe_code(plan: Plan, inner_channel_dir: str) -> str:
    """Call the probe the prelude left, with ``plan``; it answers on the socket in the channel
    directory, ``inner_channel_dir`` being that directory as the kernel sees it.

    The class is looked up among ``object``'s subclasses by attribute access on a literal: no
    builtin, import or name the notebook could have replaced is involved. The prelude made it before
    any cell ran, so it comes first, before any class of the same name a notebook may define."""
    payload = probe_payload(plan, f"{inner_channel_dir.rstrip('/')}/{channel.socket_name(plan.nonce)}")
    # The plan is on the first line, far from every line that can raise: a traceback shows a few
    # lines around the failing one, and must not print 1.7 MB of base64.
    return (f"__labgrader_plan = {payload!r}\n" + "#\n" * _SPACING
            + "for __labgrader in ().__class__.__base__.__subclasses__():\n"
            f"    if __labgrader.__name__ == {inkernel.PROBE_CLASS!r} and __labgrader.__module__ == 'labgrader':\n"
            "        __labgrader.probe(__labgrader_plan)\n"
            "        break\n"
            "else:\n"
            "    raise RuntimeError(\"labgrader's probe is gone from the kernel: the notebook removed it\")\n"
            "del __labgrader, __labgrader_plan\n")


def probe_payload(plan: Plan, socket_path: str) -> dict:
    """What the probe is called with: the plan as plain literals, and where to send the answer."""
    return {
        "header": channel.header(plan.nonce),
        "socket": socket_path,
        "settings": plan.settings(),
        "arrays": {name: (str(array.dtype), list(array.shape),
                          binascii.b2a_base64(array.tobytes(), newline=False).decode())
                   for name, array in plan.arrays.items()},
    }
