"""Tracing and compilation: the graph a program builds without running a model, prefix caching
(`fn.cache`), and compiled programs prefetching the prefixes the graph shows are shared."""

from __future__ import annotations

import pytest

import plait as sgl
from plait.lang import ir
from plait.lang.backend.scripted import ScriptedBackend
from plait.lang.compiler import ProgramGraph

SYSTEM = "You are a meticulous assistant who answers questions about geography in one short sentence."


@sgl.function
def qa(s, question):
    s += sgl.system(SYSTEM)
    s += sgl.user("Question: " + question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=16))


@sgl.function
def tips(s, topic):
    s += SYSTEM + "\n"
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Tip number {i + 1}, written for a complete beginner who has never heard of the subject: "
        f += topic + sgl.gen("tip", stop="\n")
    forks.join()
    s += "Summary of " + topic + ": " + sgl.gen("summary")
    s += "First tip again: " + s["tip"][0]


def test_trace_records_nodes_and_placeholders():
    state = qa.trace()
    graph = state.last_node.print_graph_dfs()
    assert "Argument(name='question')" in graph and "Gen('answer')" in graph
    assert graph.splitlines()[-1].endswith("RoleEnd(assistant)")
    kinds = [type(n).__name__ for n in state.nodes]
    assert kinds.count("SglGen") == 1 and kinds.count("SglRoleBegin") == 3
    assert isinstance(state["answer"], ir.SglVariable) and state["answer"].source.name == "answer"
    # A given argument is a constant of the trace.
    assert "Constant('Question: Paris?')" in qa.trace(question="Paris?").last_node.print_graph_dfs()


def test_fstring_of_placeholder_raises_clear_error():
    @sgl.function
    def bad(s, question):
        s += f"Question: {question}"

    with pytest.raises(TypeError, match="f-string"):
        bad.trace()
    assert bad.run(question="ok?", backend=ScriptedBackend()).text() == "Question: ok?"

    @sgl.function
    def branches(s):
        s += sgl.gen("x")
        if s["x"]:
            s += "!"

    with pytest.raises(TypeError, match="cannot branch"):
        branches.trace()


def test_cache_sends_the_constant_prefix():
    backend = ScriptedBackend(chat_template="chatml")
    prefix = qa.cache(backend)
    assert backend.calls == [("cache_prefix", prefix, None)]
    assert prefix == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nQuestion: "
    text = qa.run(question="Where is Paris?", backend=backend).text()
    assert text.startswith(prefix)  # the tracer renders roles exactly as the interpreter does

    @sgl.function
    def short(s, q):
        s += "Q: " + q

    assert short.cache(backend) is None  # too short to be worth a request


def test_run_batch_precaches_the_prefix():
    backend = ScriptedBackend(chat_template="chatml")
    qa.run_batch([{"question": "A?"}, {"question": "B?"}], backend=backend)
    assert backend.calls[0][0] == "cache_prefix" and [c[0] for c in backend.calls].count("cache_prefix") == 1
    backend.calls.clear()
    qa.run_batch([{"question": "A?"}, {"question": "B?"}], backend=backend, precache=False)
    assert "cache_prefix" not in [c[0] for c in backend.calls]


def test_program_graph_streams_edges_and_shared_prefixes():
    compiled = tips.compile(backend=ScriptedBackend())
    graph: ProgramGraph = compiled.graph
    assert set(graph.streams) == {0, 1, 2}
    assert graph.parent[1][0] == 0 and graph.parent[1][1] == graph.parent[2][1]  # both from one fork node
    fork_node = graph.nodes[graph.parent[1][1]].expr
    assert isinstance(fork_node, ir.SglFork) and fork_node.number == 2
    # The summary stream reads branch 0's tip: a data edge from stream 1 into stream 0.
    readers = [n for n in graph.nodes.values() if n.sources]
    assert readers and graph.nodes[readers[-1].sources[0]].stream == 1
    position = {k: i for i, k in enumerate(graph.order)}
    for node in graph.nodes.values():
        for src in node.sources + ([node.prev] if node.prev is not None else []):
            assert position[src] < position[node.node_id]
    prefixes = compiled.shared_prefixes()
    assert prefixes == sorted(SYSTEM + "\n" + f"Tip number {i}, written for a complete beginner who has never "
                              "heard of the subject: " for i in (1, 2))
    printed = compiled.print_graph()
    assert "stream 1:" in printed and "Fork(2)" in printed and "[reads %" in printed


def test_compiled_run_batch_prefetches_before_the_batch():
    backend = ScriptedBackend()
    compiled = tips.compile(backend=backend)
    states = compiled.run_batch([{"topic": "rivers"}, {"topic": "mountains"}], backend=backend)
    kinds = [c[0] for c in backend.calls]
    assert kinds[:2] == ["cache_prefix", "cache_prefix"] and kinds.count("cache_prefix") == 2
    assert {c[1] for c in backend.calls[:2]} == set(compiled.shared_prefixes())
    assert len(states[0]["tip"]) == 2 and states[1].text().startswith(SYSTEM + "\nSummary of mountains: ")
    single = compiled.run(topic="lakes", backend=backend)
    assert single["summary"].startswith("<gen")


def test_nested_program_is_traced_as_its_own_stream():
    @sgl.function
    def inner(s, x):
        s += "inner " + x + sgl.gen("y")

    @sgl.function
    def outer(s):
        s += "outer"
        inner(x="constant")
        s += sgl.gen("z")

    state = outer.trace()
    graph = ProgramGraph.from_trace(state)
    assert len(graph.streams) == 2 and graph.constant_prefix(1) == "inner constant"
