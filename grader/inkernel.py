"""The only labgrader code that runs inside the student's kernel.

It is sent as source text (the grader's packages are not visible inside the sandbox) and does two
small things: :func:`prelude` before the notebook (seeds, threads, the fast data path) and
:func:`probe` after it (call the student's functions on inputs the grader chose at grading time and
write what came back as plain JSON). It decides nothing: every value it writes is a claim that the
grader checks against the reference in its own process. Keep it standard-library + torch only.
"""
import inspect
import json
import sys
import traceback


def prelude(seed, threads, fast_data):
    """Seed every RNG and set torch's threads before the notebook can use them, and install the
    fast data path. Each happens when its module is first imported rather than here: the notebook
    imports torch and torchvision anyway, so the kernel spends no time on them before cell 1."""
    import random

    random.seed(seed)

    def seed_numpy(numpy):
        numpy.random.seed(seed)

    def seed_torch(torch):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)

    actions = {"numpy": seed_numpy, "torch": seed_torch}
    if fast_data:
        actions["torchvision.datasets.mnist"] = _install_fast_data
    _AfterImport.install(actions)


class _AfterImport:
    """A meta-path finder that runs an action on a module right after its first import.

    Python has no post-import hook of its own; this wraps the real loader's ``exec_module``.
    """

    def __init__(self, actions):
        self.actions = actions

    @classmethod
    def install(cls, actions):
        pending = {}
        for name, action in actions.items():
            if name in sys.modules:
                action(sys.modules[name])
            else:
                pending[name] = action
        if pending:
            sys.meta_path.insert(0, cls(pending))

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

        def exec_then_act(module):
            exec_module(module)
            action(module)

        spec.loader.exec_module = exec_then_act
        return spec


def _install_fast_data(mnist=None):
    """Serve ``MNIST[i]`` under a plain ``ToTensor`` from a tensor converted once.

    torchvision builds a PIL image per item and converts it back (about 9 s per epoch of 60000 on
    two cores, against 1 s here);
    ``data.to(default dtype).div(255)`` gives bitwise the same tensor (ToTensor converts uint8 to the
    default float dtype and divides by 255), with the same shape and strides. Any other transform, a
    target transform, a subclass, data that is not a 3-d uint8 tensor or an index that is not an
    integer takes the stock path. The converted copy is rebuilt when ``data`` is replaced, edited in
    place (its version counter moves), ``targets`` likewise, or the default dtype changes.
    """
    import operator

    import torch

    if mnist is None:
        from torchvision.datasets import mnist
    MNIST, FashionMNIST = mnist.MNIST, mnist.FashionMNIST
    stock_getitem = MNIST.__getitem__
    to_tensor = []  # looked up at the first item: torchvision may still be importing when this runs

    def getitem(self, index):
        if not to_tensor:
            from torchvision.transforms import ToTensor
            to_tensor.append(ToTensor)
        data = self.data
        if (type(self) not in (MNIST, FashionMNIST) or type(self.transform) is not to_tensor[0]
                or self.target_transform is not None or type(data) is not torch.Tensor
                or data.dtype != torch.uint8 or data.dim() != 3 or isinstance(index, bool)):
            return stock_getitem(self, index)
        try:
            operator.index(index)  # ints, numpy ints, 0-d integer tensors
        except TypeError:
            return stock_getitem(self, index)
        if isinstance(index, torch.Tensor) and index.dim() != 0:
            return stock_getitem(self, index)
        dtype = torch.get_default_dtype()
        targets = self.targets
        cached = self.__dict__.get("_labgrader_tensor")
        if (cached is None or cached[0] is not data or cached[1] != data._version or cached[2] is not dtype
                or cached[3] is not targets or cached[4] != getattr(targets, "_version", None)):
            # (N, 1, H, W) with strides (H*W, 1, W, 1): an item is then shaped and strided exactly
            # like ToTensor's output, (H, W, 1) permuted to (1, H, W).
            images = data.unsqueeze(3).permute(0, 3, 1, 2).to(dtype).div(255)
            labels = targets.tolist() if type(targets) is torch.Tensor and targets.dim() == 1 else None
            cached = (data, data._version, dtype, targets, getattr(targets, "_version", None), images, labels)
            self.__dict__["_labgrader_tensor"] = cached
        labels = cached[6]
        # A copy, as the stock path returns a new tensor: in-place edits must not reach the cache.
        return cached[5][index].clone(), (labels[index] if labels is not None else int(targets[index]))

    MNIST.__getitem__ = getitem
    mnist._labgrader_fast_data = True


