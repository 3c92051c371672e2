"""The interpreter against a scripted backend (no model): ordering of `+=`, blocking reads,
fork/join copies, variable scopes, roles, streaming, errors surfacing, run_batch order."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

import plait as sgl
from plait.lang.backend.scripted import ScriptedBackend
from plait.lang.interpreter import ProgramError, StreamExecutor
from plait.lang.params import GenParams


def within(seconds: float, fn, *args, **kwargs):
    """Run `fn` on a thread and fail (instead of hanging the suite) if it takes too long."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} did not finish within {seconds} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.fixture
def backend():
    b = ScriptedBackend()
    yield b
    if b.gate is not None:
        b.gate.set()


def test_iadd_returns_before_generation_and_reads_block(backend):
    backend.gate = threading.Event()
    seen = {}

    @sgl.function
    def prog(s):
        s += "Q:" + sgl.gen("a")
        seen["queued"] = True  # reached while the gen is still held by the gate
        s += " then" + sgl.gen("b")

    state = within(5, prog.run, backend=backend)  # returns although nothing was generated
    assert seen["queued"] and backend.calls == []
    reader = threading.Thread(target=lambda: seen.setdefault("b", state["b"]), daemon=True)
    reader.start()
    time.sleep(0.1)
    assert "b" not in seen  # the read is waiting
    backend.gate.set()
    reader.join(5)
    assert seen["b"] == "<gen 2>"
    assert state.text() == "Q:<gen 1> then<gen 2>"


def test_order_of_appends_and_prompts(backend):
    @sgl.function
    def prog(s):
        for i in range(4):
            s += f"[{i}]" + sgl.gen(f"g{i}")
        s["manual"] = "set in order"
        s += "end"

    state = prog.run(backend=backend)
    assert state.text() == "[0]<gen 1>[1]<gen 2>[2]<gen 3>[3]<gen 4>end"
    state["g0"] = state["g0"].upper()  # post-processing a finished state
    assert state["g0"] == "<GEN 1>" and "<gen 4>" in repr(state)
    prompts = [c[1] for c in backend.calls]
    assert prompts == ["[0]", "[0]<gen 1>[1]", "[0]<gen 1>[1]<gen 2>[2]", "[0]<gen 1>[1]<gen 2>[2]<gen 3>[3]"]
    assert state["manual"] == "set in order" and "g3" in state and "nope" not in state


def test_read_inside_program_drives_control_flow():
    answers = iter(["yes", "42"])
    backend = ScriptedBackend(respond=lambda prompt, params: next(answers))

    @sgl.function
    def prog(s):
        s += "Should I compute?" + sgl.gen("decision")
        if s["decision"] == "yes":
            s += " Result:" + sgl.gen("result")
        return s["result"]

    state = prog.run(backend=backend)
    assert state.ret_value == "42" and state.text() == "Should I compute?yes Result:42"


def test_later_definition_wins_and_undefined_read_fails_fast(backend):
    @sgl.function
    def prog(s):
        s += sgl.gen("x")
        s += sgl.gen("x")

    state = prog.run(backend=backend)
    assert state["x"] == "<gen 2>"
    with pytest.raises(KeyError):
        within(5, lambda: state["never"])


def test_fork_copies_and_gather(backend):
    @sgl.function
    def prog(s):
        s["before"] = "parent value"
        s += "Shared prefix."
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += f" Branch {i}:" + sgl.gen("tip")
            f["before"] = f"changed in {i}"
        forks.join()
        s += " After."
        return forks

    state = prog.run(backend=backend)
    forks = state.ret_value
    assert state["tip"] == [forks[i]["tip"] for i in range(3)]
    assert sorted(state["tip"]) == ["<gen 1>", "<gen 2>", "<gen 3>"]
    assert state["before"] == ["changed in 0", "changed in 1", "changed in 2"]  # set after the fork: gathered
    assert state.text() == "Shared prefix. After."  # branches do not write into the parent
    assert forks[1].text().startswith("Shared prefix. Branch 1:")
    # The fork hint: the shared prefix is committed once, before any branch generates.
    kinds = [c[0] for c in backend.calls]
    assert kinds[0] == "commit" and backend.calls[0][1] == "Shared prefix." and kinds.count("commit") == 1


