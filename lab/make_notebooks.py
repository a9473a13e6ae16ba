"""Writes lab/instructor.ipynb and the example submissions in lab/examples/ from the cells below.

The notebooks are committed; this script is how they were made, so a change to the lab's solution
can be carried into every example in one step:

    .venv/bin/python lab/make_notebooks.py          # rewrites the notebooks
    .venv/bin/labgrader assign ...                   # then regenerate lab/student.ipynb

Each example is the correct solution with one deliberate change (see lab/examples/README.md).
Cell ids are derived from the notebook's name and the cell's position, so rerunning the script
gives byte-identical files.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

LAB = Path(__file__).resolve().parent
EXAMPLES = LAB / "examples"
SOLUTION = re.compile(r"^[ \t]*### (BEGIN|END) SOLUTION[ \t]*\n", re.M)

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"name": "python"}

# --------------------------------------------------------------------------------------------
# The instructor notebook, as (key, kind, source). Keys let the examples swap single cells.
# --------------------------------------------------------------------------------------------
CELLS: list[tuple[str, str, str]] = [
    ("title", "md", """\
# Your first PyTorch model: telling handwritten digits apart

This lab walks through the smallest useful image classifier: one fully connected layer that turns
the 784 pixels of a 28×28 picture of a digit into ten numbers, one per digit 0–9. You will load a
dataset, write the training loop and the evaluation loop yourself, follow the learning curves, and
finally look inside the trained layer to see what it learned.

**How to work on it.** Wherever a code cell says `raise NotImplementedError(...)`, delete that line
and write your code in its place. Keep the names used here (`data_train`, `data_test`, `net`,
`train_epoch`, `validate`, `train`, `hist`) and the function signatures as they are: the grader
runs your notebook from the first cell to the last and then looks these names up. Before you hand
it in, use *Restart kernel and run all cells* and check that every cell finishes."""),

    ("imports_md", "md", """\
## 1. Packages

PyTorch (`torch`) supplies tensors, automatic differentiation and the building blocks of networks
(`torch.nn`); `torchvision` adds ready-made image datasets; matplotlib draws the pictures."""),

    ("imports", "code", """\
import os

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torchvision
from torchvision.transforms import ToTensor

