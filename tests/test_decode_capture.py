"""The decode step's CUDA graph capture (strive_engine.decode.capture_graph) with torch.cuda's graph and stream
objects replaced by recorders, so that it runs on the CPU: the order of the calls, the stream the step is
recorded on, the caller's stream restored whatever fails, the step's own error raised, and no cache flushes.
(torch.cuda.graph, which the engine used before, stays on its capture stream when capture_begin or capture_end
raises, and empties the allocator's and the pinned-host caches on every entry.) The capture on a real device:
tests/test_decode.py::test_cuda_graph_decode_matches_hf."""
import contextlib

import pytest
import torch

from strive_engine import decode


@pytest.fixture
def fake_cuda(monkeypatch):
    calls, current = [], ["default"]

    class Graph:
        fail = ""

        def capture_begin(self, capture_error_mode="global"):
            calls.append(("begin", capture_error_mode, current[0]))
            if Graph.fail == "begin":
                raise RuntimeError("capture_begin refused")

        def capture_end(self):
            calls.append(("end", current[0]))
            if Graph.fail in ("end", "step"):
                raise RuntimeError("operation not permitted when stream is capturing")

    @contextlib.contextmanager
    def stream(s):
        prev, current[0] = current[0], s
        try:
            yield
        finally:
            current[0] = prev

    def flush(*_):
        raise AssertionError("the capture emptied a cache")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph, raising=False)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "empty_cache", flush)
    monkeypatch.setattr(torch._C, "_host_emptyCache", flush, raising=False)
    return Graph, calls, current


def test_the_step_is_recorded_on_the_side_stream_and_the_callers_stream_comes_back(fake_cuda):
    Graph, calls, current = fake_cuda
    graph = decode.capture_graph(lambda: calls.append(("step", current[0])), "side")
    assert isinstance(graph, Graph) and current[0] == "default"
    assert calls == [("begin", "thread_local", "side"), ("step", "side"), ("end", "side")]


@pytest.mark.parametrize("fail", ["begin", "end", "step"])
def test_a_failed_capture_restores_the_stream_and_raises_the_first_error(fake_cuda, fail):
    Graph, calls, current = fake_cuda
    Graph.fail = fail

    def step():
        calls.append(("step", current[0]))
        if fail == "step":
            raise RuntimeError("a host sync inside the captured step")
    with pytest.raises(RuntimeError) as err:
        decode.capture_graph(step, "side")
    assert current[0] == "default"                                  # the caller's stream, whatever failed
    want = {"begin": "capture_begin refused", "end": "operation not permitted when stream is capturing",
            "step": "a host sync inside the captured step"}[fail]
    assert str(err.value) == want                                   # the step's error, not capture_end's
    assert [c[0] for c in calls] == (["begin"] if fail == "begin" else ["begin", "step", "end"])
