"""The probe: everything that crosses between the grader and the student's kernel, in one package.

- :mod:`~grader.probe.plan`: the inputs, drawn at grading time once the cells have run.
- :mod:`~grader.probe.inkernel`: the only grader code that runs in the student's kernel.
- :mod:`~grader.probe.source`: the code sent there (the prelude, and the probe with the plan; its
  arrays in a file beside the channel's socket).
- :mod:`~grader.probe.channel`: the grader's end of the Unix socket the answer comes back on.
- :mod:`~grader.probe.answers`: the answer's schema, parsed and validated once into frozen records.

A run: ``prelude_code(...)`` before the first cell; once the cells have run, ``make_plan(train,
test)``, ``Channel(kernel.channel_dir, plan.nonce, timeout)``, ``probe_code(plan,
kernel.channel_dir, kernel.inner_channel_dir)`` as the epilogue; then ``channel.close()`` gives a :class:`Received`, and
``parse(received.message, plan)`` the :class:`Answers` the checks take.
"""
from grader.probe.answers import (Answers, DatasetAnswer, Figure, FunctionAnswer, HistoryAnswer, LoaderAnswer,
                                  ModelAnswer, Problem, Value, parse)
from grader.probe.channel import Channel, Received
from grader.probe.plan import (BATCH_SIZE, DATASETS, EPOCHS, LEARNING_RATE, LOADERS, LOSS_FACTOR, MODEL_BATCH,
                               TEST_BATCHES, TRAIN_BATCHES, Plan, make_plan)
from grader.probe.source import prelude_code, probe_code

__all__ = ["Answers", "BATCH_SIZE", "Channel", "DATASETS", "DatasetAnswer", "EPOCHS", "Figure", "FunctionAnswer",
           "HistoryAnswer", "LEARNING_RATE", "LOADERS", "LOSS_FACTOR", "LoaderAnswer", "MODEL_BATCH", "ModelAnswer", "Plan", "Problem",
           "Received", "TEST_BATCHES", "TRAIN_BATCHES", "Value", "make_plan", "parse", "prelude_code",
           "probe_code"]