# ---------------------------------------------------------------------------------------------
# The probe


def probe(user_ns, plan_path, out_path):
    import numpy
    import torch

    torch.set_num_threads(1)  # the grader compares bits with its own single-threaded run
    plan = json.loads(open(plan_path).read())
    arrays = numpy.load(plan["arrays"], allow_pickle=False)
    tensors = {name: torch.from_numpy(arrays[name].copy()) for name in arrays.files}
    report = {"nonce": plan["nonce"]}
    for name, task in (("data", _probe_data), ("model", _probe_model),
                       ("train_epoch", _probe_train_epoch), ("validate", _probe_validate),
                       ("train", _probe_train), ("history", _probe_history)):
        try:
            report[name] = task(user_ns, plan, tensors)
        except BaseException as error:  # the student's code may raise anything, even SystemExit
            report[name] = {"error": _describe(error)}
    with open(out_path, "w") as out:
        json.dump(report, out, default=_plain)


def _describe(error):
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    return {"type": type(error).__name__, "message": str(error)[:500], "traceback": "".join(lines)[-3000:]}


def _plain(value):
    """JSON for what student code returns: numbers stay numbers, anything else is named."""
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": value.detach().tolist() if value.numel() <= 16 else None,
                "shape": list(value.shape), "requires_grad": value.requires_grad}
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except Exception:
            pass
    return {"unserialisable": type(value).__name__, "repr": repr(value)[:200]}


def _probe_data(user_ns, plan, tensors):
    result = {}
    for name in ("data_train", "data_test"):
        dataset = user_ns.get(name)
        if dataset is None:
            result[name] = None
            continue
        entry = {"type": type(dataset).__name__, "len": len(dataset), "items": []}
        for index in plan["data_indices"][name]:
            image, label = dataset[index]
            entry["items"].append({
                "index": index, "label": _plain(label) if not isinstance(label, int) else label,
                "shape": list(getattr(image, "shape", [])), "dtype": str(getattr(image, "dtype", type(image).__name__)),
                "min": float(image.min()), "max": float(image.max()), "sum": float(image.double().sum()),
            })
        result[name] = entry
    return result


def _probe_model(user_ns, plan, tensors):
    import torch

    net = user_ns.get("net")
    if net is None:
        return {"exists": False}
    result = {"exists": True, "type": type(net).__name__, "is_module": isinstance(net, torch.nn.Module)}
    with torch.no_grad():
        out = net(tensors["model_input"])
    result["output"] = out.detach().double().tolist() if isinstance(out, torch.Tensor) else _plain(out)
    return result


class _Recorder:
    """Watches one call of a student function: modes at each forward, loss and optimizer use."""

    def __init__(self, net, optimizer=None):
        import torch

        self.forwards = []
        self.loss_calls = 0
        self.steps = 0
        self.kept_graph = []
        self._loss_nodes = []  # grad_fn of every loss handed out, to find them in a kept graph
        self._handles = [net.register_forward_pre_hook(self._on_forward)]
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(self._on_step))
        self.loss_fn = self._counting_loss(torch.nn.NLLLoss())

    def _on_forward(self, module, args):
        import torch

        self.forwards.append({"training": module.training, "grad_enabled": torch.is_grad_enabled()})

    def _on_step(self, optimizer, args, kwargs):
        self.steps += 1

    def _counting_loss(self, inner):
        import torch

        recorder = self

        class CountingNLLLoss(torch.nn.Module):
            def forward(self, output, target):
                recorder.loss_calls += 1
                loss = inner(output, target)
                if loss.grad_fn is not None:
                    recorder._loss_nodes.append(loss.grad_fn)
                return loss

        return CountingNLLLoss()

    def call(self, function, *args, **kwargs):
        """Call ``function``; note which of its locals still hold an autograd graph at return."""
        import torch

        code = getattr(function, "__code__", None)

        def on_event(frame, event, arg):
            if event == "return" and frame.f_code is code:
                self.kept_graph = sorted(
                    name for name, value in frame.f_locals.items()
                    if isinstance(value, torch.Tensor) and self._losses_in_graph(value.grad_fn) > 1)

        previous = sys.getprofile()
        sys.setprofile(on_event)
        try:
            return function(*args, **kwargs)
        finally:
            sys.setprofile(previous)
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

    def summary(self):
        return {"forwards": self.forwards, "loss_calls": self.loss_calls, "steps": self.steps,
                "kept_graph": self.kept_graph}


