"""The only labgrader code that runs inside the student's kernel.

It is sent as source text (the grader's packages are not visible inside the sandbox) and runs in two
steps (:mod:`grader.probe.source` writes the code that calls them):

- :func:`prelude`, before the first cell: seeds every RNG, sets torch's threads, installs the fast
  data path, and captures what the probe will need pristine: the namespaces of the modules and
  classes it and the student's functions call (builtins, ``sys``, ``json``, torch's modules and
  classes as soon as torch is imported), IPython's callbacks and transformers, the import hooks,
  signal handlers, gc callbacks and the threads alive. It records what each figure shown holds, and
  leaves one class behind, ``LabgraderProbe``, with the probe as its one method.
- ``LabgraderProbe.probe(payload)``, after the last cell. The epilogue finds the class through
  ``object.__subclasses__()``, syntax only, so a notebook that replaced builtins or the import
  system can't hand it a substitute. The probe first cleans the interpreter: every IPython callback
  and transformer, trace and profile function, atexit handler, signal handler and timer, gc callback,
  torch global hook and mode goes, and every watched function the notebook replaced is put back. What
  it had to undo becomes an integrity finding. Then it calls the student's functions on the grader's
  inputs, cleans again (their code ran in between), and sends one JSON message over the grader's
  Unix socket: plain values, and arrays as raw float64 bytes. It decides nothing: every value is a
  claim the grader checks against the reference in its own process.

Its limits (docs/security.md): it runs in the student's own interpreter. The pristine references live
in a closure and on one class that a determined notebook can reach through ``gc``, and an input
transformer the notebook installed sees, and can replace, the epilogue's code before it runs. What
such a notebook can forge is only what the grader can't check against the reference outside.

Standard library and torch only: it must run wherever the notebook's kernel runs.
"""
import _io
import _socket
import atexit
import binascii
import builtins
import gc
import inspect
import json
import json.encoder
import random
import signal
import sys
import threading
import traceback
import types

PROBE_CLASS = "LabgraderProbe"
MAX_FINDINGS = 40
MAX_FIGURES = 50
MAX_PER_FIGURE = 64  # images, and lines, recorded of one figure
MAX_FORWARDS = 1000
MAX_VALUE_ITEMS = 64
MAX_VALUE_DEPTH = 4
MAX_NAMES = 100  # parameters of a signature, locals holding a graph, keys of hist
MAX_STATE_ENTRIES = 1000
# Builtins the kernel itself rebinds: input() for every request, _ to the last result shown.
VOLATILE_BUILTINS = frozenset({"input", "_", "__", "___"})
SYS_LAST_ERROR = frozenset({"last_type", "last_value", "last_traceback", "last_exc"})  # set on every error
# Callbacks libraries register when a notebook uses them: matplotlib's redraw and the inline backend's
# flush (spoofable by name, so a notebook could hide one hook this way; it still can't run after the
# probe, which removes every callback).
LIBRARY_CALLBACKS = frozenset({"matplotlib.pyplot", "matplotlib_inline.backend_inline"})
# Threads libraries start on their own: pyzmq's garbage collector, once the kernel sends a large
# message (a figure). By exact class: a notebook's thread of that class runs only zmq's loop.
LIBRARY_THREADS = (("zmq.utils.garbage", "GarbageCollectorThread"),)
# What Python caches on a class by itself: copy/pickle store __slotnames__ on first use.
CLASS_CACHES = frozenset({"__slotnames__"})


def prelude(seed, threads, fast_data):
    """Before the notebook: seeds, threads, the fast data path, and the pristine state the probe
    restores. torch's parts happen when torch is first imported, right after its own import and
    before any notebook code can touch it; the notebook imports torch anyway, so the kernel spends no
    time on it before cell 1."""
    from IPython import get_ipython

    random.seed(seed)
    figures = _Figures.install(get_ipython())
    guard = _Guard(figures.shell)

    def seed_numpy(numpy):
        numpy.random.seed(seed)

    def on_torch(torch):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        guard.watch_torch(torch)

    actions = {"numpy": seed_numpy, "torch": on_torch}
    if fast_data:
        actions["torchvision.datasets.mnist"] = _install_fast_data
    _AfterImport.install(actions, guard)
    caller = sys._getframe

    def probe(payload):
        """Called by the epilogue; the student's names are in the namespace it runs in."""
        probe_namespace(payload, guard, figures, caller(1).f_globals)

    guard.anchor(type(PROBE_CLASS, (), {"probe": staticmethod(probe), "__module__": "labgrader"}))


