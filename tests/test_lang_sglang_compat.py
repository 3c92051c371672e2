"""Programs written for SGLang's frontend run unchanged with `import plait as sgl`.

The programs below are written the way SGLang's own test programs are (module-level
`@sgl.function`s, a default backend, `run`/`run_batch`, the SGLang module paths), here on the
tiny random engine: they check that everything runs and has the right shape, not what a random
model says. Where control flow depends on answers, a scripted backend makes them deterministic.
"""

from __future__ import annotations

import json

import pytest

import plait as sgl
from plait.lang.backend.scripted import ScriptedBackend
from tests.test_lang_engine import tiny_engine


@pytest.fixture(scope="module", autouse=True)
def default_backend(default_tokenizer):
    previous = sgl.global_config.default_backend
    sgl.set_default_backend(tiny_engine(default_tokenizer))
    yield sgl.global_config.default_backend
    sgl.global_config.default_backend = previous


def test_module_paths_sglang_users_import():
    from plait.global_config import global_config
    from plait.lang.backend.base_backend import BaseBackend
    from plait.lang.backend.openai import OpenAI  # noqa: F401
    from plait.lang.backend.runtime_endpoint import Runtime, RuntimeEndpoint  # noqa: F401
    from plait.lang.chat_template import get_chat_template, get_chat_template_by_model_path  # noqa: F401
    from plait.lang.choices import ChoicesDecision, ChoicesSamplingMethod  # noqa: F401
    from plait.lang.global_config import global_config as new_path
    from plait.lang.interpreter import ProgramState, ProgramStateGroup, StreamExecutor  # noqa: F401
    from plait.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR, SglExprList, SglGen, SglSeparateReasoning

    assert global_config is new_path is sgl.global_config
    assert isinstance(sgl.lang.backend.base.as_backend(sgl.global_config.default_backend), BaseBackend)
    for name in ("function", "gen", "gen_int", "gen_string", "select", "image", "video", "system", "user",
                 "assistant", "system_begin", "system_end", "user_begin", "user_end", "assistant_begin",
                 "assistant_end", "separate_reasoning", "set_default_backend", "flush_cache", "get_server_info",
                 "Runtime", "RuntimeEndpoint", "Engine", "OpenAI", "token_length_normalized",
                 "greedy_token_selection", "unconditional_likelihood_normalized", "global_config"):
        assert hasattr(sgl, name), name
    expr = SglGen("a") + "text"
    assert isinstance(expr, SglExprList) and isinstance(SglSeparateReasoning("qwen3", SglGen("a")).name, str)
    assert all(isinstance(r, str) for r in (REGEX_INT, REGEX_FLOAT, REGEX_BOOL, REGEX_STR))


@sgl.function
def few_shot_qa(s, question):
    s += "The following are questions with answers.\n\n"
    s += "Q: What is the capital of France?\nA: Paris\n\n"
    s += "Q: What is the capital of Germany?\nA: Berlin\n\n"
    s += "Q: " + question + "\n"
    s += "A:" + sgl.gen("answer", stop="\n", temperature=0)


def test_few_shot_qa():
    state = few_shot_qa.run(question="What is the capital of the United States?")
    assert isinstance(state["answer"], str) and "\n" not in state["answer"]
    assert state.text().endswith("A:" + state["answer"])


@sgl.function
def answer_mt_bench(s, question_1, question_2):
    s += sgl.system()
    s += sgl.user(question_1)
    s += sgl.assistant(sgl.gen("answer_1"))
    s += sgl.user(question_2)
    s += sgl.assistant(sgl.gen("answer_2"))


def test_mt_bench():
    state = answer_mt_bench.run(question_1="Name a colour.", question_2="Another one?", temperature=0,
                                max_new_tokens=8)
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant", "user", "assistant"]
    assert state.messages()[2]["content"] == state["answer_1"].lstrip()


@sgl.function
def true_or_false(s, question):
    s += "Determine whether the statement below is True, False, or Unknown.\n"
    s += "Statement: " + question + "\n"
    s += "Answer:" + sgl.select("answer", choices=["True", "False", "Unknown"])