def test_fork_concatenate_mode_and_broadcast(backend):
    @sgl.function
    def prog(s):
        s += "P."
        forks = s.fork(2)
        forks += [" a", " b"]
        forks += sgl.gen("g")
        forks.join("concate_and_append")
        s += " done"

    text = prog.run(backend=backend).text()
    assert text.startswith("P. a<gen ") and " b<gen " in text and text.endswith(" done")


def test_copy_context_manager(backend):
    @sgl.function
    def prog(s):
        s += "base"
        with s.copy() as c:
            c += " extra" + sgl.gen("y")
        s += " after"

    state = prog.run(backend=backend)
    assert state["y"] == ["<gen 1>"] and state.text() == "base after"


def test_var_scope_roles_and_messages():
    backend = ScriptedBackend(chat_template="qwen")  # has a default system prompt and a stop string

    @sgl.function
    def prog(s):
        with s.user():
            with s.var_scope("question"):
                s += "What is 1+1?"
        s += sgl.assistant(sgl.gen("answer"))
        s += sgl.user_begin() + "Thanks" + sgl.user_end()

    state = prog.run(backend=backend)
    assert state["question"] == "What is 1+1?"
    assert state.messages() == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 1+1?"},
        {"role": "assistant", "content": "<gen 1>"},
        {"role": "user", "content": "Thanks"},
    ]
    assert state.text().startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert "<|im_end|>" in backend.calls[0][2].sampling.stop  # the template's stop joins the gen's


def test_nested_roles_error():
    @sgl.function
    def prog(s):
        with s.user():
            s += sgl.assistant("x")

    state = prog.run(backend=ScriptedBackend())
    with pytest.raises(ProgramError, match="Nested roles"):
        within(5, state.text)


def test_sampling_defaults_and_overrides(backend):
    @sgl.function
    def prog(s):
        s += sgl.gen("a")
        s += sgl.gen("b", 7, stop=["\n"], temperature=0.5, top_k=3, return_logprob=True)
        s += sgl.gen("c", dtype=int)
        s += sgl.gen_string("d")

    prog.run(backend=backend, temperature=0, max_new_tokens=33, stop="X", top_logprobs_num=2).sync()
    a, b, c, d = (call[2] for call in backend.calls)
    assert (a.sampling.max_new_tokens, a.sampling.temperature, a.sampling.stop) == (33, 0, ["X"])
    assert (b.sampling.max_new_tokens, b.sampling.temperature, b.sampling.top_k, b.sampling.stop) == (7, 0.5, 3, ["\n"])
    assert b.logprob.return_logprob is True and b.logprob.top_logprobs_num == 2
    assert c.dtype == "int" and d.dtype == "str"
    regexed = c.with_dtype_as_regex()
    assert regexed.sampling.regex == sgl.lang.ir.REGEX_INT and {" ", "\n"} <= set(regexed.sampling.stop)


def test_gen_argument_checks():
    with pytest.raises(ValueError):
        sgl.gen("x", dtype=list)
    import re

    with pytest.raises(re.error):
        sgl.gen("x", regex="(unclosed")
    assert isinstance(sgl.gen("x", choices=["a", "b"]), sgl.lang.ir.SglSelect)
    with pytest.raises(ValueError):
        sgl.function(lambda x: None)  # the first parameter must be `s`
    with pytest.raises(ValueError):
        sgl.lang.ir.SglConstantText("a") + None


def test_n_samples_list_value():
    backend = ScriptedBackend()

    @sgl.function
    def prog(s):
        s += "Q" + sgl.gen("many", n=3)

    state = prog.run(backend=backend)
    assert state["many"] == ["<gen 1>", "<gen 2>", "<gen 3>"] and state.text() == "Q<gen 1>"