class _AfterImport:
    """A meta-path finder that runs an action on a module right after its first import.

    Python has no post-import hook of its own; this wraps the real loader's ``exec_module``. What the
    import itself changes in the namespaces the guard watches is the library's doing (importing torch
    replaces ``inspect.getfile``), so the guard takes it as pristine.
    """

    def __init__(self, actions, guard):
        self.actions, self.guard = actions, guard

    @classmethod
    def install(cls, actions, guard):
        pending = {}
        for name, action in actions.items():
            if name in sys.modules:
                action(sys.modules[name])
            else:
                pending[name] = action
        if pending:
            sys.meta_path.insert(0, cls(pending, guard))

    def find_spec(self, name, path=None, target=None):
        if name not in self.actions:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        action = self.actions.pop(name)
        if not self.actions:
            sys.meta_path.remove(self)
        exec_module = spec.loader.exec_module
        guard = self.guard

        def exec_then_act(module):
            guard.library_import(exec_module, module)
            action(module)

        spec.loader.exec_module = exec_then_act
        return spec


def _install_fast_data(mnist=None):
    """Serve ``MNIST[i]`` under a plain ``ToTensor`` from a tensor converted once.

    torchvision builds a PIL image per item and converts it back (about 9 s per epoch of 60000 on
    two cores). Here ``data.to(default dtype).div_(255)`` is built once (0.1 s for 60000; converting
    the permuted view instead took 1.4 to 2.3 s) and gives bitwise the same tensor (ToTensor converts
    uint8 to the default float dtype and divides by 255), with the same shape and strides. A
    DataLoader's batch is fetched with one gather through ``__getitems__``, which torch's fetcher and
    ``Subset`` call when a dataset has it (a training epoch of 60000 in batches of 64, one thread:
    1.1 s, against 1.5 s item by item). Any other transform, a target transform, a subclass, a replaced
    ``__getitem__``, data that is not a 3-d uint8 tensor, an index that is not an integer or one out
    of range takes the stock path, item by item as torch's fetcher would. The converted copy is
    rebuilt when ``data`` is replaced, edited in place (its version counter moves), ``targets``
    likewise, or the default dtype changes.
    """
    import operator

    import torch

    if mnist is None:
        from torchvision.datasets import mnist
    MNIST, FashionMNIST = mnist.MNIST, mnist.FashionMNIST
    stock_getitem = MNIST.__getitem__
    to_tensor = []  # looked up at the first item: torchvision may still be importing when this runs

    def converted(self):
        """(images, labels or None, targets) converted once, or None where the stock path serves."""
        if not to_tensor:
            from torchvision.transforms import ToTensor
            to_tensor.append(ToTensor)
        data = self.data
        if (type(self) not in (MNIST, FashionMNIST) or type(self).__getitem__ is not getitem
                or type(self.transform) is not to_tensor[0] or self.target_transform is not None
                or type(data) is not torch.Tensor or data.dtype != torch.uint8 or data.dim() != 3):
            return None
        dtype = torch.get_default_dtype()
        targets = self.targets
        cached = self.__dict__.get("_labgrader_tensor")
        if (cached is None or cached[0] is not data or cached[1] != data._version or cached[2] is not dtype
                or cached[3] is not targets or cached[4] != getattr(targets, "_version", None)):
            # (N, 1, H, W) with strides (H*W, 1, W, 1): an item is then shaped and strided exactly
            # like ToTensor's output, (H, W, 1) permuted to (1, H, W). ``to`` copies, so the in-place
            # division never reaches ``data``.
            images = data.to(dtype).div_(255).unsqueeze(3).permute(0, 3, 1, 2)
            # Without labels (targets that are not one per image) a label is read as the stock path
            # reads it, and fails as it does.
            labels = (targets.tolist() if type(targets) is torch.Tensor and targets.dim() == 1
                      and len(targets) == len(data) else None)
            cached = (data, data._version, dtype, targets, getattr(targets, "_version", None), images, labels)
            self.__dict__["_labgrader_tensor"] = cached
        return cached[5], cached[6], targets

    def getitem(self, index):
        if isinstance(index, bool):
            return stock_getitem(self, index)
        try:
            operator.index(index)  # ints, numpy ints, 0-d integer tensors
        except TypeError:
            return stock_getitem(self, index)
        served = None if isinstance(index, torch.Tensor) and index.dim() != 0 else converted(self)
        if served is None:
            return stock_getitem(self, index)
        images, labels, targets = served
        # A copy, as the stock path returns a new tensor: in-place edits must not reach the cache.
        return images[index].clone(), (labels[index] if labels is not None else int(targets[index]))

    def getitems(self, indices):
        served = converted(self) if type(indices) is list and indices else None
        if served is None or served[1] is None:
            return [self[index] for index in indices]
        images, labels, _ = served
        size = len(images)
        if not all(type(index) is int and -size <= index < size for index in indices):
            return [self[index] for index in indices]
        # One gather into a new tensor; each item is a view of it, so the cache is never shared.
        batch = images[torch.tensor(indices)]
        return [(image, labels[index]) for image, index in zip(batch.unbind(0), indices)]

    MNIST.__getitem__ = getitem
    MNIST.__getitems__ = getitems
    mnist._labgrader_fast_data = True