def test_select_and_hellaswag_style_batch():
    states = true_or_false.run_batch([{"question": "The sky is blue."}, {"question": "2 + 2 = 5."}],
                                     num_threads=2)
    assert all(st["answer"] in ("True", "False", "Unknown") for st in states)
    assert "normalized_prompt_logprobs" in states[0].get_meta_info("answer")

    @sgl.function
    def few_shot_hellaswag(s, question, choices):
        s += "Continue the sentence.\n" + question
        s += sgl.select("answer", choices=choices)

    items = [{"question": "He opened the door and", "choices": [" walked in.", " ate the moon."]}] * 4
    a = [st["answer"] for st in few_shot_hellaswag.run_batch(items, num_threads=2)]
    b = [st["answer"] for st in few_shot_hellaswag.run_batch(items, num_threads=2, generator_style=True)]
    assert a == b and len(set(a)) == 1


@sgl.function
def decode_int(s):
    s += "The number of hours in a day is " + sgl.gen_int("hours") + "\n"
    s += "The number of days in a year is " + sgl.gen_int("days") + "\n"


@sgl.function
def dtype_gen(s):
    s += "Q: What is the full name of DNS?\n"
    s += "A: The full nams is " + sgl.gen("str_res", dtype=str, stop="\n") + "\n"
    s += "Q: Which year was DNS invented?\n"
    s += "A: " + sgl.gen("int_res", dtype=int) + "\n"
    s += "Q: What is the value of pi?\n"
    s += "A: " + sgl.gen("float_res", dtype=float) + "\n"
    s += "Q: Is the sky blue?\n"
    s += "A: " + sgl.gen("bool_res", dtype=bool) + "\n"


def test_decode_int_and_dtypes():
    state = decode_int.run(temperature=0.1, max_new_tokens=4)
    assert isinstance(state["hours"], str) and isinstance(state["days"], str)
    state = dtype_gen.run(max_new_tokens=4)
    assert all(isinstance(state[k], str) for k in ("str_res", "int_res", "float_res", "bool_res"))


@sgl.function
def decode_json(s):
    from plait.lang.ir import REGEX_FLOAT, REGEX_INT, REGEX_STR

    s += "Generate a JSON object to describe the basic city information of Paris.\n"
    with s.var_scope("json_output"):
        s += "{\n"
        s += '  "name": ' + sgl.gen(regex=REGEX_STR, max_tokens=8) + ",\n"
        s += '  "population": ' + sgl.gen(regex=REGEX_INT, stop=[" ", "\n"], max_tokens=4) + ",\n"
        s += '  "area": ' + sgl.gen(regex=REGEX_FLOAT, max_tokens=4) + "\n"
        s += "}"


def test_decode_json_regex_var_scope():
    state = decode_json.run(temperature=0)
    assert state["json_output"].startswith('{\n  "name": ') and state["json_output"].endswith("\n}")

    @sgl.function
    def json_schema_prog(s):
        s += "City:" + sgl.gen("json_output", max_tokens=8,
                               json_schema=json.dumps({"type": "object", "properties": {"name": {"type": "string"}}}))

    assert isinstance(json_schema_prog.run()["json_output"], str)


@sgl.function
def expert_answer(s, question):
    s += "Question: " + question + "\n"
    forks = s.fork(2)
    forks[0] += "Expert 1 says:" + sgl.gen("expert", max_tokens=8)
    forks[1] += "Expert 2 says:" + sgl.gen("expert", max_tokens=8)
    forks.join()
    s += "Combined: " + forks[0]["expert"] + " / " + forks[1]["expert"] + "\nFinal:" + sgl.gen("final", max_tokens=8)


def test_expert_answer_fork():
    state = expert_answer.run(question="Why is the sky blue?", temperature=0)
    assert len(state["expert"]) == 2 and isinstance(state["final"], str)


@sgl.function
def parallel_decoding(s, topic):
    s += "Act as a helpful assistant.\n"
    s += "USER: Give some tips for " + topic + ".\n"
    s += "ASSISTANT: Okay. Here are two concise tips, each under 8 words:\n"
    s += "1." + sgl.gen("tip_1", max_tokens=8, stop=["\n"]) + "\n"
    s += "2." + sgl.gen("tip_2", max_tokens=8, stop=["\n"]) + "\n"
    forks = s.fork(2)
    for i in range(2):
        forks[i] += "Now, I expand tip " + str(i + 1) + " into a paragraph:\n"
        forks[i] += sgl.gen("detailed_tip", max_tokens=8, stop=["\n\n"])
    s += "Summary of the expanded tips:\n"
    for i in range(2):
        s += str(i + 1) + "." + forks[i]["detailed_tip"] + "\n"
    s += "In summary," + sgl.gen("summary", max_tokens=8)


