"""The grader's own answers: its plain SGD is torch.optim.SGD to the bit, and the answers are
those of the reference on the probe's inputs."""
from __future__ import annotations

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


def test_expected_answers_are_the_references_on_the_plan():
    generator = torch.Generator().manual_seed(1)
    train = (torch.rand(600, 1, 28, 28, generator=generator), torch.randint(10, (600,), generator=generator))
    test = (torch.rand(300, 1, 28, 28, generator=generator), torch.randint(10, (300,), generator=generator))
    plan = probe.make_plan(train, test, seed=3)
    answers = expected.compute(plan, train, test)
    arrays = {name: torch.from_numpy(array) for name, array in plan.arrays.items()}
    net = model.make_model()
    with torch.no_grad():
        net[1].weight.copy_(arrays["init_weight"])
        net[1].bias.copy_(arrays["init_bias"])
    assert training.validate(net, data.loader(arrays["test_x"], arrays["test_y"])) == answers.validate
    assert len(answers.train_history["train_loss"]) == probe.EPOCHS
    assert not torch.equal(answers.train_epoch_params["weight"], answers.no_zero_grad_params["weight"])
    index = plan.data_indices["data_train"][0]
    assert answers.data_items["data_train"][0] == {"label": int(train[1][index]),
                                                   "sum": float(train[0][index].double().sum())}