# ---------------------------------------------------------------------------------------------
# The pristine interpreter, and putting it back


def _name(thing):
    """A short name for a function or object the notebook left, without running its code."""
    if isinstance(thing, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
        name = getattr(thing, "__qualname__", None) or type(thing).__qualname__
    else:
        name = type(thing).__qualname__
    return str(name)[:80]


def _among(thing, things):
    """``thing in things`` by identity: ``in`` would run a notebook object's ``__eq__``."""
    return any(thing is other for other in things)


def _module_of(thing):
    """The module a function or class (or an object's class) was defined in, without running a
    notebook object's code."""
    owner = thing if isinstance(thing, (types.FunctionType, type)) else type(thing)
    return str(owner.__module__)


def _defined_in_a_file(hook):
    """Whether a hook comes from an imported module's file, as a library's does; one defined in a
    cell comes from IPython's ``__main__``, which has no file."""
    return getattr(sys.modules.get(_module_of(hook)), "__file__", None) is not None


def _same(current, original):
    """Whether ``current`` is still ``original``: itself, an equal bound method (IPython binds its
    hooks again for every cell), or a functools.wraps wrapper of it (torch wraps some of its own
    functions after import: the first optimizer wraps its class's ``step``, dynamo wraps
    ``manual_seed``). Only Python's own types are asked, so no notebook object's code runs here."""
    if current is original:
        return True
    if type(current) is types.MethodType and type(original) is types.MethodType:
        return current == original
    for _ in range(8):
        if type(current) is not types.FunctionType:
            return False
        current = current.__dict__.get("__wrapped__")
        if current is original:
            return True
    return False


def _signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal has no name of its own
        return f"signal {number}"


class _Namespace:
    """One module's or class's attributes as they were when captured; :meth:`restore` puts back what
    was replaced or removed (and, for a class, removes what was added: it would shadow a base's)."""

    def __init__(self, label, owner, skip=frozenset()):
        self.label, self.owner = label, owner
        self.is_class = isinstance(owner, type)
        skip = skip | CLASS_CACHES if self.is_class else skip
        self.snapshot = {key: value for key, value in vars(owner).items() if key not in skip and (
            self.is_class or owner is builtins or callable(value) or isinstance(value, types.ModuleType))}
        self.skip = skip

    def accept(self, before):
        """Take what changed since ``before`` (a copy of the namespace) as pristine."""
        current = vars(self.owner)
        for key, value in current.items():
            if key not in self.skip and before.get(key, _MISSING) is not value and (
                    self.is_class or self.owner is builtins or callable(value) or isinstance(value, types.ModuleType)):
                self.snapshot[key] = value
        for key in [key for key in self.snapshot if key not in current and key in before]:
            del self.snapshot[key]

    def restore(self):
        findings = []
        current = vars(self.owner)
        for key, value in self.snapshot.items():
            now = current.get(key, _MISSING)
            if _same(now, value):
                continue
            findings.append(f"{self.label}.{key} {'removed' if now is _MISSING else 'replaced'}")
            setattr(self.owner, key, value)
        if self.is_class:
            for key in [k for k in current if k not in self.snapshot and k not in self.skip]:
                inherited = any(key in vars(base) for base in self.owner.__mro__[1:])
                findings.append(f"{self.label}.{key} {'replaced' if inherited else 'added'}")
                delattr(self.owner, key)
        return findings


_MISSING = object()


class _Guard:
    """What the probe relies on, captured pristine before the first cell, and :meth:`clean`, which
    puts it back and says what it had to undo."""

    def __init__(self, shell):
        self.shell = shell
        self.namespaces = [_Namespace("builtins", builtins, VOLATILE_BUILTINS),
                           _Namespace("sys", sys, SYS_LAST_ERROR)] + [
            _Namespace(label, owner) for label, owner in (
                ("threading", threading), ("inspect", inspect), ("traceback", traceback),
                ("json", json), ("json.encoder", json.encoder), ("JSONEncoder", json.JSONEncoder),
                ("binascii", binascii), ("gc", gc))]
        self.torch = None
        self.socket = _socket.socket  # an immutable C type: its methods can't be replaced
        self.import_hooks = list(sys.meta_path) + list(sys.path_hooks)
        self.gc_callbacks = list(gc.callbacks)
        self.signals = {number: signal.getsignal(number) for number in signal.valid_signals()}
        self.threads = set(sys._current_frames())
        self.reported_threads = set()
        self.callbacks, self.transformers = {}, {}
        if self.shell is not None:
            self.events = self.shell.events
            self.callbacks = {event: list(functions) for event, functions in self.events.callbacks.items()}
            self.transformers = {label: list(functions) for label, functions in self._transformer_lists()}

    @staticmethod
    def anchor(probe_class):
        """Keep the probe's class alive: the epilogue finds it among ``object``'s subclasses, which
        Python holds only weakly."""
        sys._labgrader_probe = probe_class

    def library_import(self, exec_module, module):
        """Import a library (run its module's code): what that changes in the watched namespaces is
        the library's own doing, and pristine."""
        before = [dict(vars(namespace.owner)) for namespace in self.namespaces]
        exec_module(module)
        for namespace, was in zip(self.namespaces, before):
            namespace.accept(was)

    def watch_torch(self, torch):
        """Capture torch's namespaces right after its import: the probe's own calls and the ones the
        student's train_epoch, validate and train make on the grader's network."""
        from torch.nn.modules import module
        from torch.optim import optimizer
        from torch.utils.data import dataloader

        self.torch, self.global_hooks = torch, ((module, "_global_"), (optimizer, "_global_optimizer"))
        nn, optim, data = torch.nn, torch.optim, torch.utils.data
        self.namespaces += [_Namespace(label, owner) for label, owner in (
            ("torch", torch), ("torch.nn", nn), ("torch.nn.functional", nn.functional),
            ("torch.autograd", torch.autograd), ("torch.optim", optim), ("torch.utils.data", data),
            ("torch.Tensor", torch.Tensor), ("torch.nn.Module", nn.Module), ("torch.nn.Sequential", nn.Sequential),
            ("torch.nn.Linear", nn.Linear), ("torch.nn.Flatten", nn.Flatten), ("torch.nn.LogSoftmax", nn.LogSoftmax),
            ("torch.nn.NLLLoss", nn.NLLLoss), ("torch.optim.Optimizer", optim.Optimizer),
            ("torch.optim.SGD", optim.SGD),
            ("DataLoader", data.DataLoader), ("TensorDataset", data.TensorDataset),
            ("DataLoader iterator", dataloader._BaseDataLoaderIter),
            ("DataLoader single-process iterator", dataloader._SingleProcessDataLoaderIter),
            ("torch.no_grad", torch.no_grad))]

    def _transformer_lists(self):
        manager = self.shell.input_transformer_manager
        return (("input", manager.cleanup_transforms), ("input line", manager.line_transforms),
                ("input token", manager.token_transformers), ("input post", self.shell.input_transformers_post),
                ("AST", self.shell.ast_transformers))

    def clean(self, when=""):
        """Put the interpreter back as captured and remove whatever could run during or after the
        probe. Returns what had to be undone, each with ``when`` appended."""
        findings = (self._ipython() + [f for ns in self.namespaces for f in ns.restore()] + self._tracing()
                    + self._signals() + self._import_hooks() + self._gc() + self._torch() + self._threads())
        atexit._clear()  # libraries register handlers too (an honest notebook has ~8): not a finding
        return [finding + when for finding in findings]

    def _ipython(self):
        if self.shell is None:
            return []
        findings = []
        if self.shell.events is not self.events:
            findings.append("IPython's event manager replaced")
            self.shell.events = self.events
        for event, functions in self.events.callbacks.items():
            before = self.callbacks.get(event, [])
            findings += [f"IPython {event} callback removed: {_name(f)}" for f in before if not _among(f, functions)]
            findings += [f"IPython {event} callback added: {_name(f)}" for f in functions
                         if not _among(f, before) and _module_of(f) not in LIBRARY_CALLBACKS]
            functions[:] = []  # none may run after the probe; the kernel is stopped right after it
        self.callbacks = {}  # what the next look must find: nothing
        for label, functions in self._transformer_lists():
            before = self.transformers[label]
            findings += [f"IPython {label} transformer added: {_name(f)}" for f in functions if not _among(f, before)]
            findings += [f"IPython {label} transformer removed: {_name(f)}" for f in before if not _among(f, functions)]
            functions[:] = before
        return findings

    def _tracing(self):
        findings = []
        for label, get, set_ in (("sys trace", sys.gettrace, sys.settrace),
                                 ("sys profile", sys.getprofile, sys.setprofile),
                                 ("threading trace", threading.gettrace, threading.settrace),
                                 ("threading profile", threading.getprofile, threading.setprofile)):
            function = get()
            if function is not None:
                findings.append(f"{label} function set: {_name(function)}")
                set_(None)
        return findings

    def _signals(self):
        findings = []
        for number, handler in self.signals.items():
            now = signal.getsignal(number)
            if now is handler or now is None or _module_of(now).startswith("torch."):
                continue  # torch's DataLoader sets a SIGCHLD handler for its worker processes
            findings.append(f"signal handler for {_signal_name(number)} replaced: {_name(now)}")
            try:
                signal.signal(number, signal.SIG_DFL if handler is None else handler)
            except (OSError, ValueError, TypeError):  # a signal Python may not handle
                pass
        for timer, name in ((signal.ITIMER_REAL, "SIGALRM"), (signal.ITIMER_VIRTUAL, "SIGVTALRM"),
                            (signal.ITIMER_PROF, "SIGPROF")):
            if signal.setitimer(timer, 0) != (0.0, 0.0):
                findings.append(f"a {name} timer was running")
        return findings

    def _import_hooks(self):
        # Finders and path hooks the notebook's own code added (a library's class comes from an
        # imported file; one defined in a cell does not), then back to the captured lists.
        findings = []
        for hooks in (sys.meta_path, sys.path_hooks):
            kept = [hook for hook in hooks if _among(hook, self.import_hooks) or isinstance(hook, _AfterImport)
                    or _defined_in_a_file(hook)]
            findings += [f"import hook added: {_name(hook)}" for hook in hooks if not _among(hook, kept)]
            hooks[:] = kept
        return findings

    def _gc(self):
        added = [f for f in gc.callbacks if not _among(f, self.gc_callbacks)]
        gc.callbacks[:] = self.gc_callbacks
        return [f"gc callback added: {_name(f)}" for f in added]

    def _torch(self):
        torch = self.torch
        if torch is None:
            return []
        findings = []
        for owner, prefix in self.global_hooks:
            for name, hooks in vars(owner).items():
                if name.startswith(prefix) and isinstance(hooks, dict) and hooks:
                    findings.append(f"torch {name.strip('_').replace('_', ' ')} registered ({len(hooks)})")
                    hooks.clear()
        for label, depth, pop in (("function", torch._C._len_torch_function_stack, torch._C._pop_torch_function_stack),
                                  ("dispatch", torch._C._len_torch_dispatch_stack, torch._C._pop_torch_dispatch_stack)):
            while depth() > 0:
                findings.append(f"torch {label} mode active: {_name(pop())}")
        torch.set_grad_enabled(True)
        return findings

    def _threads(self):
        library = tuple(getattr(sys.modules.get(module), name, None) for module, name in LIBRARY_THREADS)
        new = [ident for ident in sys._current_frames() if ident not in self.threads
               and ident not in self.reported_threads and not _among(type(threading._active.get(ident)), library)]
        self.reported_threads.update(new)
        if not new:
            return []
        names = [getattr(threading._active.get(ident), "name", f"thread {ident}") for ident in new]
        return [f"{len(new)} thread(s) the notebook started were running during the probe: {', '.join(names)[:200]}"]

    def torch_module(self):
        """Pristine torch, captured at its import or imported now when the notebook never did, and
        what to say when torch came in some other way."""
        if self.torch is not None:
            return self.torch, []
        findings = []
        if "torch" in sys.modules:
            findings.append("torch was imported without labgrader's import hook (was sys.meta_path changed?), "
                            "so its functions could not be checked")
        import torch  # the after-import action captures it, when the hook is still there

        if self.torch is None:
            self.watch_torch(torch)
        return self.torch, findings

    def send(self, path, header, answers):
        """One message, header first, over the grader's socket; closing it ends the message."""
        body = json.dumps(answers).encode()
        connection = self.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            connection.settimeout(60)
            connection.connect(path)
            connection.sendall(header.encode() + body)
        finally:
            connection.close()


class _Figures:
    """What each figure the notebook showed holds: its axes, the images drawn in them (shape and
    value range) and the lines (points each). Every figure shown, by ``plt.show()`` or the inline
    backend's flush at the end of a cell, is rendered through ``IPython.core.pylabtools.print_figure``,
    which is wrapped here (the flush itself is registered while matplotlib imports the backend,
    too early for an after-import hook to wrap it). Self-reported, like everything from the kernel."""

    def __init__(self, shell):
        self.shell, self.records, self.cell = shell, [], None

    @classmethod
    def install(cls, shell):
        figures = cls(shell)
        if shell is not None:
            from IPython.core import pylabtools

            original = pylabtools.print_figure

            def print_figure(fig, *args, **kwargs):
                figures.record(fig)
                return original(fig, *args, **kwargs)

            pylabtools.print_figure = print_figure
            shell.events.register("pre_run_cell", figures.on_cell)
        return figures

    def on_cell(self, info):
        self.cell = self.shell.execution_count

    def record(self, fig):
        if len(self.records) >= MAX_FIGURES:
            return
        try:
            axes = fig.get_axes()
            images = [{"shape": list(image.get_array().shape), "min": float(image.get_array().min()),
                       "max": float(image.get_array().max())}
                      for ax in axes for image in ax.get_images()][:MAX_PER_FIGURE]
            lines = [len(line.get_xydata()) for ax in axes for line in ax.get_lines()][:MAX_PER_FIGURE]
        except Exception:  # noqa: BLE001 - a figure that can't be read is not recorded
            return
        self.records.append({"cell": self.cell, "axes": len(axes), "images": images, "lines": lines})


# ---------------------------------------------------------------------------------------------
# The probe


class _Absent(Exception):
    """The notebook does not define what a section asks for."""


def probe_namespace(payload, guard, figures, user_ns):
    """Probe the names in ``user_ns`` with the plan in ``payload``; the answer goes to ``guard`` (the
    socket in a kernel, or :mod:`grader.selfcheck`'s own guard in the student's kernel)."""
    findings = guard.clean()
    torch, late = guard.torch_module()
    findings += late
    # No collection while the probe runs: the probe's own small allocations set off full collections
    # of the notebook's heap (the probe took 0.55 s instead of 0.1 s); it calls a few functions, and
    # reference counting frees what they leave.
    collecting = gc.isenabled()
    gc.disable()
    try:
        answers = _answers(torch, user_ns, payload)
    finally:
        if collecting:  # a student's interactive kernel (selfcheck) goes on collecting as before
            gc.enable()
    answers["figures"] = {"ok": figures.records}
    findings += guard.clean(" (while the probe ran)")
    answers["integrity"] = findings[:MAX_FINDINGS]
    guard.send(payload["socket"], payload["header"], answers)


def _answers(torch, user_ns, payload):
    torch.set_num_threads(1)  # the grader compares bits with its own single-threaded run
    settings = payload["settings"]
    inputs = _Inputs(payload["inputs"], payload["arrays"], torch, settings["batch_size"])
    factor = settings["loss_factor"]
    answers = {}
    for name, task, arguments in (
            ("data_train", _probe_dataset, ("data_train",)), ("data_test", _probe_dataset, ("data_test",)),
            ("train_loader", _probe_loader, ("train_loader",)), ("test_loader", _probe_loader, ("test_loader",)),
            ("model", _probe_model, ()), ("train_epoch", _probe_train_epoch, (1.0,)),
            ("train_epoch_doubled", _probe_train_epoch, (factor,)), ("validate", _probe_validate, ()),
            ("train", _probe_train, (1.0,)), ("train_doubled", _probe_train, (factor,)),
            ("history", _probe_history, ())):
        try:
            answers[name] = {"ok": task(torch, user_ns, settings, inputs, *arguments)}
        except _Absent as absent:
            answers[name] = {"absent": str(absent)}
        except BaseException as error:  # the student's code may raise anything, even SystemExit
            answers[name] = {"raised": _describe(error)}
    return answers


def _describe(error):
    try:
        message = str(error)
        lines = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    except BaseException:  # noqa: BLE001 - a notebook's exception may fail even at this
        message, lines = "(its message could not be read)", ""
    return {"type": type(error).__name__, "message": message[:500], "traceback": lines[-3000:]}


def _lookup(user_ns, name):
    # As Python resolves a name in a cell: the notebook's namespace, then builtins, where a helper
    # module (the course's pytorchcv) publishes data_train, data_test and the loaders.
    value = dict.get(user_ns, name)
    if value is None:
        value = dict.get(builtins.__dict__, name)
    if value is None:
        raise _Absent(f"{name} is not defined")
    return value


def _function(user_ns, name):
    function = _lookup(user_ns, name)
    if not callable(function):
        raise _Absent(f"{name} is a {type(function).__name__}, not a function")
    return function


def _array(tensor):
    """A tensor as the grader reads it: float64 bytes, base64, with its shape."""
    values = tensor.detach().double().contiguous().numpy()
    return {"dtype": "f8", "shape": list(values.shape),
            "data": binascii.b2a_base64(values.tobytes(), newline=False).decode()}


class _Inputs:
    """The grader's arrays as tensors; every use gets its own copy, so a function that edits its
    inputs in place changes nothing the next one is given."""

    def __init__(self, path, layout, torch, batch_size):
        self.torch, self.batch_size = torch, batch_size
        with _io.FileIO(path, "r") as file:
            data = file.readall()
        self.tensors = {
            name: torch.frombuffer(bytearray(data[offset:offset + size]), dtype=getattr(torch, dtype)).reshape(shape)
            for name, (dtype, shape, offset, size) in layout.items()}

    def get(self, name):
        return self.tensors[name].clone()

    def loader(self, prefix):
        data = self.torch.utils.data
        return data.DataLoader(data.TensorDataset(self.get(prefix + "_x"), self.get(prefix + "_y")),
                               batch_size=self.batch_size)

    def reference_net(self):
        """The lab's architecture with the grader's initial weights, built here so the student's
        functions are measured on a model the grader knows exactly."""
        nn = self.torch.nn
        net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.LogSoftmax(dim=1))
        with self.torch.no_grad():
            net[1].weight.copy_(self.get("init_weight"))
            net[1].bias.copy_(self.get("init_bias"))
        return net


