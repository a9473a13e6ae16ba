"""The grader's own answers: its plain SGD is torch.optim.SGD to the bit, and the answers are
those of the reference on the probe's inputs."""
from __future__ import annotations

import numpy as np
import torch

from grader import expected, probe
from reference import data, model, training


def test_plain_sgd_is_torch_sgd_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    features, labels = torch.rand(256, 1, 28, 28, generator=generator), torch.randint(10, (256,), generator=generator)
    nets = [model.make_model(seed=1), model.make_model(seed=1)]
    optimizers = [torch.optim.SGD(nets[0].parameters(), lr=0.05), expected.PlainSGD(nets[1].parameters(), lr=0.05)]
    for net, optimizer in zip(nets, optimizers):
        training.train_epoch(net, data.loader(features, labels), optimizer=optimizer)
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))


def _plan():
    generator = torch.Generator().manual_seed(1)
    train = (torch.rand(600, 1, 28, 28, generator=generator), torch.randint(10, (600,), generator=generator))
    test = (torch.rand(300, 1, 28, 28, generator=generator), torch.randint(10, (300,), generator=generator))
    return probe.make_plan(train, test, seed=3), train, test


def _net(arrays):
    net = model.make_model()
    with torch.no_grad():
        net[1].weight.copy_(arrays["init_weight"])
        net[1].bias.copy_(arrays["init_bias"])
    return net


def test_expected_answers_are_the_references_on_the_plan():
    plan, train, test = _plan()
    answers = expected.compute(plan, train, test)
    arrays = {name: torch.from_numpy(array) for name, array in plan.arrays.items()}
    assert training.validate(_net(arrays), data.loader(arrays["test_x"], arrays["test_y"])) == answers.validate
    net = _net(arrays)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as expected.compute and the probe run: other counts change the last bits
    try:
        history = training.train(net, data.loader(arrays["train_x"], arrays["train_y"]),
                                 data.loader(arrays["test_x"], arrays["test_y"]),
                                 optimizer=torch.optim.SGD(net.parameters(), lr=probe.LEARNING_RATE),
                                 epochs=probe.EPOCHS)
    finally:
        torch.set_num_threads(threads)
    assert history == answers.reference.history  # the reference's own train(), bit for bit
    assert np.array_equal(net[1].weight.detach().double().numpy(), answers.reference.train_params["weight"])
    index = plan.data_indices["data_train"][0]
    assert answers.data_items["data_train"][0] == {"label": int(train[1][index]),
                                                   "sum": float(train[0][index].double().sum())}


def test_each_way_of_training_and_each_loss_ends_elsewhere():
    """What the checks tell apart must differ: the reference from training without zero_grad, and
    the plain loss from the doubled one, in train_epoch and in train alike."""
    plan, train, test = _plan()
    answers = expected.compute(plan, train, test)
    params = [outcome.epoch_params["weight"] for outcome in answers.outcomes().values()]
    params += [outcome.epoch_doubled_params["weight"] for outcome in answers.outcomes().values()]
    params += [outcome.train_params["weight"] for outcome in answers.outcomes().values()]
    params += [outcome.train_doubled_params["weight"] for outcome in answers.outcomes().values()]
    assert all(not np.allclose(a, b, atol=1e-4) for i, a in enumerate(params) for b in params[i + 1:])
    assert len(answers.no_zero_grad.history["train_loss"]) == probe.EPOCHS


def test_the_doubled_loss_is_twice_nll_loss():
    output = torch.log_softmax(torch.randn(5, 10), dim=1)
    target = torch.randint(10, (5,))
    assert torch.equal(expected.doubled_nll_loss(output, target), 2 * torch.nn.NLLLoss()(output, target))