torch.manual_seed(0)  # the same random start every run, so results are repeatable"""),

    ("data_md", "md", """\
## 2. The MNIST digits

MNIST is a classic collection of small grey-scale photos of handwritten digits, each labelled with
the digit it shows. The full dataset has 60,000 training images and 10,000 test images; the copy
you are graded with may be smaller, so always print the sizes instead of assuming them.

`torchvision.datasets.MNIST(folder, train=..., download=True, transform=...)` finds the files in
`folder` (downloading them only if they are missing). Without a transform every image comes back as
a PIL picture; `transform=ToTensor()` converts it into a float tensor instead.

**Your task:** create `data_train` (the training part, `train=True`) and `data_test` (`train=False`)
from the folder `./data`, both with `transform=ToTensor()`."""),

    ("data", "code", """\
### BEGIN SOLUTION
data_train = torchvision.datasets.MNIST("./data", download=True, train=True, transform=ToTensor())
data_test = torchvision.datasets.MNIST("./data", download=True, train=False, transform=ToTensor())
### END SOLUTION"""),

    ("samples_md", "md", """\
Indexing a dataset gives one example as a pair `(image, label)`. **Your task:** draw the first
seven training images side by side, each titled with its label. `plt.subplots(1, 7)` gives you a
row of seven axes; `imshow` needs a 28×28 array, so reshape the 1×28×28 tensor with `.view(28, 28)`."""),

    ("samples", "code", """\
### BEGIN SOLUTION
fig, ax = plt.subplots(1, 7, figsize=(10, 2))
for i in range(7):
    image, label = data_train[i]
    ax[i].imshow(image.view(28, 28), cmap="gray")
    ax[i].set_title(label)
    ax[i].axis("off")
### END SOLUTION
plt.show()"""),

    ("facts_md", "md", """\
### What one example looks like

Run the next cell and compare with what you expect:

* the image is a tensor of shape `1×28×28`: one colour channel (grey), 28 rows, 28 columns;
* the label is a plain Python `int` between 0 and 9 (not a tensor);
* `ToTensor()` scales the pixel values from 0…255 down to floats between 0 and 1.

The training set is what the network learns from. The test set is kept apart and used only to
measure how well the network does on digits it has never seen."""),

    ("facts", "code", """\
print("Training samples:", len(data_train))
print("Test samples:", len(data_test))
print("Image tensor shape:", data_train[0][0].size())
print("First ten labels:", [data_train[i][1] for i in range(10)])
print("Smallest pixel value:", data_train[0][0].min().item())
print("Largest pixel value:", data_train[0][0].max().item())"""),

    ("model_md", "md", """\
## 3. The network

The model is a chain of three steps, built with `nn.Sequential`:

1. `nn.Flatten()` turns each 1×28×28 image into a row of 784 numbers;
2. `nn.Linear(784, 10)` computes ten weighted sums of those pixels plus a bias each — one score per
   digit;
3. `nn.LogSoftmax(dim=1)` turns the ten scores into log-probabilities (taking `exp` of them gives
   ten positive numbers that add up to 1).

About `dim=1`: the network always works on a *batch*, a tensor of shape `(batch size, 10)`. The
probabilities have to be normalised over the ten digits of each image, which is dimension 1.
If you leave `dim` out, PyTorch guesses and prints a deprecation warning; `dim=0` would normalise
over the images of the batch instead, which trains something, but not a classifier.

**Your task:** build this network and call it `net`."""),

    ("model", "code", """\
### BEGIN SOLUTION
net = nn.Sequential(
    nn.Flatten(),
    nn.Linear(784, 10),
    nn.LogSoftmax(dim=1),
)
### END SOLUTION"""),

    ("untrained_md", "md", """\
Before any training the weights are random, so the ten probabilities for the first training image
should be roughly equal — the network has no idea yet. (A single image of shape 1×28×28 is treated
as a batch of one.)"""),

    ("untrained", "code", """\
image, label = data_train[0]
print("The digit is:", label)
print("Probabilities from the untrained network:")
print(torch.exp(net(image)).detach().numpy().round(3))"""),

    ("loaders_md", "md", """\
## 4. Mini-batches

Training looks at a few examples at a time. A `DataLoader` cuts a dataset into batches of 64 images
(stacked into one tensor of shape 64×1×28×28) with their 64 labels. Shuffling the training data
each epoch keeps the batches from always arriving in the same order. The test loader uses the same
batch size, so the losses of the two are on the same scale (see section 5)."""),

    ("loaders", "code", """\
train_loader = torch.utils.data.DataLoader(data_train, batch_size=64, shuffle=True)
test_loader = torch.utils.data.DataLoader(data_test, batch_size=64)"""),

    ("train_epoch_md", "md", """\
## 5. One epoch of training

One *epoch* is one pass over all the training batches. For every batch:

1. clear the gradients left over from the previous batch (`optimizer.zero_grad()`) — PyTorch adds
   new gradients to the old ones unless told otherwise;
2. run the batch through the network to get its output;
3. measure with the **loss function** how far the output is from the true labels. For
   log-probabilities the right loss is the negative log-likelihood, `nn.NLLLoss()`, which returns
   the mean over the batch;
4. `loss.backward()` works out, for every weight, which way it should move to make the loss
   smaller;
5. `optimizer.step()` moves the weights. How far is set by the **learning rate** `lr`: too large and
   each step undoes what was learned before, too small and learning crawls. The optimizer here is
   Adam, a refinement of plain stochastic gradient descent;
6. count how many images of the batch the network got right: the predicted digit is the position of
   the largest of the ten outputs.

Call `net.train()` first so layers that behave differently during training (dropout, batch
normalisation) are in the right mode — our network has none, but the habit matters.

**What to return**, as two plain Python floats: the loss, defined as *the sum of the batch losses
divided by the number of images*, and the accuracy, the fraction of images classified correctly.
(Because each batch loss is already a mean, this loss is about the average loss divided by the
batch size. It is the lab's convention; only compare losses measured with the same batch size.)

Add up `loss.item()`, not `loss`: the tensor `loss` carries the whole computation graph of its
batch, and summing tensors would keep every batch's graph in memory until the end of the epoch.

If no optimizer is passed in, create an Adam optimizer for `net.parameters()` with learning rate
`lr`."""),

    ("train_epoch", "code", """\
def train_epoch(net, dataloader, lr=0.01, optimizer=None, loss_fn=nn.NLLLoss()):
    \"\"\"Train net for one pass over dataloader; return (loss, accuracy) as floats.\"\"\"
    ### BEGIN SOLUTION
    optimizer = optimizer or torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    total_loss, correct, count = 0.0, 0, 0
    for features, labels in dataloader:
        optimizer.zero_grad()
        out = net(features)
        loss = loss_fn(out, labels)
        loss.backward()
        optimizer.step()
        total_loss += loss.item()  # a plain float: no autograd graph is kept alive
        _, predicted = torch.max(out, 1)
        correct += (predicted == labels).sum().item()
        count += len(labels)
    return total_loss / count, correct / count
    ### END SOLUTION"""),

    ("train_epoch_try", "code", """\
epoch_loss, epoch_acc = train_epoch(net, train_loader)
print(f"After one epoch: loss {epoch_loss:.4f}, training accuracy {epoch_acc:.3f}")"""),

    ("validate_md", "md", """\
## 6. Measuring on unseen digits

A network with enough weights can get very good at the images it trains on and still do badly on
new ones. So after training we also measure it on the test set, which it never learns from — the
*validation* loss and accuracy.

**Your task:** write `validate`. It computes the same two numbers as `train_epoch`, but must not
change the network: switch it to evaluation mode with `net.eval()`, run the batches inside
`with torch.no_grad():` (no gradients are needed, which also saves memory and time), and never call
`backward` or an optimizer."""),

    ("validate", "code", """\
def validate(net, dataloader, loss_fn=nn.NLLLoss()):
    \"\"\"Evaluate net on dataloader without changing it; return (loss, accuracy) as floats.\"\"\"
    ### BEGIN SOLUTION
    net.eval()
    total_loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for features, labels in dataloader:
            out = net(features)
            total_loss += loss_fn(out, labels).item()
            predicted = torch.max(out, 1)[1]
            correct += (predicted == labels).sum().item()
            count += len(labels)
    return total_loss / count, correct / count
    ### END SOLUTION"""),

    ("validate_try", "code", """\
val_loss, val_acc = validate(net, test_loader)
print(f"On the test set: loss {val_loss:.4f}, accuracy {val_acc:.3f}")"""),

    ("train_md", "md", """\
## 7. Training for several epochs

Now put the two together: for each epoch, train once and validate once, print the four numbers,
and record them. Create the optimizer **once**, before the loop, and pass it to every
`train_epoch` call — Adam keeps running statistics about each weight, and a new optimizer every
epoch would throw them away.

**Your task:** write `train`. It returns the *history*: a dictionary with the keys `"train_loss"`,
`"train_acc"`, `"val_loss"` and `"val_acc"`, each holding a list with one number per epoch. Use the
`loss_fn` and `lr` you are given."""),

    ("train", "code", """\
def train(net, train_loader, test_loader, optimizer=None, lr=0.01, epochs=10, loss_fn=nn.NLLLoss()):
    \"\"\"Train for `epochs` epochs, validating after each; return the history dict.\"\"\"
    ### BEGIN SOLUTION
    optimizer = optimizer or torch.optim.Adam(net.parameters(), lr=lr)
    res = {"train_loss": [], "train_acc": [], "val_loss": [], "val_acc": []}
    for ep in range(epochs):
        tl, ta = train_epoch(net, train_loader, optimizer=optimizer, lr=lr, loss_fn=loss_fn)
        vl, va = validate(net, test_loader, loss_fn=loss_fn)
        print(f"Epoch {ep:2}, Train acc={ta:.3f}, Val acc={va:.3f}, "
              f"Train loss={tl:.4f}, Val loss={vl:.4f}")
        res["train_loss"].append(tl)
        res["train_acc"].append(ta)
        res["val_loss"].append(vl)
        res["val_acc"].append(va)
    return res
    ### END SOLUTION"""),

    ("fresh_md", "md", """\
The network in `net` has already had one epoch of training above. **Your task:** build a new,
untrained network of the same shape in `net`, so the history below starts from scratch. Then run
five epochs."""),

    ("fresh", "code", """\
### BEGIN SOLUTION
net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.LogSoftmax(dim=1))
### END SOLUTION
hist = train(net, train_loader, test_loader, epochs=5)"""),

    ("history_md", "md", """\
### Learning curves

**Your task:** plot the history as two panels side by side: the training and validation accuracy on
the left, the two losses on the right, one point per epoch, with a legend."""),

    ("history", "code", """\
### BEGIN SOLUTION
plt.figure(figsize=(12, 4))
plt.subplot(121)
plt.plot(hist["train_acc"], label="Training accuracy")
plt.plot(hist["val_acc"], label="Validation accuracy")
plt.xlabel("epoch")
plt.legend()
plt.subplot(122)
plt.plot(hist["train_loss"], label="Training loss")
plt.plot(hist["val_loss"], label="Validation loss")
plt.xlabel("epoch")
plt.legend()
### END SOLUTION
plt.show()"""),

    ("overfit_md", "md", """\
**Reading the curves.** At first both accuracies should rise together: the network is picking up
patterns that hold for digits in general. If, later on, the training accuracy keeps improving while
the validation accuracy stalls or drops (and the validation loss starts to climb), the network is
memorising its training images rather than learning about digits — it is **overfitting**. Whether
and when that happens depends on the model, the amount of data and the number of epochs; with one
layer and five epochs you may see only the first signs of it, or none. Describe what your own
curves show."""),

    ("weights_md", "md", """\
## 8. What the layer learned

`nn.Linear(784, 10)` computes $y = Wx + b$: $x$ holds the 784 pixels, $b$ the ten biases, and the
weight matrix $W$ has one row of 784 weights for each digit (PyTorch stores it as a 10×784 tensor).
The score for digit *k* is the pixels weighted by row *k*, so each row, reshaped to 28×28, shows
which pixels speak for that digit (bright) and which against it (dark). For a one-layer network
these pictures often look like blurry templates of the digits; in deeper networks the weights are
much harder to interpret this way.

**Your task:** take the weight matrix — `next(net.parameters())` gives the first parameter, which
is $W$ — and show its ten rows as ten 28×28 images in one row. Call `.detach()` before plotting, as
the weights take part in gradient computations."""),

    ("weights", "code", """\
### BEGIN SOLUTION
weight_tensor = next(net.parameters())
fig, ax = plt.subplots(1, 10, figsize=(15, 2))
for i, row in enumerate(weight_tensor):
    ax[i].imshow(row.view(28, 28).detach(), cmap="gray")
    ax[i].set_title(i)
    ax[i].axis("off")
### END SOLUTION
plt.show()"""),

    ("save_md", "md", """\
## 9. Saving the trained model

Save only the learned numbers, the model's `state_dict()`, to the file `mnist_cnn.pt` with
`torch.save`. (Saving the whole `net` object would store it as pickled Python code, which can only
be loaded by running that code — something nobody should do with a file they did not write.)"""),

    ("save", "code", """\
### BEGIN SOLUTION
torch.save(net.state_dict(), "mnist_cnn.pt")
### END SOLUTION"""),

    ("reload_md", "md", """\
The next cell checks your file the way the grader reads it: it loads the weights with
`weights_only=True` (plain tensors, no code) into a copy of your network and measures that copy on
the test set."""),

    ("reload", "code", """\
import copy

reloaded = copy.deepcopy(net)
reloaded.load_state_dict(torch.load("mnist_cnn.pt", weights_only=True))
print("Test accuracy of the reloaded model:", validate(reloaded, test_loader)[1])"""),

    ("further_md", "md", """\
## Going further

* Swap MNIST for `torchvision.datasets.FashionMNIST` (photos of clothes, same size): how much worse
  does the same network do?
* Put a hidden layer in the middle (`Linear(784, 128)`, `ReLU`, `Linear(128, 10)`) and compare the
  curves.
* Try plain SGD (`torch.optim.SGD`) and a few learning rates."""),
]