def _probe_dataset(torch, user_ns, settings, inputs, name):
    dataset = _lookup(user_ns, name)
    length = len(dataset)
    items = []
    for index in settings["data_indices"][name]:
        image, label = dataset[index]
        item = {"index": index, "label": _label(label), "kind": type(image).__name__,
                "shape": None, "dtype": None, "min": None, "max": None, "sum": None}
        if isinstance(image, torch.Tensor):
            item.update(shape=list(image.shape), dtype=str(image.dtype), min=float(image.min()),
                        max=float(image.max()), sum=float(image.double().sum()))
        items.append(item)
    return {"type": type(dataset).__name__, "length": int(length), "items": items}


def _probe_loader(torch, user_ns, settings, inputs, name):
    """A loader's dataset, as the notebook built it: its length and its labels at the planned indices
    (read from the dataset, not by iterating the loader: no shuffling, no batches)."""
    loader = _lookup(user_ns, name)
    dataset = loader.dataset  # a loader without one raises: reported as such
    length = len(dataset)
    labels = [_label(dataset[index][1]) if index < length else None for index in settings["data_indices"]["loaders"]]
    return {"type": type(loader).__name__, "dataset_type": type(dataset).__name__, "length": int(length),
            "labels": labels}


def _label(label):
    if isinstance(label, bool):
        return None
    try:
        return int(label)
    except Exception:  # noqa: BLE001 - a label that is no integer is reported as none
        return None


