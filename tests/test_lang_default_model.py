"""The frontend language end to end against one server on the default model (SmolLM2-135M-Instruct).

The server is started by `plait.Runtime()` (the frontend's own launcher, no model path: the
default model); programs reach it through `plait.RuntimeEndpoint` on its URL, and one test uses
the `Runtime` itself as the default backend. Every reference is computed from `/generate` called
directly over HTTP: greedy continuations, prompt logprobs for `select`'s three choice methods, and
prompt lengths for the cache hits the frontend hints must produce. Greedy decoding throughout, so
every comparison is exact; generations are kept short (one decode step is slow on 2 cores).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from typing import Any

import jsonschema
import pytest

import plait as sgl
from plait.lang.ir import REGEX_FLOAT, REGEX_INT, REGEX_STR
from tests.test_server_utils import free_port, post

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0}
COUNT = "Count: 1, 2, 3, 4, 5, 6, 7,"


@pytest.fixture(scope="module")
def runtime():
    # float32: in bfloat16 a logprob moves by up to ~1% with what the cache holds and the batch
    # shape, and the references below are exact comparisons.
    rt = sgl.Runtime(dtype="float32", max_total_tokens=8192, port=free_port(), launch_timeout=240)
    try:
        yield rt
    finally:
        rt.shutdown()
    assert rt.process.returncode == 0, rt.log_tail()
    assert not os.path.exists(rt._log.name)  # a clean exit leaves no log file behind


@pytest.fixture(scope="module")
def backend(runtime):
    return sgl.RuntimeEndpoint(runtime.url, timeout=120)


def generate(runtime, body: dict[str, Any]) -> Any:
    status, out = post(runtime.url + "/generate", body, timeout=120)
    assert status == 200, out
    return out


def greedy_reference(runtime, prompt: str, max_new_tokens: int) -> tuple[str, list[list[Any]]]:
    """The greedy continuation of `prompt` and its `[logprob, id, text]` entries."""
    out = generate(runtime, {"text": prompt, "sampling_params": {"max_new_tokens": max_new_tokens, **GREEDY},
                             "return_logprob": True, "return_text_in_logprobs": True})
    return out["text"], out["meta_info"]["output_token_logprobs"]


def prompt_tokens(runtime, text: str) -> int:
    return generate(runtime, {"text": text, "sampling_params": {"max_new_tokens": 0}})["meta_info"]["prompt_tokens"]


# ---- gen: lengths and stops -------------------------------------------------------------------

def test_gen_max_tokens_stop_strings_and_stop_token_ids(runtime, backend):
    reference, entries = greedy_reference(runtime, COUNT, 10)
    assert reference.startswith(" 8, 9, 10"), reference
    assert "".join(e[2] for e in entries) == reference

    @sgl.function
    def count(s, **gen_args):
        s += COUNT + sgl.gen("n", **gen_args)
        s += "|"

    # max_tokens: exactly that many tokens, the greedy continuation's first ones.
    state = count.run(max_tokens=5, backend=backend, **GREEDY)
    meta = state.get_meta_info("n")
    assert meta["completion_tokens"] == 5 and meta["finish_reason"]["type"] == "length"
    assert state["n"] == "".join(e[2] for e in entries[:5])

    # A stop string: the value ends right before it, and the transcript goes on from there.
    state = count.run(max_tokens=10, stop=["10", "never"], backend=backend, **GREEDY)
    assert state["n"] == reference[: reference.index("10")] and "10" not in state["n"]
    assert state.get_meta_info("n")["finish_reason"] == {"type": "stop", "matched": "10"}
    assert state.text() == COUNT + state["n"] + "|"

    # A stop token id (the one that writes "9"): the value is the text of the tokens before it.
    nine = next(i for i, e in enumerate(entries) if e[2] == "9")
    state = count.run(max_tokens=10, stop_token_ids=[entries[nine][1]], backend=backend, **GREEDY)
    assert state["n"] == "".join(e[2] for e in entries[:nine])
    assert state.get_meta_info("n")["finish_reason"] == {"type": "stop", "matched": entries[nine][1]}


def test_gen_min_tokens_outlasts_the_end_of_turn(backend):
    @sgl.function
    def ask(s, **gen_args):
        s += sgl.user("What is the capital of France?")
        s += sgl.assistant(sgl.gen("a", max_tokens=24, **gen_args))

    natural = ask.run(backend=backend, **GREEDY)
    meta = natural.get_meta_info("a")
    assert meta["finish_reason"]["type"] == "stop"
    short = meta["completion_tokens"]
    assert short < 16
    forced = ask.run(min_tokens=short + 4, backend=backend, **GREEDY)
    assert forced.get_meta_info("a")["completion_tokens"] >= short + 4
    assert forced["a"].startswith(natural["a"])


# ---- gen: constrained outputs -----------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_gen_dtypes_regex_json_schema_and_choices(runtime, backend):
    reference, _ = greedy_reference(runtime, COUNT, 3)
    choices = [" apple", " banana", " cherry"]

    @sgl.function
    def typed(s):
        s += COUNT + " " + sgl.gen_int("i") + "\n"
        s += "Pi is approximately " + sgl.gen("f", dtype=float, max_tokens=8) + "\n"
        s += "Is the sky blue? Answer True or False: " + sgl.gen("b", dtype=bool) + "\n"
        s += "Is fire cold? Answer True or False: " + sgl.gen("b2", dtype="bool") + "\n"
        s += "The capital of France, in quotes: " + sgl.gen_string("q", max_tokens=10) + "\n"
        s += "Phone: " + sgl.gen("phone", regex=r"[0-9]{3}-[0-9]{4}", max_tokens=12) + "\n"
        s += "A person as JSON: " + sgl.gen("person", json_schema=json.dumps(PERSON), max_tokens=40) + "\n"
        s += "The best fruit is" + sgl.gen("fruit", choices=choices)

    state = typed.run(backend=backend, max_new_tokens=16, **GREEDY)
    # The integer is the number the unconstrained model writes next.
    assert re.fullmatch(REGEX_INT, state["i"]) and int(state["i"]) == int(reference.split(",")[0]), state["i"]
    assert re.fullmatch(REGEX_FLOAT, state["f"]), state["f"]
    float(state["f"])  # parses
    assert state["b"] == "True" and state["b2"] in ("True", "False")
    assert re.fullmatch(REGEX_STR, state["q"]), state["q"]
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", state["phone"]), state["phone"]
    jsonschema.validate(json.loads(state["person"]), PERSON)
    # gen(choices=...) is a select: the value is a choice, the one with the best mean logprob.
    assert state["fruit"] in choices
    scores = state.get_meta_info("fruit")["normalized_prompt_logprobs"]
    assert state["fruit"] == choices[max(range(3), key=scores.__getitem__)]
    # Each value sits in the transcript where its gen was.
    expected = (f"{COUNT} {state['i']}\nPi is approximately {state['f']}\n"
                f"Is the sky blue? Answer True or False: {state['b']}\n"
                f"Is fire cold? Answer True or False: {state['b2']}\n"
                f"The capital of France, in quotes: {state['q']}\nPhone: {state['phone']}\n"
                f"A person as JSON: {state['person']}\nThe best fruit is{state['fruit']}")
    assert state.text() == expected


def test_gen_return_logprob_matches_generate(runtime, backend):
    reference, entries = greedy_reference(runtime, COUNT, 6)

    @sgl.function
    def count(s):
        s += COUNT + sgl.gen("n", max_tokens=6, return_logprob=True, top_logprobs_num=3,
                             return_text_in_logprobs=True)

    state = count.run(backend=backend, **GREEDY)
    meta = state.get_meta_info("n")
    assert state["n"] == reference
    got = meta["output_token_logprobs"]
    assert [e[1:] for e in got] == [e[1:] for e in entries]
    assert [e[0] for e in got] == pytest.approx([e[0] for e in entries], abs=1e-3)
    # Greedy: every chosen token is the top-1 alternative.
    for chosen, top in zip(got, meta["output_top_logprobs"], strict=True):
        assert len(top) == 3 and top[0][1] == chosen[1]
        assert chosen[0] == pytest.approx(max(t[0] for t in top), abs=1e-5)


# ---- select: the three choice methods against logprobs from /generate -------------------------

def reference_choice_logprobs(runtime, prompt: str, choices: list[str]) -> tuple[list, list]:
    """Per choice: the logprob entries of its own tokens after `prompt`, and the same tokens
    scored with no prompt. Every position is scored afresh (logprob_start_len 0: nothing comes
    from the cache); a choice's tokens are those past the prompt's own, which must be unchanged
    (no merge with the choice)."""
    def score(body: dict[str, Any]) -> list[list[list[Any]]]:
        outs = generate(runtime, {**body, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                                  "return_text_in_logprobs": True, "logprob_start_len": 0})
        return [out["meta_info"]["input_token_logprobs"] for out in outs]

    prompt_ids = [e[1] for e in score({"text": [prompt]})[0]]
    conditional = []
    for full in score({"text": [prompt + c for c in choices]}):
        assert [e[1] for e in full[: len(prompt_ids)]] == prompt_ids, "the choice merged with the prompt"
        conditional.append(full[len(prompt_ids):])
    unconditional = score({"input_ids": [[e[1] for e in lps] for lps in conditional]})
    return conditional, unconditional


def argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def test_select_agrees_with_argmax_over_generate_logprobs(runtime, backend):
    prompt = "Question: Which city is the capital of France?\nAnswer:"
    choices = [" Paris", " London", " the city of Berlin", " Rome, Italy"]
    conditional, unconditional = reference_choice_logprobs(runtime, prompt, choices)
    values = [[e[0] for e in lps] for lps in conditional]
    uncond_values = [[0.0 if e[0] is None else e[0] for e in lps] for lps in unconditional]
    assert unconditional[0][0][0] is None  # the first token of a sequence has no logprob

    # token_length_normalized: mean logprob of the choice's tokens.
    normalized = [mean(v) for v in values]
    # greedy_token_selection: a choices x longest matrix (short rows padded with their mean),
    # narrowed column by column to the rows at the column's maximum.
    width = max(len(v) for v in values)
    matrix = [v + [mean(v)] * (width - len(v)) for v in values]
    rows = list(range(len(choices)))
    for col in range(width):
        rows = [i for i in rows if matrix[i][col] >= max(matrix[j][col] for j in rows) - 1e-9]
        if len(rows) == 1:
            break
    # unconditional_likelihood_normalized: mean of (conditional - unconditional).
    gain = [mean([c - u for c, u in zip(v, uv, strict=True)]) for v, uv in zip(values, uncond_values)]

    @sgl.function
    def pick(s, method):
        s += prompt + sgl.select("city", choices=choices, choices_method=method)

    tln = pick.run(method=sgl.token_length_normalized, backend=backend)
    meta = tln.get_meta_info("city")
    assert meta["normalized_prompt_logprobs"] == pytest.approx(normalized, abs=1e-3)
    assert [[e[1] for e in lps] for lps in meta["input_token_logprobs"]] == [[e[1] for e in lps]
                                                                             for lps in conditional]
    assert tln["city"] == choices[argmax(normalized)]
    assert tln.text() == prompt + tln["city"]

    greedy = pick.run(method=sgl.greedy_token_selection, backend=backend)
    assert [r for row in greedy.get_meta_info("city")["greedy_logprob_matrix"] for r in row] == pytest.approx(
        [r for row in matrix for r in row], abs=1e-3)
    assert greedy["city"] == choices[rows[0]]

    uln = pick.run(method=sgl.unconditional_likelihood_normalized, backend=backend)
    umeta = uln.get_meta_info("city")
    assert umeta["normalized_unconditional_prompt_logprobs"] == pytest.approx(gain, abs=1e-3)
    assert [[e[1] for e in lps] for lps in umeta["unconditional_token_logprobs"]] == [
        [e[1] for e in lps] for lps in unconditional]
    assert uln["city"] == choices[argmax(gain)]


def test_select_scores_every_token_of_the_choice(runtime, backend):
    """Regression: choices were found by the length of their tokens' texts, and a token holding
    part of a multi-byte character (text "\ufffd") was taken for a whole character, so such a
    choice lost its first tokens from the score."""
    prompt = "My favourite word is"
    choices = [" café", " naïve", " 日本", " 😀 smile"]
    conditional, _ = reference_choice_logprobs(runtime, prompt, choices)
    assert any("\ufffd" in e[2] for lps in conditional for e in lps)  # tokens of partial characters

    @sgl.function
    def pick(s, prompt, choices):
        s += prompt + sgl.select("w", choices=choices)

    meta = pick.run(prompt=prompt, choices=choices, backend=backend).get_meta_info("w")
    assert [[e[1] for e in lps] for lps in meta["input_token_logprobs"]] == [[e[1] for e in lps]
                                                                             for lps in conditional]
    assert meta["normalized_prompt_logprobs"] == pytest.approx([mean([e[0] for e in lps]) for lps in conditional],
                                                               abs=1e-3)
    # A prompt ending in a space: the space merges with the choice's first token ("token
    # healing"), and that merged token is scored as the choice's.
    conditional, _ = reference_choice_logprobs(runtime, "The answer is", [" yes", " no"])
    meta = pick.run(prompt="The answer is ", choices=["yes", "no"], backend=backend).get_meta_info("w")
    assert [[e[1] for e in lps] for lps in meta["input_token_logprobs"]] == [[e[1] for e in lps]
                                                                             for lps in conditional]


def test_choice_tokens_start_where_the_prompt_tokens_end():
    """The same rule on hand-made entries: ids decide, texts do not."""
    from plait.lang.backend.srt import choice_token_logprobs

    tail = [[-1.0, 10, "a"], [-1.0, 11, " b"]]
    plain = tail + [[-2.0, 12, "\ufffd"], [-3.0, 13, "\ufffd"], [-4.0, 14, "\ufffd"]]
    assert choice_token_logprobs(plain, tail) == plain[2:]
    healed = [[-1.0, 10, "a"], [-5.0, 15, " bc"], [-6.0, 16, "d"]]
    assert choice_token_logprobs(healed, tail) == healed[1:]
    assert choice_token_logprobs(plain[:2] + [[-1.0, 20, "x"]], []) == plain[:2] + [[-1.0, 20, "x"]]


# ---- roles, chat and the transcript -----------------------------------------------------------

def test_roles_agree_with_the_chat_endpoint(runtime, backend):
    question = "What is the capital of France?"

    @sgl.function
    def chat(s):
        s.system("You are a concise geography assistant.")
        with s.user():
            s += question
        s += sgl.assistant_begin()
        s += sgl.gen("answer", max_tokens=8)
        s += sgl.assistant_end()
        s += sgl.user_begin() + "And of Italy?" + sgl.user_end()
        s += sgl.assistant(sgl.gen("second", max_tokens=8))

    state = chat.run(backend=backend, **GREEDY)
    messages = state.messages()
    assert messages == [
        {"role": "system", "content": "You are a concise geography assistant."},
        {"role": "user", "content": question},
        {"role": "assistant", "content": state["answer"].lstrip()},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": state["second"].lstrip()},
    ]
    assert state.text().startswith("<|im_start|>system\nYou are a concise geography assistant.<|im_end|>\n"
                                   f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    # The server's own chat template, fed the same conversation, answers the same.
    for upto, name in ((2, "answer"), (4, "second")):
        status, out = post(runtime.url + "/v1/chat/completions", {
            "model": backend.model_info["served_model_name"], "messages": messages[:upto], "max_tokens": 8,
            **GREEDY})
        assert status == 200, out
        assert out["choices"][0]["message"]["content"] == state[name]


def test_fork_join_var_scope_and_variables(runtime, backend):
    @sgl.function
    def prog(s):
        s += "Colours of the rainbow:"
        with s.var_scope("first"):
            s += " red," + sgl.gen("c1", max_tokens=2, stop=",")
        s += ","
        # Reading a variable inside the program waits for it and steers the program.
        s["upper"] = s["c1"].strip().upper()
        s += " (" + s["upper"] + ")"
        forks = s.fork(2)
        forks += [" green,", " blue,"]
        forks += sgl.gen("next", max_tokens=3, stop=",")
        forks.join()
        tail = s.fork(2)
        tail += lambda i: f" {i + 1}." + sgl.gen("item", max_tokens=2)
        tail.join("concate_and_append")
        return forks, tail

    state = prog.run(backend=backend, **GREEDY)
    forks, tail = state.ret_value
    assert state["first"] == " red," + state["c1"]
    head = f"Colours of the rainbow:{state['first']}, ({state['upper']})"
    assert state["upper"] == state["c1"].strip().upper() and state["upper"]
    # gather_variable: the parent holds each branch's value, in branch order; each branch's value
    # is the greedy continuation of that branch's own text.
    assert state["next"] == [forks[0]["next"], forks[1]["next"]]
    for branch, colour in zip(forks, [" green,", " blue,"]):
        assert branch.text() == head + colour + branch["next"]
        direct = generate(runtime, {"text": head + colour,
                                    "sampling_params": {"max_new_tokens": 3, "stop": [","], **GREEDY}})
        assert direct["text"] == branch["next"]
    # concate_and_append: each branch's text after the fork is appended to the parent, in order.
    pieces = [f" {i + 1}.{tail[i]['item']}" for i in range(2)]
    assert state.text() == head + "".join(pieces)
    # Writing a variable of a finished state.
    state["note"] = "checked"
    assert state["note"] == "checked" and "note" in state


# ---- run, stream, run_batch -------------------------------------------------------------------

def test_stream_run_batch_and_generator_style(backend):
    @sgl.function
    def say(s, word):
        # long enough that a stream cannot finish before its reader starts, even on a busy machine
        s += "Repeat the word " + word + " three times: " + sgl.gen("x", max_tokens=24, ignore_eos=True)

    words = ["apple", "river", "stone"]
    singles = [say.run(word=w, backend=backend, **GREEDY) for w in words]
    assert all(st["x"] for st in singles)

    stream = say.run(word="apple", stream=True, backend=backend, **GREEDY)
    pieces = list(stream.text_iter("x"))
    assert len(pieces) > 1  # it arrived in pieces
    assert "".join(pieces) == singles[0]["x"] and stream["x"] == singles[0]["x"]
    assert "".join(stream.text_iter()) == stream.text() == singles[0].text()

    async def collect() -> tuple[list[str], Any]:
        st = say.run(word="river", stream=True, backend=backend, **GREEDY)
        chunks = [chunk async for chunk in st.text_async_iter("x", return_meta_data=True)]
        return [c for c, _ in chunks], chunks[-1][1]

    chunks, meta = asyncio.run(collect())
    assert "".join(chunks) == singles[1]["x"] and meta["completion_tokens"] == 24

    batch = say.run_batch([{"word": w} for w in words], backend=backend, num_threads=3, **GREEDY)
    assert [st["x"] for st in batch] == [st["x"] for st in singles]
    generated = say.run_batch([[w] for w in words], backend=backend, generator_style=True, **GREEDY)
    assert [st.text() for st in generated] == [st.text() for st in singles]
    assert say.bind(word="stone").run(backend=backend, **GREEDY).text() == singles[2].text()


def test_separate_reasoning_on_constrained_thinking(backend):
    @sgl.function
    def think(s):
        s += sgl.user("Is water wet? Think, then answer yes or no.")
        s += sgl.assistant(sgl.separate_reasoning(
            sgl.gen("ans", max_tokens=40, regex=r"<think>[a-z ]{2,20}</think>(yes|no)"), model_type="qwen3"))

    state = think.run(backend=backend, **GREEDY)
    assert state["ans"] in ("yes", "no")
    assert re.fullmatch(r"[a-z ]{2,20}", state["ans_reasoning_content"].strip())
    # The thinking left the transcript; the answer stayed.
    assert "<think>" not in state.text()
    assert state.text().endswith(f"<|im_start|>assistant\n{state['ans']}<|im_end|>\n")
    assert state.messages()[-1] == {"role": "assistant", "content": state["ans"]}


# ---- frontend hints as cache hits -------------------------------------------------------------

SHARED = "Here is a long shared context that every branch of the fork reads before it writes.\n" * 4


def test_fork_hint_shows_as_cache_hits(runtime, backend):
    num_prefix = prompt_tokens(runtime, SHARED)
    assert num_prefix >= 64

    @sgl.function
    def prog(s):
        s += SHARED
        forks = s.fork(3)
        forks += lambda i: f"Branch {i}:" + sgl.gen("x", max_tokens=2)
        forks.join()
        return forks

    cached = {}
    try:
        for hint in (True, False):
            sgl.global_config.enable_fork_hint = hint
            assert backend.flush_cache()
            state = prog.run(backend=backend, **GREEDY)
            cached[hint] = [branch.get_meta_info("x")["cached_tokens"] for branch in state.ret_value]
    finally:
        sgl.global_config.enable_fork_hint = True
    # With the hint the prefix is prefilled first: every branch finds it cached. Without it the
    # branches race into an empty cache and the first one admitted finds nothing.
    assert min(cached[True]) >= num_prefix, cached
    assert min(cached[False]) < num_prefix, cached


class Recording(sgl.RuntimeEndpoint):
    """A RuntimeEndpoint that keeps every `/generate` body and answer."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[dict, Any]] = []

    def _generate(self, body: dict[str, Any]) -> Any:
        out = super()._generate(body)
        self.calls.append((body, out))
        return out