def strip_markers(source: str) -> str:
    return SOLUTION.sub("", source + "\n").rstrip("\n")


def _cells(spec: list[tuple[str, str, str]], name: str) -> list:
    cells = []
    for i, (key, kind, source) in enumerate(spec):
        make = new_markdown_cell if kind == "md" else new_code_cell
        cell = make(source)
        cell.id = re.sub(r"[^A-Za-z0-9-]", "-", f"{name[:20]}-{i:02d}-{key}")[:64]
        cells.append(cell)
    return cells


def notebook(spec: list[tuple[str, str, str]], name: str):
    nb = new_notebook(cells=_cells(spec, name),
                      metadata={"kernelspec": KERNELSPEC, "language_info": LANGUAGE_INFO})
    nbformat.validate(nb)
    return nb


def write(nb, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


# --------------------------------------------------------------------------------------------
# Examples: the correct solution with one change each.
# --------------------------------------------------------------------------------------------
def solved() -> list[tuple[str, str, str]]:
    return [(k, kind, strip_markers(src) if kind == "code" else src) for k, kind, src in CELLS]


def variant(about: str, replace: dict[str, str | None] | None = None,
            after: dict[str, list[tuple[str, str, str]]] | None = None,
            base: list[tuple[str, str, str]] | None = None) -> list[tuple[str, str, str]]:
    """The solved lab with its title cell replaced by ``about``; ``replace`` maps a cell key to
    new source (None drops the cell); ``after`` inserts cells after a key."""
    replace, after = replace or {}, after or {}
    out = [("about", "md", about)]
    for key, kind, source in (base or solved())[1:]:
        if key in replace:
            if replace[key] is None:
                continue
            source = replace[key]
        out.append((key, kind, source))
        out.extend(after.get(key, []))
    return out


def code_of(key: str) -> str:
    return dict((k, s) for k, _, s in solved())[key]


EXAMPLES_SPEC: dict[str, list[tuple[str, str, str]]] = {}

EXAMPLES_SPEC["correct.ipynb"] = variant("""\
# Example: a complete, correct submission

The instructor's solution with the solution markers removed. It should get full marks and no
warnings.""")

# ---------- correct but different ----------
EXAMPLES_SPEC["correct_argmax.ipynb"] = variant("""\
# Example: correct, written differently

Same results as the reference, different code: predictions with `torch.argmax`/`.argmax(dim=1)`,
counts accumulated as Python numbers from the start, `torch.inference_mode()` instead of
`torch.no_grad()` in `validate`, and the history filled through a loop over its keys. It should get
full marks.""", replace={
    "train_epoch": """\
def train_epoch(net, dataloader, lr=0.01, optimizer=None, loss_fn=nn.NLLLoss()):
    if optimizer is None:
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    batch_losses = []
    n_right = n_seen = 0
    for x, y in dataloader:
        optimizer.zero_grad()
        log_probs = net(x)
        batch_loss = loss_fn(log_probs, y)
        batch_loss.backward()
        optimizer.step()
        batch_losses.append(batch_loss.item())
        n_right += int(torch.argmax(log_probs, dim=1).eq(y).sum())
        n_seen += y.shape[0]
    return float(sum(batch_losses) / n_seen), float(n_right / n_seen)""",
    "validate": """\
def validate(net, dataloader, loss_fn=nn.NLLLoss()):
    net.eval()
    summed, n_right, n_seen = 0.0, 0, 0
    with torch.inference_mode():
        for x, y in dataloader:
            log_probs = net(x)
            summed += float(loss_fn(log_probs, y))
            n_right += int((log_probs.argmax(dim=1) == y).sum())
            n_seen += y.numel()
    return summed / n_seen, n_right / n_seen""",
    "train": """\
def train(net, train_loader, test_loader, optimizer=None, lr=0.01, epochs=10, loss_fn=nn.NLLLoss()):
    optimizer = optimizer if optimizer is not None else torch.optim.Adam(net.parameters(), lr=lr)
    keys = ("train_loss", "train_acc", "val_loss", "val_acc")
    history = {key: [] for key in keys}
    for epoch in range(1, epochs + 1):
        numbers = (*train_epoch(net, train_loader, lr=lr, optimizer=optimizer, loss_fn=loss_fn),
                   *validate(net, test_loader, loss_fn=loss_fn))
        for key, value in zip(keys, numbers):
            history[key].append(value)
        print(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in zip(keys, numbers)))
    return history""",
})

FUNCTIONAL_MODEL = """\
import torch.nn.functional as F


class DigitClassifier(nn.Module):
    \"\"\"Flatten -> Linear(784, 10) -> log_softmax over the ten digits.\"\"\"

    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(28 * 28, 10)

    def forward(self, x):
        return F.log_softmax(self.fc(self.flatten(x)), dim=1)


net = DigitClassifier()"""

EXAMPLES_SPEC["correct_functional.ipynb"] = variant("""\
# Example: correct, with a custom `nn.Module`

The network is a subclass of `nn.Module` (`Flatten` and `Linear` as attributes, `F.log_softmax(x,
dim=1)` in `forward`), and the default loss is the function `F.nll_loss` rather than the module
`nn.NLLLoss()`. The saved `state_dict` therefore has the keys `fc.weight`/`fc.bias` instead of
`1.weight`/`1.bias`: same shapes, different names. It should get full marks.""", replace={
    "model": FUNCTIONAL_MODEL,
    "train_epoch": code_of("train_epoch").replace("loss_fn=nn.NLLLoss()", "loss_fn=F.nll_loss"),
    "validate": code_of("validate").replace("loss_fn=nn.NLLLoss()", "loss_fn=F.nll_loss"),
    "train": code_of("train").replace("loss_fn=nn.NLLLoss()", "loss_fn=F.nll_loss"),
    "fresh": "net = DigitClassifier()\nhist = train(net, train_loader, test_loader, epochs=5)",
    "weights": code_of("weights").replace("next(net.parameters())", "net.fc.weight"),
})

HIDDEN = "nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10), nn.LogSoftmax(dim=1))"
EXAMPLES_SPEC["correct_hidden_layer.ipynb"] = variant("""\
# Example: correct, with a hidden layer

`Flatten → Linear(784, 128) → ReLU → Linear(128, 10) → LogSoftmax(dim=1)`. Everything else follows
the lab; the weight pictures show the first ten of the 128 hidden units (rows of the first layer),
which no longer correspond to digits. The saved `state_dict` has four tensors of other shapes than
the one-layer model's. It should get full marks: the task allows a better network.""", replace={
    "model": f"net = {HIDDEN}",
    "fresh": f"net = {HIDDEN}\nhist = train(net, train_loader, test_loader, epochs=5)",
    "weights": """\
weight_tensor = next(net.parameters())  # 128 x 784: one row per hidden unit
fig, ax = plt.subplots(1, 10, figsize=(15, 2))
for i, row in enumerate(weight_tensor[:10]):
    ax[i].imshow(row.view(28, 28).detach(), cmap="gray")
    ax[i].set_title(f"unit {i}")
    ax[i].axis("off")
plt.show()""",
})

# ---------- the lab's own code ----------
LAB_CODE = {
    "imports": """\
#Import the packages needed.
import torch
import torch.nn as nn
import torchvision
import matplotlib.pyplot as plt
import numpy as np""",
    "data": """\
from torchvision.transforms import ToTensor

data_train = torchvision.datasets.MNIST('./data',
        download=True,train=True,transform=ToTensor())
data_test = torchvision.datasets.MNIST('./data',
        download=True,train=False,transform=ToTensor())""",
    "samples": """\
fig,ax = plt.subplots(1,7)
for i in range(7):
    ax[i].imshow(data_train[i][0].view(28,28))
    ax[i].set_title(data_train[i][1])
    ax[i].axis('off')""",
    "facts": """\
print('Training samples:',len(data_train))
print('Test samples:',len(data_test))

print('Tensor size:',data_train[0][0].size())
print('First 10 digits are:', [data_train[i][1] for i in range(10)])
print('Min intensity value: ',data_train[0][0].min().item())
print('Max intensity value: ',data_train[0][0].max().item())""",
    "model": """\
net = nn.Sequential(
        nn.Flatten(), 
        nn.Linear(784,10), # 784 inputs, 10 outputs
        nn.LogSoftmax())""",
    "untrained": """\
print('Digit to be predicted: ',data_train[0][1])
torch.exp(net(data_train[0][0]))""",
    "loaders": """\
train_loader = torch.utils.data.DataLoader(data_train,batch_size=64)
test_loader = torch.utils.data.DataLoader(data_test,batch_size=64) # we can use larger batch size for testing""",
    "train_epoch": """\
def train_epoch(net,dataloader,lr=0.01,optimizer=None,loss_fn = nn.NLLLoss()):
    optimizer = optimizer or torch.optim.Adam(net.parameters(),lr=lr)
    net.train()
    total_loss,acc,count = 0,0,0
    for features,labels in dataloader:
        optimizer.zero_grad()
        out = net(features)
        loss = loss_fn(out,labels) #cross_entropy(out,labels)
        loss.backward()
        optimizer.step()
        total_loss+=loss
        _,predicted = torch.max(out,1)
        acc+=(predicted==labels).sum()
        count+=len(labels)
    return total_loss.item()/count, acc.item()/count

train_epoch(net,train_loader)""",
    "validate": """\
def validate(net, dataloader,loss_fn=nn.NLLLoss()):
    net.eval()
    count,acc,loss = 0,0,0
    with torch.no_grad():
        for features,labels in dataloader:
            out = net(features)
            loss += loss_fn(out,labels) 
            pred = torch.max(out,1)[1]
            acc += (pred==labels).sum()
            count += len(labels)
    return loss.item()/count, acc.item()/count

validate(net,test_loader)""",
    "train": """\
def train(net,train_loader,test_loader,optimizer=None,lr=0.01,epochs=10,loss_fn=nn.NLLLoss()):
    optimizer = optimizer or torch.optim.Adam(net.parameters(),lr=lr)
    res = { 'train_loss' : [], 'train_acc': [], 'val_loss': [], 'val_acc': []}
    for ep in range(epochs):
        tl,ta = train_epoch(net,train_loader,optimizer=optimizer,lr=lr,loss_fn=loss_fn)
        vl,va = validate(net,test_loader,loss_fn=loss_fn)
        print(f"Epoch {ep:2}, Train acc={ta:.3f}, Val acc={va:.3f}, Train loss={tl:.3f}, Val loss={vl:.3f}")
        res['train_loss'].append(tl)
        res['train_acc'].append(ta)
        res['val_loss'].append(vl)
        res['val_acc'].append(va)
    return res

# Re-initialize the network to start from scratch
net = nn.Sequential(
        nn.Flatten(), 
        nn.Linear(784,10), # 784 inputs, 10 outputs
        nn.LogSoftmax())

hist = train(net,train_loader,test_loader,epochs=5)""",
    "history": """\
plt.figure(figsize=(15,5))
plt.subplot(121)
plt.plot(hist['train_acc'], label='Training acc')
plt.plot(hist['val_acc'], label='Validation acc')
plt.legend()
plt.subplot(122)
plt.plot(hist['train_loss'], label='Training loss')
plt.plot(hist['val_loss'], label='Validation loss')
plt.legend()""",
    "weights": """\
weight_tensor = next(net.parameters())
fig,ax = plt.subplots(1,10,figsize=(15,4))
for i,x in enumerate(weight_tensor):
    ax[i].imshow(x.view(28,28).detach())""",
    "save": """\
!mkdir mnist-model
torch.save(net.state_dict(), "mnist_cnn.pt")""",
}
EXAMPLES_SPEC["lab_as_written.ipynb"] = [("about", "md", """\
# Example: the lab's code exactly as the lab text gives it

Every code block of the lab, unchanged, one per cell. It runs and learns, but with two flaws the
grader should point out without taking points for them: `nn.LogSoftmax()` has no `dim` (PyTorch
guesses `dim=1` for a batch and prints a deprecation warning), and `total_loss += loss` adds up
loss *tensors*, keeping every batch's autograd graph in memory until the epoch ends. It also uses
the `!mkdir` shell escape, which the grader's sandbox may or may not allow; the cell does not
depend on it.""")] + [(k, "code", LAB_CODE[k]) for k in (
    "imports", "data", "samples", "facts", "model", "untrained", "loaders", "train_epoch",
    "validate", "train", "history", "weights", "save")]

# ---------- typical mistakes ----------
EXAMPLES_SPEC["mistake_no_zero_grad.ipynb"] = variant("""\
# Mistake: gradients are never cleared

`train_epoch` leaves out `optimizer.zero_grad()`, so every batch's gradient is added to all the
earlier ones and each step follows the running sum instead of the current batch. The code runs and
the numbers look plausible, but `train_epoch` no longer computes what the reference computes.""",
    replace={"train_epoch": code_of("train_epoch").replace("        optimizer.zero_grad()\n", "")})

EXAMPLES_SPEC["mistake_validate_train_mode.ipynb"] = variant("""\
# Mistake: validation in training mode, with gradients on

`validate` neither calls `net.eval()` nor uses `torch.no_grad()`. For this network (no dropout, no
batch normalisation) the numbers are still right, but the network is left in training mode and a
graph is built for every batch; with dropout the results would be wrong.""", replace={
    "validate": """\
def validate(net, dataloader, loss_fn=nn.NLLLoss()):
    \"\"\"Evaluate net on dataloader; return (loss, accuracy) as floats.\"\"\"
    total_loss, correct, count = 0.0, 0, 0
    for features, labels in dataloader:
        out = net(features)
        total_loss += loss_fn(out, labels).item()
        predicted = torch.max(out, 1)[1]
        correct += (predicted == labels).sum().item()
        count += len(labels)
    return total_loss / count, correct / count"""})

EXAMPLES_SPEC["mistake_logsoftmax_dim0.ipynb"] = variant("""\
# Mistake: `LogSoftmax(dim=0)`

The network normalises over the images of a batch (dimension 0) instead of over the ten digits
(dimension 1). `exp(net(x))` no longer gives ten probabilities per image, and what it learns
depends on which images share a batch.""", replace={
    "model": code_of("model").replace("dim=1", "dim=0"),
    "fresh": code_of("fresh").replace("dim=1", "dim=0"),
})

EXAMPLES_SPEC["mistake_wrong_returns.ipynb"] = variant("""\
# Mistake: `train_epoch` returns a dictionary

`train_epoch` returns `{"loss": ..., "accuracy": ...}` instead of the tuple `(loss, accuracy)`.
The rest of the notebook is written to match, so it runs and trains, but anything that calls
`train_epoch` as specified (`loss, acc = train_epoch(...)`) gets the two keys back.""", replace={
    "train_epoch": code_of("train_epoch").replace(
        "    return total_loss / count, correct / count",
        '    return {"loss": total_loss / count, "accuracy": correct / count}'),
    "train_epoch_try": """\
result = train_epoch(net, train_loader)
print(f"After one epoch: loss {result['loss']:.4f}, training accuracy {result['accuracy']:.3f}")""",
    "train": code_of("train").replace(
        "        tl, ta = train_epoch(net, train_loader, optimizer=optimizer, lr=lr, loss_fn=loss_fn)",
        "        result = train_epoch(net, train_loader, optimizer=optimizer, lr=lr, loss_fn=loss_fn)\n"
        '        tl, ta = result["loss"], result["accuracy"]'),
})

EXAMPLES_SPEC["mistake_history_keys.ipynb"] = variant("""\
# Mistake: the history uses other key names

`train` returns Keras-style keys — `loss`, `acc`, `val_loss`, `val_acc` — instead of `train_loss`,
`train_acc`, `val_loss`, `val_acc`. The notebook's own plot uses the same wrong keys, so it runs.""",
    replace={
        "train": code_of("train").replace('"train_loss"', '"loss"').replace('"train_acc"', '"acc"'),
        "history": code_of("history").replace('hist["train_acc"]', 'hist["acc"]')
                                      .replace('hist["train_loss"]', 'hist["loss"]'),
    })

EXAMPLES_SPEC["mistake_no_saved_model.ipynb"] = variant("""\
# Mistake: the model is never saved

The saving step (and the reload check after it) is missing, so there is no `mnist_cnn.pt`.""",
    replace={"save_md": None, "save": None, "reload_md": None, "reload": None})

EXAMPLES_SPEC["mistake_whole_module_saved.ipynb"] = variant("""\
# Mistake: the whole module is pickled

`torch.save(net, "mnist_cnn.pt")` stores the `nn.Sequential` object itself, which can only be
loaded by unpickling (running) code. The notebook's reload check was "fixed" by passing
`weights_only=False`. A grader loading with `weights_only=True` must refuse the file.""", replace={
    "save": 'torch.save(net, "mnist_cnn.pt")',
    "reload": """\
reloaded = torch.load("mnist_cnn.pt", weights_only=False)
print("Test accuracy of the reloaded model:", validate(reloaded, test_loader)[1])""",
})

EXAMPLES_SPEC["mistake_pickle_payload.ipynb"] = variant("""\
# Hostile: the saved model is a pickle that runs a command when loaded

`mnist_cnn.pt` is written with `torch.save`, so it looks like an ordinary checkpoint, but one of
its entries is an object whose `__reduce__` tells the unpickler to call
`os.system("touch /tmp/pwned")`. Nothing happens when the file is written; anyone who opens it with
`torch.load(..., weights_only=False)` or `pickle` runs the command. The grader must refuse the file
without unpickling any code, and `/tmp/pwned` must not appear.""", replace={
    "save": """\
class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pwned",))


state = net.state_dict()
state["1.bias"] = Payload()
torch.save(state, "mnist_cnn.pt")
print("wrote", os.path.getsize("mnist_cnn.pt"), "bytes")""",
    "reload_md": None, "reload": None,
})

# ---------- notebooks that break the run ----------
EXAMPLES_SPEC["bad_syntax_error.ipynb"] = variant("""\
# Broken: one cell has a syntax error

The cell that prints the dataset facts is missing a comma, so it fails to compile. No other cell
depends on it: everything else runs and is correct.""", replace={
    "facts": code_of("facts").replace('print("Test samples:", len(data_test))',
                                      'print("Test samples:" len(data_test))')})

EXAMPLES_SPEC["bad_exception_midway.ipynb"] = variant("""\
# Broken: an exception in a middle cell

The cell that tries the untrained network passes the whole `(image, label)` pair to `net`, which
raises a `TypeError`/`AttributeError`. Later cells do not depend on it and run correctly.""",
    replace={"untrained": """\
print("The digit is:", data_train[0][1])
print(torch.exp(net(data_train[0])))  # mistake: data_train[0] is a pair, not an image"""})

EXAMPLES_SPEC["bad_endless_loop.ipynb"] = variant("""\
# Broken: a cell never finishes

After the (correct) lab, the last cell spins forever in `while True: pass`. The grader's cell
timeout has to stop it; everything before it is correct and has already run.""",
    after={"reload": [("loop", "code", "# wait for something that never happens\nwhile True:\n    pass")]})

EXAMPLES_SPEC["bad_huge_output.ipynb"] = variant("""\
# Broken: a cell floods the output

After the (correct) lab, the last cell prints a 1 kB line a million times: about 1 GB of output.
The grader must cap what it keeps (memory and the executed notebook) and stop or truncate the
cell, instead of holding it all.""",
    after={"reload": [("flood", "code", """\
line = "0123456789" * 100  # 1000 characters, 1001 bytes with the newline
for _ in range(1_000_000):
    print(line)""")]})

EXAMPLES_SPEC["bad_download.ipynb"] = variant("""\
# Broken: the notebook reaches for the network

Right after the imports it runs `!pip install` and downloads a file with `urllib`. Student kernels
have no network, so both fail quickly: the pip cell prints an error (shell escapes do not raise),
the download cell raises. The rest is correct and does not need either.""",
    after={"imports": [
        ("pip", "code", "!pip install torchsummary"),
        ("download", "code", """\
import urllib.request

urllib.request.urlretrieve("https://example.com/x", "extra-data.bin")"""),
    ]})

EXAMPLES_SPEC["bad_reads_outside.ipynb"] = variant("""\
# Hostile: the notebook looks outside its working directory

After the (correct) lab, the last cell tries to list the parent directory, list `/work`, import
the grader's own packages (`reference`, `grader`) and read `/etc/shadow`, printing `FOUND: ...`
for everything that works and `blocked: ...` for everything that fails. In the grader's sandbox
no line may start with `FOUND:`. The cell itself never raises.""",
    after={"reload": [("peek", "code", """\
import os


def peek(what, attempt):
    try:
        found = attempt()
    except Exception as exc:  # the cell must not fail: it only reports
        print(f"blocked: {what} ({type(exc).__name__})")
        return
    if found:
        print(f"FOUND: {what}: {str(found)[:300]}")
    else:
        print(f"blocked: {what} (nothing there)")


here = os.path.realpath(".")
peek("other entries in ..", lambda: [name for name in os.listdir("..")
                                     if os.path.realpath(os.path.join("..", name)) != here])
peek("/work", lambda: os.listdir("/work"))
peek("import reference", lambda: __import__("reference").__file__)
peek("import grader", lambda: __import__("grader").__file__)
peek("/etc/shadow", lambda: open("/etc/shadow").read())""")]})

EXAMPLES_SPEC["bad_forge_result.ipynb"] = [
    ("about", "md", """\
# Hostile: the notebook tries to forge its grade

It loads the data and does none of the work. Then it
1. writes `result.json` and `results.json` claiming a score of 100, in its working directory and
   in the directory above,
2. tries to kill its parent process (the grader, or the sandbox around the kernel),
3. installs an IPython input transformer that replaces the code of every later cell — including
   anything the grader runs in the kernel afterwards — with code that prints "All checks passed"
   and writes the fake result again.

The grader must ignore files the notebook wrote, survive the kill, and notice that its probe did
not produce a genuine answer: the grade must stay low."""),
] + [c for c in solved() if c[0] in ("imports", "data")] + [
    ("forge", "code", """\
import json

fake = {"score": 100, "max_score": 100, "status": "graded", "tests": [], "output": "All checks passed"}
for folder in (".", ".."):
    for name in ("result.json", "results.json"):
        try:
            with open(os.path.join(folder, name), "w") as f:
                json.dump(fake, f)
            print("wrote", os.path.join(folder, name))
        except OSError as exc:
            print("could not write", os.path.join(folder, name), exc)"""),
    ("kill", "code", """\
import signal

parent = os.getppid()
print("parent process:", parent)
if parent > 1:
    try:
        os.kill(parent, signal.SIGKILL)
        print("sent SIGKILL to", parent)
    except OSError as exc:
        print("could not kill the parent:", exc)"""),
    ("tamper", "code", """\
FORGED = [
    "import json\\n",
    "json.dump({'score': 100, 'max_score': 100}, open('result.json', 'w'))\\n",
    "print('All checks passed')\\n",
]


def forge_every_cell(lines):
    return list(FORGED)


get_ipython().input_transformers_post.append(forge_every_cell)
print("transformer installed")"""),
    ("after_tamper", "code", """\
# This cell's own code never runs: the transformer above replaces it.
print("this line is never printed")"""),
]


# --------------------------------------------------------------------------------------------
# Deliberately invalid inputs.
# --------------------------------------------------------------------------------------------
def write_invalid() -> None:
    folder = EXAMPLES / "invalid"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "not_a_notebook.ipynb").write_text(
        "This is not a notebook.\n\nI wrote my answers in a text file and renamed it to .ipynb:\n"
        "net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.LogSoftmax(dim=1))\n",
        encoding="utf-8")
    text = (EXAMPLES / "correct.ipynb").read_text(encoding="utf-8")
    (folder / "broken_json.ipynb").write_text(text[: len(text) // 2], encoding="utf-8")
    wrong = {
        "nbformat": 4, "nbformat_minor": 5, "metadata": {},
        "cells": [
            {"cell_type": "markdown", "id": "about", "metadata": {},
             "source": "Valid JSON, but not a valid notebook: the code cell below has a number "
                       "as its source, no outputs list and an unknown cell type follows."},
            {"cell_type": "code", "id": "code", "metadata": {}, "source": 42,
             "execution_count": None},
            {"cell_type": "answer", "id": "answer", "metadata": {}, "source": "print(1)"},
        ],
    }
    (folder / "wrong_schema.ipynb").write_text(json.dumps(wrong, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    write(notebook(CELLS, "instructor"), LAB / "instructor.ipynb")
    for name, spec in EXAMPLES_SPEC.items():
        write(notebook(spec, name.removesuffix(".ipynb")), EXAMPLES / name)
    write_invalid()


if __name__ == "__main__":
    main()