def _probe_model(torch, user_ns, settings, inputs):
    net = _lookup(user_ns, "net")
    is_module = isinstance(net, torch.nn.Module)
    if is_module:
        net.eval()  # a dropout layer must not make its output random
    with torch.no_grad():
        output = net(inputs.get("model_input"))
    state, note = (_state(net, torch, settings["max_state_values"]) if is_module
                   else (None, "net is not a torch.nn.Module"))
    return {"type": type(net).__name__, "is_module": is_module,
            "output": _array(output) if isinstance(output, torch.Tensor) else None,
            "output_type": type(output).__name__, "state": state, "state_note": note}


def _state(net, torch, limit):
    """net's state_dict, for the grader to recompute its output from, when it is small and all floats."""
    entries = list(net.state_dict().items())
    if len(entries) > MAX_STATE_ENTRIES:
        return None, (f"net's state_dict has {len(entries):,} entries, more than the {MAX_STATE_ENTRIES:,} the "
                      "probe sends")
    odd = [key for key, value in entries if not isinstance(value, torch.Tensor) or not value.is_floating_point()]
    if odd:
        return None, f"net's state_dict holds entries that are not float tensors ({', '.join(map(str, odd[:3]))})"
    count = sum(value.numel() for _, value in entries)
    if count > limit:
        return None, f"net has {count:,} values in its state_dict, more than the {limit:,} the probe sends"
    return [[str(key), _array(value)] for key, value in entries], ""