def test_select_choices_hit_the_prefilled_prompt(runtime):
    """A select is one batched scoring request (the prompt's length comes from /tokenize, no
    scheduler step); run again, every item finds the prompt cached up to where its logprobs start."""
    backend = Recording(runtime.url, timeout=120)
    prompt = SHARED + "Question: is this context long? Answer:"
    choices = [" yes", " no", " maybe so"]

    @sgl.function
    def pick(s):
        s += prompt + sgl.select("a", choices=choices)

    assert backend.flush_cache()
    state = pick.run(backend=backend)
    assert state["a"] in choices
    ((batch_body, _),) = backend.calls
    num_prompt = prompt_tokens(runtime, prompt)
    assert batch_body["text"] == [prompt] + [prompt + c for c in choices]
    # Logprobs start two tokens early (the prompt's last token may merge with a choice's first).
    assert batch_body["logprob_start_len"] == num_prompt - 2
    assert pick.run(backend=backend)["a"] == state["a"]
    (_, again) = backend.calls[1]
    # Every item reuses the prompt up to where its logprobs start, less the one token whose logits
    # score the first of them.
    assert [r["meta_info"]["cached_tokens"] for r in again] == [num_prompt - 3] * 4

    # The same batch on an empty cache: the choices find little or nothing cached.
    assert backend.flush_cache()
    cold = generate(runtime, batch_body)
    assert min(r["meta_info"]["cached_tokens"] for r in cold) < num_prompt - 3


