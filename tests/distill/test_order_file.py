"""`--order FILE` (distill_workers/runner.py `layer_order`): a file of another shape is refused
with a ValueError, which the CLI reports as one line, never a traceback."""
from __future__ import annotations

import json

import pytest

from distill_workers.runner import layer_order


@pytest.mark.parametrize("content", [[2, 0, 3, 1], {"damage": [2, 0, 3, 1]}, "2,0,3,1", {"order": [2, "0", 3, 1]}])
def test_an_order_file_of_another_shape_is_refused(tmp_path, content):
    path = tmp_path / "order.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError):
        layer_order(str(path), [0, 1, 2, 3])


@pytest.mark.parametrize("content", [{"order": [2, 0, 3, 1]}, {"damage": {"order": [2, 0, 3, 1]}}])
def test_the_documented_order_files_are_read(tmp_path, content):
    path = tmp_path / "order.json"
    path.write_text(json.dumps(content))
    assert layer_order(str(path), [0, 1, 2, 3]) == [2, 0, 3, 1]