class _Recorder:
    """Watches one call of a student function: modes at each forward, loss and optimizer use."""

    def __init__(self, torch, net, optimizer=None, factor=1.0):
        self.torch = torch
        self.forwards = []
        self.loss_calls = 0
        self.steps = 0
        self.kept_graph = []
        self._loss_nodes = []  # grad_fn of every loss handed out, to find them in a kept graph
        self._handles = [net.register_forward_pre_hook(self._on_forward)]
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(self._on_step))
        self.loss_fn = self._counting_loss(torch.nn.NLLLoss(), factor)

    def _on_forward(self, module, args):
        if len(self.forwards) < MAX_FORWARDS:
            self.forwards.append([module.training, self.torch.is_grad_enabled()])

    def _on_step(self, optimizer, args, kwargs):
        self.steps += 1

    def _counting_loss(self, inner, factor):
        recorder = self

        class CountingNLLLoss(self.torch.nn.Module):
            def forward(self, output, target):
                recorder.loss_calls += 1
                loss = inner(output, target)
                if factor != 1.0:
                    loss = loss * factor
                if loss.grad_fn is not None:
                    recorder._loss_nodes.append(loss.grad_fn)
                return loss

        return CountingNLLLoss()

    def call(self, function, *args, **kwargs):
        """Call ``function``; note which of its locals still hold an autograd graph at return."""
        code = getattr(function, "__code__", None)

        def on_event(frame, event, arg):
            if event == "return" and frame.f_code is code:
                self.kept_graph = sorted(
                    name for name, value in frame.f_locals.items()
                    if isinstance(value, self.torch.Tensor) and self._losses_in_graph(value.grad_fn) > 1)[:MAX_NAMES]

        sys.setprofile(on_event)
        try:
            return function(*args, **kwargs)
        finally:
            sys.setprofile(None)
            for handle in self._handles:
                handle.remove()

    def _losses_in_graph(self, root, limit=100_000):
        """How many of the batches' losses a tensor's autograd graph still holds: more than one
        means the graph outlived its batch (``total_loss += loss``)."""
        losses = set(map(id, self._loss_nodes))
        seen, stack, found = set(), [root], 0
        while stack and len(seen) < limit:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            found += id(node) in losses
            stack.extend(child for child, _ in node.next_functions)
        return found

    def answer(self, function, passed, returned, net):
        return {"signature": _signature(function), "passed": passed, "returned": _value(returned),
                "params": {"weight": _array(net[1].weight), "bias": _array(net[1].bias)},
                "forwards": self.forwards, "loss_calls": self.loss_calls, "steps": self.steps,
                "kept_graph": self.kept_graph}