def test_cache_and_compile_prefetch_the_constant_prefix(runtime, backend):
    instructions = ("You answer questions about numbers with one short word. Here are examples.\n"
                    "Q: What comes after one?\nA: two\nQ: What comes after five?\nA: six\n")

    @sgl.function
    def few_shot(s, question):
        s += instructions
        s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=3, stop="\n")

    num_prefix = prompt_tokens(runtime, instructions)
    questions = [{"question": "What comes after two?"}, {"question": "What comes after seven?"}]

    # No hint: the first run finds nothing cached.
    assert backend.flush_cache()
    cold = few_shot.run(backend=backend, **questions[0], **GREEDY)
    assert cold.get_meta_info("answer")["cached_tokens"] < num_prefix

    # fn.cache(): the traced constant prefix is sent ahead.
    assert backend.flush_cache()
    # The traced constant prefix runs up to the first argument.
    assert few_shot.cache(backend) == instructions + "Q: "
    warm = few_shot.run(backend=backend, **questions[0], **GREEDY)
    assert warm.get_meta_info("answer")["cached_tokens"] >= num_prefix - 1
    assert warm["answer"] == cold["answer"]

    # compile(): the graph names the shared prefix; run_batch prefetches it before the batch.
    compiled = few_shot.compile(backend=backend)
    assert compiled.shared_prefixes() == [instructions + "Q: "]
    assert "gen" in compiled.print_graph().lower()
    assert backend.flush_cache()
    states = compiled.run_batch(questions, num_threads=2, **GREEDY)
    assert all(st.get_meta_info("answer")["cached_tokens"] >= num_prefix - 1 for st in states)
    assert states[0]["answer"] == cold["answer"]


# ---- the Runtime as the default backend -------------------------------------------------------

def test_runtime_as_default_backend(runtime):
    @sgl.function
    def count(s):
        s += COUNT + sgl.gen("n", max_tokens=4)

    previous = sgl.global_config.default_backend
    try:
        sgl.set_default_backend(runtime)
        state = count.run(**GREEDY)  # no backend=: the default, a Runtime unwrapped to its endpoint
        assert state["n"]  # (the server refuses to flush while the request runs)
        assert sgl.flush_cache() is True
        info = sgl.get_server_info()
    finally:
        sgl.global_config.default_backend = previous
    direct = json.loads(runtime.generate(COUNT, {"max_new_tokens": 4, **GREEDY}))
    assert state["n"] == direct["text"] and len(state["n"]) > 0
    assert info["max_total_tokens"] == 8192
    assert runtime.endpoint.get_model_name() == info["model_path"]
