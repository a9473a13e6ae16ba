"""labgrader's grader: intake -> sandbox -> execute -> probe -> checks -> score -> report.

Each stage is one module with one entry point; results are frozen dataclasses from
:mod:`grader.results`, handed forward and never changed by a later stage.
"""
