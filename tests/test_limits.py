"""One limits type: the rubric's [limits] table sets any limit the executor enforces, and a mistake in
it is a one-line error naming the file and the key."""
import dataclasses

import pytest

from grader import resources, score
from grader.limits import Limits


def _rubric_with_limits(tmp_path, table: str):
    text = resources.RUBRIC_PATH.read_text()
    start = text.index("[limits]")
    end = text.index("[checks.", start)
    path = tmp_path / "rubric.toml"
    path.write_text(text[:start] + "[limits]\n" + table + "\n\n" + text[end:])
    return path


def test_the_rubric_sets_any_limit_and_the_rest_keep_their_defaults(tmp_path):
    rubric = score.load_rubric(_rubric_with_limits(tmp_path, "cell_timeout = 30\nprocesses = 64"))
    assert rubric.limits == dataclasses.replace(Limits(), cell_timeout=30.0, processes=64)


def test_the_bundled_rubric_sets_its_timeouts_through_the_same_type():
    rubric = score.load_rubric(resources.RUBRIC_PATH)
    assert isinstance(rubric.limits, Limits)
    assert rubric.limits.notebook_timeout >= rubric.limits.cell_timeout


@pytest.mark.parametrize("table, named", [
    ("cell_timeuot = 30", "cell_timeuot"),
    ("processes = 1.5", "processes"),
    ("notebook_timeout = -1", "notebook_timeout"),
    ('memory_bytes = "6G"', "memory_bytes"),
])
def test_a_bad_limit_is_one_line_naming_file_and_key(tmp_path, table, named):
    path = _rubric_with_limits(tmp_path, table)
    with pytest.raises(score.RubricError) as error:
        score.load_rubric(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and named in message
