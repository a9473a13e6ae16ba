"""``import labgrader; labgrader.check()`` in a Jupyter notebook: the grader's visible checks on the
kernel as it is now, shown inline (``labgrader.check("train_epoch")``: one part). See
:mod:`grader.selfcheck`. The ``labgrader`` command is ``grader.cli``; this module only names the
notebook's entry point."""
from grader.selfcheck import check

__all__ = ["check"]
