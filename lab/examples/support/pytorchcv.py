"""A stand-in, written for labgrader's examples, for the helper module a course's version of this lab
downloads before its first cell. Its one function loads MNIST from ./data and, as that helper does,
puts the datasets and their loaders into builtins, so every later cell sees them without an import.

Given to every notebook by the grader as a support file (``--support-file``): grading has no network,
so the notebook's own download of the helper fails, and that failure is not the student's.
"""
import builtins

import torch
import torchvision
from torchvision.transforms import ToTensor


def load_mnist(batch_size=64):
    """MNIST from ./data as tensors; publishes data_train, data_test, train_loader, test_loader."""
    builtins.data_train = torchvision.datasets.MNIST("./data", train=True, download=True, transform=ToTensor())
    builtins.data_test = torchvision.datasets.MNIST("./data", train=False, download=True, transform=ToTensor())
    builtins.train_loader = torch.utils.data.DataLoader(builtins.data_train, batch_size=batch_size, shuffle=True)
    builtins.test_loader = torch.utils.data.DataLoader(builtins.data_test, batch_size=batch_size)