def _signature(function):
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return None
    return [{"name": p.name, "kind": p.kind.name, "has_default": p.default is not p.empty}
            for p in list(parameters.values())[:MAX_NAMES]]


def _call_with(recorder, function, positional, keywords):
    """Pass the grader's optimizer and loss by name when the function takes those names."""
    parameters = _signature(function) or []
    names = {p["name"] for p in parameters}
    accepts_any = any(p["kind"] == "VAR_KEYWORD" for p in parameters)
    given = {k: v for k, v in keywords.items() if k in names or accepts_any}
    return recorder.call(function, *positional, **given), sorted(given)


def _probe_train_epoch(torch, user_ns, settings, inputs, factor):
    function = _function(user_ns, "train_epoch")
    net = inputs.reference_net()
    net.eval()  # train_epoch must switch to train mode itself
    optimizer = torch.optim.SGD(net.parameters(), lr=settings["lr"])
    recorder = _Recorder(torch, net, optimizer, factor)
    returned, passed = _call_with(recorder, function, (net, inputs.loader("train")),
                                  {"optimizer": optimizer, "loss_fn": recorder.loss_fn, "lr": settings["lr"]})
    return recorder.answer(function, passed, returned, net)


def _probe_validate(torch, user_ns, settings, inputs):
    function = _function(user_ns, "validate")
    net = inputs.reference_net()
    net.train()  # validate must switch to eval mode itself
    recorder = _Recorder(torch, net)
    returned, passed = _call_with(recorder, function, (net, inputs.loader("test")), {"loss_fn": recorder.loss_fn})
    return recorder.answer(function, passed, returned, net)