@sgl.function
def parallel_encoding(s, question, context_0, context_1):
    s += "USER: I will ask a question based on some statements.\n"
    forks = s.fork(2)
    forks[0] += "Statement 1: " + context_0 + "\n"
    forks[1] += "Statement 2: " + context_1 + "\n"
    forks.join(mode="concate_and_append")
    s += "Now, please answer: " + question + "\nASSISTANT:" + sgl.gen("answer", max_tokens=8)


def test_parallel_decoding_and_encoding():
    state = parallel_decoding.run(topic="staying healthy", temperature=0)
    assert "Summary of the expanded tips:\n1." in state.text() and isinstance(state["summary"], str)
    state = parallel_encoding.run(question="Who is Alice?", context_0="Alice is a cat.", context_1="Bob is a dog.")
    assert "Statement 1: Alice is a cat.\nStatement 2: Bob is a dog.\nNow, please answer" in state.text()


@sgl.function
def tool_use(s, lhs, rhs):
    s += "Please perform computations using a calculator. You can use calculate(expression) to get the results.\n"
    s += "For example,\ncompute 1 + 2 = calculate(1 + 2) = 3.\n"
    s += "compute " + str(lhs) + " * " + str(rhs) + " = calculate("
    s += sgl.gen("expression", stop=")", max_tokens=8)
    s += ") = "
    if s["expression"].strip() == f"{lhs} * {rhs}":
        s += str(lhs * rhs)
    s += "\n" + sgl.select("tool", choices=["calculator", "search engine"])


@sgl.function
def react(s, question):
    s += "Answer the question by thinking, then acting with Search[entity] or Finish[answer].\n"
    s += "Question: " + question + "\n"
    for i in range(1, 4):
        s += f"Thought {i}:" + sgl.gen(f"thought_{i}", stop="\n")
        s += f"\nAction {i}: " + sgl.select(f"action_{i}", choices=["Search", "Finish"])
        if s[f"action_{i}"] == "Search":
            s += "[" + sgl.gen(f"entity_{i}", stop="]") + "]\n"
            s += f"Observation {i}: found something about " + s[f"entity_{i}"] + "\n"
        else:
            s += "[" + sgl.gen("answer", stop="]") + "]\n"
            break


def test_tool_use_and_react_control_flow():
    state = tool_use(lhs=257, rhs=983, temperature=0)  # calling the program runs it
    assert state["tool"] in ("calculator", "search engine") and state.text().count("calculate(") == 3

    answers = iter([" I should look it up", "Apollo 11", " Now I know", "1969"])
    scores = {"Search": [-0.1], "Finish": [-2.0]}
    backend = ScriptedBackend(respond=lambda prompt, params: next(answers),
                              score=lambda prompt, choice: scores[choice] if "Observation" not in prompt
                              else [-scores[choice][0]])
    state = react.run(question="When did humans land on the moon?", backend=backend)
    assert state["action_1"] == "Search" and state["entity_1"] == "Apollo 11"
    assert state["action_2"] == "Finish" and state["answer"] == "1969" and "action_3" not in state


def test_stream_and_min_tokens():
    @sgl.function
    def story(s):
        s += "Once upon a time" + sgl.gen("story", max_tokens=8, ignore_eos=True)

    state = story.run(stream=True, temperature=0)
    chunks = list(state.text_iter())
    assert "".join(chunks) == state.text() and state.text().startswith("Once upon a time")
    assert "".join(story.run(stream=True, temperature=0).text_iter(var_name="story")) == state["story"]

    @sgl.function
    def min_tokens(s):
        s += "Hello" + sgl.gen("answer", min_tokens=5, max_tokens=6)

    assert min_tokens.run(temperature=0).get_meta_info("answer")["completion_tokens"] >= 5


def test_chat_blocks_and_separate_reasoning_shape():
    @sgl.function
    def chat(s, question):
        with s.system():
            s += "You are a helpful assistant."
        with s.user():
            s += question
        with s.assistant():
            s += sgl.separate_reasoning(sgl.gen("answer", max_tokens=6), model_type="qwen3")

    state = chat.run(question="Hi")
    assert "answer_reasoning_content" in state and state.messages()[0]["content"] == "You are a helpful assistant."
