"""benchmarks/deploy_profile.py: onnxruntime's profile read back node by node, the warm-up runs left out."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import helper, numpy_helper  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path[:0] = [str(BENCHMARKS)]
from deploy_profile import SHAPE, by_op, node_times, table  # noqa: E402


def _graph(path: Path) -> None:
    """input -> Relu -> Mul by 2 -> Relu -> output, the deploy benchmark's input shape."""
    nodes = [helper.make_node("Relu", ["input"], ["a"], name="first"),
             helper.make_node("Mul", ["a", "two"], ["b"], name="double"),
             helper.make_node("Relu", ["b"], ["output"], name="second")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", 1, [None, *SHAPE])],
                              [helper.make_tensor_value_info("output", 1, None)],
                              [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_node_times_name_every_node_once_and_by_op_counts_them(tmp_path):
    _graph(tmp_path / "g.onnx")
    times = node_times(tmp_path / "g.onnx", runs=5)
    assert set(times) == {("first", "Relu"), ("double", "Mul"), ("second", "Relu")}
    assert all(us >= 0 for us in times.values())
    ops = by_op(times)
    assert {op: n for op, (n, _) in ops.items()} == {"Relu": 2, "Mul": 1}
    assert ops["Relu"][1] == pytest.approx(times[("first", "Relu")] + times[("second", "Relu")])


def test_table_puts_the_costliest_node_type_first_and_totals_each_column():
    columns = {"float": {"Conv": (2, 30.0), "Add": (1, 5.0)}, "fast": {"QLinearConv": (2, 10.0), "Clip": (2, 8.0)}}
    lines = table("m", columns).splitlines()
    assert lines[4].startswith("| Conv | 30 (2) |  |") and lines[-1].endswith("| **35** | **18** |")