def test_streaming_text_iter_and_async():
    backend = ScriptedBackend(respond=lambda p, params: "abcdefgh", stream_chunk_chars=3, stream_delay_s=0.02)

    @sgl.function
    def prog(s):
        s += "Start:" + sgl.gen("x") + " mid " + sgl.gen("y")

    state = prog.run(backend=backend, stream=True)
    pieces = within(5, lambda: list(state.text_iter()))
    assert "".join(pieces) == "Start:abcdefgh mid abcdefgh" and len(pieces) > 1

    state = prog.run(backend=backend, stream=True)
    assert within(5, lambda: list(state.text_iter("y"))) == ["abc", "def", "gh"]

    async def collect():
        st = prog.run(backend=backend, stream=True)
        return [(c, m) async for c, m in st.text_async_iter("x", return_meta_data=True)]

    pairs = within(5, asyncio.run, collect())
    assert "".join(c for c, _ in pairs) == "abcdefgh" and pairs[-1][1]["completion_tokens"] == 8


def test_backend_error_surfaces_with_traceback():
    def respond(prompt, params):
        if "bad" in prompt:
            raise ConnectionError("backend exploded")
        return "ok"

    backend = ScriptedBackend(respond=respond)

    @sgl.function
    def prog(s):
        s += "bad" + sgl.gen("x")
        s += sgl.gen("y")

    state = prog.run(backend=backend)
    with pytest.raises(ProgramError, match="backend exploded") as info:
        within(5, lambda: state["y"])
    assert "respond" in str(info.value)  # the failing code's traceback is in the message
    assert isinstance(state.error(), ConnectionError)
    with pytest.raises(ProgramError):
        within(5, state.text)

    @sgl.function
    def reads_inside(s):
        s += "bad" + sgl.gen("x")
        s["x"]

    with pytest.raises(ProgramError):
        within(5, reads_inside.run, backend=backend)


def test_error_in_streaming_body_surfaces():
    @sgl.function
    def prog(s):
        s += "hi" + sgl.gen("x")
        raise ValueError("bug in the program")

    state = prog.run(backend=ScriptedBackend(), stream=True)
    with pytest.raises(ProgramError, match="bug in the program"):
        within(5, lambda: list(state.text_iter()))


def test_error_in_body_propagates_directly():
    @sgl.function
    def prog(s):
        raise KeyError("direct")

    with pytest.raises(KeyError):
        prog.run(backend=ScriptedBackend())


def test_run_batch_order_and_generator_style():
    def respond(prompt, params):
        time.sleep(random.random() * 0.01)
        return prompt.split("#")[1]

    backend = ScriptedBackend(respond=respond)

    @sgl.function
    def prog(s, i, suffix="!"):
        s += "#" + str(i) + "#" + sgl.gen("echo") + suffix

    items = [{"i": i} for i in range(30)]
    states = prog.run_batch(items, backend=backend, num_threads=8, progress_bar=True)
    assert [st["echo"] for st in states] == [str(i) for i in range(30)]
    gen = prog.run_batch(items, backend=backend, num_threads=4, generator_style=True)
    assert [st["echo"] for st in gen] == [str(i) for i in range(30)]
    positional = prog.run_batch([[1], [2, "?"]], backend=backend, num_threads=1)
    assert [st.text() for st in positional] == ["#1#1!", "#2#2?"]
    with pytest.raises(ValueError, match="mismatch"):
        prog.run_batch([[1, 2, 3]], backend=backend)
    assert prog.run_batch([], backend=backend) == []


def test_bind_and_call(backend):
    @sgl.function(num_api_spec_tokens=None)
    def prog(s, a, b):
        s += a + b

    bound = prog.bind(a="x")
    assert bound(b="y", backend=backend).text() == "xy"
    with pytest.raises(TypeError):
        prog.bind(c=1)