def _probe_train(torch, user_ns, settings, inputs, factor):
    function = _function(user_ns, "train")
    net = inputs.reference_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=settings["lr"])
    recorder = _Recorder(torch, net, optimizer, factor)
    returned, passed = _call_with(
        recorder, function, (net, inputs.loader("train"), inputs.loader("test")),
        {"optimizer": optimizer, "loss_fn": recorder.loss_fn, "epochs": settings["epochs"], "lr": settings["lr"]})
    return recorder.answer(function, passed, returned, net)


def _value(value, depth=0):
    """What a function returned, structure kept (bounded), leaves made plain: a number only for a
    Python or numpy number, never for a tensor (the lab asks for ``.item()``)."""
    answer = {"kind": type(value).__name__, "number": None, "items": None, "keys": None}
    if isinstance(value, (list, tuple)) and depth < MAX_VALUE_DEPTH:
        answer["items"] = [_value(item, depth + 1) for item in list(value)[:MAX_VALUE_ITEMS]]
    elif isinstance(value, dict) and depth < MAX_VALUE_DEPTH:
        keys = list(value)[:MAX_VALUE_ITEMS]
        answer["keys"] = [str(key) for key in keys]
        answer["items"] = [_value(value[key], depth + 1) for key in keys]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        answer["number"] = float(value)
    elif type(value).__module__ == "numpy" and hasattr(value, "item"):
        try:
            number = value.item()  # a numpy scalar; an array of more than one value raises
        except Exception:  # noqa: BLE001
            number = None
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            answer["number"] = float(number)
    return answer


def _probe_history(torch, user_ns, settings, inputs):
    """The notebook's own training history (``hist``), for its learning curves: lists of numbers only."""
    hist = _lookup(user_ns, "hist")
    if not isinstance(hist, dict):
        raise _Absent(f"hist is a {type(hist).__name__}, not a dict")
    return {str(key): [float(v) for v in values] for key, values in list(hist.items())[:MAX_NAMES]
            if isinstance(values, (list, tuple)) and len(values) <= 1000
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)}