def _reference_net(tensors, prefix):
    """The lab's architecture with the grader's initial weights, built here so the student's
    functions are measured on a model the grader knows exactly."""
    import torch

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10), torch.nn.LogSoftmax(dim=1))
    with torch.no_grad():
        net[1].weight.copy_(tensors[prefix + "_weight"])
        net[1].bias.copy_(tensors[prefix + "_bias"])
    return net


def _loader(tensors, prefix, batch_size):
    import torch

    dataset = torch.utils.data.TensorDataset(tensors[prefix + "_x"], tensors[prefix + "_y"])
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size)


def _signature(function):
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return None
    return [{"name": p.name, "kind": p.kind.name, "has_default": p.default is not p.empty}
            for p in parameters.values()]


def _call_with(recorder, function, positional, keywords):
    """Pass the grader's optimizer and loss by name when the function takes those names."""
    parameters = _signature(function) or []
    names = {p["name"] for p in parameters}
    accepts_any = any(p["kind"] == "VAR_KEYWORD" for p in parameters)
    given = {k: v for k, v in keywords.items() if k in names or accepts_any}
    return recorder.call(function, *positional, **given), sorted(given)


def _params(net):
    return {"weight": net[1].weight.detach().double().tolist(), "bias": net[1].bias.detach().double().tolist()}


def _probe_train_epoch(user_ns, plan, tensors):
    import torch

    function = user_ns.get("train_epoch")
    if not callable(function):
        return {"exists": False}
    net = _reference_net(tensors, "init")
    net.eval()  # train_epoch must switch to train mode itself
    optimizer = torch.optim.SGD(net.parameters(), lr=plan["lr"])
    recorder = _Recorder(net, optimizer)
    returned, passed = _call_with(recorder, function, (net, _loader(tensors, "train", plan["batch_size"])),
                                  {"optimizer": optimizer, "loss_fn": recorder.loss_fn, "lr": plan["lr"]})
    return {"exists": True, "signature": _signature(function), "passed": passed,
            "returned": _returned(returned), "params": _params(net), **recorder.summary()}


def _probe_validate(user_ns, plan, tensors):
    function = user_ns.get("validate")
    if not callable(function):
        return {"exists": False}
    net = _reference_net(tensors, "init")
    net.train()  # validate must switch to eval mode itself
    recorder = _Recorder(net)
    returned, passed = _call_with(recorder, function, (net, _loader(tensors, "test", plan["batch_size"])),
                                  {"loss_fn": recorder.loss_fn})
    return {"exists": True, "signature": _signature(function), "passed": passed,
            "returned": _returned(returned), "params": _params(net), **recorder.summary()}


def _probe_train(user_ns, plan, tensors):
    import torch

    function = user_ns.get("train")
    if not callable(function):
        return {"exists": False}
    net = _reference_net(tensors, "init")
    optimizer = torch.optim.SGD(net.parameters(), lr=plan["lr"])
    recorder = _Recorder(net, optimizer)
    returned, passed = _call_with(
        recorder, function,
        (net, _loader(tensors, "train", plan["batch_size"]), _loader(tensors, "test", plan["batch_size"])),
        {"optimizer": optimizer, "loss_fn": recorder.loss_fn, "epochs": plan["epochs"], "lr": plan["lr"]})
    return {"exists": True, "signature": _signature(function), "passed": passed,
            "returned": _returned(returned), "params": _params(net), **recorder.summary()}


def _returned(value):
    """What a function returned, structure kept, leaves made plain."""
    if isinstance(value, (list, tuple)):
        return {"kind": type(value).__name__, "items": [_returned(v) for v in value]}
    if isinstance(value, dict):
        return {"kind": "dict", "items": {str(k): _returned(v) for k, v in value.items()}}
    if isinstance(value, bool) or value is None:
        return {"kind": type(value).__name__, "value": value}
    if isinstance(value, (int, float)):
        return {"kind": type(value).__name__, "value": float(value)}
    return {"kind": type(value).__name__, "value": _plain(value)}


def _probe_history(user_ns, plan, tensors):
    hist = user_ns.get("hist")
    if not isinstance(hist, dict):
        return None
    return {str(k): [float(v) for v in values] for k, values in hist.items()
            if isinstance(values, (list, tuple)) and all(isinstance(v, (int, float)) for v in values)}