def test_separate_reasoning():
    backend = ScriptedBackend(respond=lambda p, params: "<think>step by step</think>The answer is 4.")

    @sgl.function
    def prog(s):
        s += sgl.user("2+2?")
        s += sgl.assistant(sgl.separate_reasoning(sgl.gen("answer"), model_type="deepseek-r1"))

    state = prog.run(backend=backend)
    assert state["answer"] == "The answer is 4."
    assert state["answer_reasoning_content"] == "step by step"
    assert state.messages()[-1] == {"role": "assistant", "content": "The answer is 4."}
    assert "<think>" not in state.text()


def test_image_goes_to_backend_with_image_token(tmp_path):
    path = tmp_path / "pixel.png"
    path.write_bytes(b"\x89PNG fake bytes")
    backend = ScriptedBackend(chat_template="chatml-llava")

    @sgl.function
    def prog(s):
        s += sgl.user(sgl.image(str(path)) + "What is this?")
        s += sgl.assistant(sgl.gen("a"))

    state = prog.run(backend=backend)
    assert "<image>\nWhat is this?" in state.text()
    content = state.messages()[0]["content"]
    assert content[0] == {"type": "text", "text": "<image>\nWhat is this?"}
    assert content[1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert state.stream_executor.images_[0][1] == "iVBORyBmYWtlIGJ5dGVz"


def test_executor_without_thread():
    ex = StreamExecutor(ScriptedBackend(), {}, GenParams(), None, stream=False, use_thread=False)
    ex.submit(sgl.lang.ir.SglConstantText("a") + sgl.gen("v"))
    assert ex.get_var("v") == "<gen 1>" and ex.text_ == "a<gen 1>"


def test_without_parallel_execution_branches_run_one_after_another():
    """global_config.enable_parallel_execution = False (the "no frontend parallelism" ablation):
    every call runs in the program body's own thread, branch after branch, and a branch's gen has
    returned before the next branch starts."""
    threads, active, overlaps = [], [0], []
    lock = threading.Lock()

    def respond(prompt, params):
        with lock:
            active[0] += 1
            overlaps.append(active[0])
            threads.append(threading.get_ident())
        time.sleep(0.02)
        with lock:
            active[0] -= 1
        return "x"

    @sgl.function
    def prog(s):
        s += "Prefix."
        forks = s.fork(3)
        forks += lambda i: f" {i}:" + sgl.gen("g", max_tokens=2)
        forks.join()
        s += sgl.gen("last", max_tokens=2)

    sgl.global_config.enable_parallel_execution = False
    try:
        state = within(10, prog.run, backend=ScriptedBackend(respond=respond))
    finally:
        sgl.global_config.enable_parallel_execution = True
    assert state["g"] == ["x", "x", "x"] and max(overlaps) == 1
    assert len(set(threads)) == 1 and len(threads) == 4  # all in the body's thread (within's)
    barrier = threading.Barrier(3, timeout=10)  # passes only if the three branches generate at once

    def meet(prompt, params):
        if prompt.endswith(":"):
            barrier.wait()
        return "x"

    assert within(20, lambda: prog.run(backend=ScriptedBackend(respond=meet))["last"]) == "x"


def test_dropping_a_state_leaves_its_branches_usable(backend):
    """A tree search keeps only the current leaves: the states above them are dropped (garbage
    collected) while their branches are still appended to. Those branches must keep working; they
    end when the program returns."""
    @sgl.function
    def tree(s):
        leaves = [s]
        for level in range(3):
            next_leaves = []
            for leaf in leaves:
                leaf += f" L{level}"
                next_leaves += leaf.fork(2)
            leaves = next_leaves  # drops the previous level's states
        for leaf in leaves:
            leaf += sgl.gen("x", max_tokens=1)
        return leaves

    state = within(10, tree.run, backend=backend)
    leaves = state.ret_value
    assert len(leaves) == 8 and all(leaf["x"].startswith("<gen") for leaf in leaves)
    assert leaves[-1].text().startswith(" L0 L1 L2<gen")
    executors = [leaf.stream_executor for leaf in leaves]
    within(10, lambda: [e._worker.join() for e in executors])  # the program returned: every branch ended
