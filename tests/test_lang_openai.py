"""The OpenAI backend against a fake client object: request mapping, token usage, select by echoed
logprobs, streaming, and API speculative execution (completion and chat) saving calls and tokens."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

import plait as sgl
from plait.lang.backend.openai import OpenAI
from plait.lang.interpreter import ProgramError
from plait.lang.spec import SpecGen, match_spec_pattern

HEADER = "Construct a character within the following format:\nName: Steve Jobs.\nBirthday: February 24, 1955.\n"
DOCUMENT = HEADER + "Name: Bill Gates\nBirthday: October 28, 1955\nJob: Microsoft founder\n\nName: Ada"


def count_tokens(text: str) -> int:
    return max(1, len(text) // 4)


class FakeCompletions:
    """A "model" that knows one document: it continues any prefix of DOCUMENT."""

    def __init__(self, owner):
        self.owner = owner

    def create(self, *, model, prompt, max_tokens=16, stop=None, stream=False, echo=False, logprobs=None, **kw):
        self.owner.calls.append({"model": model, "prompt": prompt, "max_tokens": max_tokens, "stop": stop,
                                 "echo": echo, **kw})
        if echo:
            return self.owner.echo(prompt)
        assert DOCUMENT.startswith(prompt), f"unexpected prompt {prompt!r}"
        text = DOCUMENT[len(prompt):][: 4 * max_tokens]
        cuts = [text.find(s) for s in (stop or []) if text.find(s) >= 0]
        text = text[: min(cuts)] if cuts else text
        usage = NS(prompt_tokens=count_tokens(prompt), completion_tokens=count_tokens(text))
        if stream:
            return iter([NS(choices=[NS(text=text[i:i + 3])], usage=None) for i in range(0, len(text), 3)]
                        + [NS(choices=[], usage=usage)])
        return NS(choices=[NS(text=text, index=0, finish_reason="stop")], usage=usage)


class FakeChatCompletions:
    def __init__(self, owner):
        self.owner = owner

    def create(self, *, model, messages, stream=False, **kw):
        self.owner.calls.append({"model": model, "messages": [dict(m) for m in messages], **kw})
        text = self.owner.chat_answers.pop(0) if self.owner.chat_answers else "Hello there!"
        prompt_tokens = sum(count_tokens(m["content"]) for m in messages)
        usage = NS(prompt_tokens=prompt_tokens, completion_tokens=count_tokens(text))
        if stream:
            return iter([NS(choices=[NS(delta=NS(content=text[i:i + 4]))], usage=None) for i in range(0, len(text), 4)]
                        + [NS(choices=[], usage=usage)])
        return NS(choices=[NS(message=NS(content=text), index=0, finish_reason="stop")], usage=usage)


class FakeClient:
    def __init__(self, chat_answers=None, choice_logprob=None):
        self.calls: list[dict] = []
        self.chat_answers = list(chat_answers or [])
        self.choice_logprob = choice_logprob or {}
        self.completions = FakeCompletions(self)
        self.chat = NS(completions=FakeChatCompletions(self))

    def echo(self, prompts):
        """Echo each prompt as word tokens; a word's logprob comes from `choice_logprob`, else -1."""
        choices = []
        for i, prompt in enumerate(prompts):
            tokens, offsets, pos = [], [], 0
            for word in prompt.split(" "):
                tok = word if pos == 0 else " " + word
                tokens.append(tok)
                offsets.append(pos)
                pos += len(tok)
            values = [None] + [self.choice_logprob.get(t, -1.0) for t in tokens[1:]]
            tokens.append("!")  # the one generated token (max_tokens=1), past the prompt
            offsets.append(pos)
            values.append(-0.01)
            choices.append(NS(index=i, logprobs=NS(tokens=tokens, token_logprobs=values, text_offset=offsets)))
        return NS(choices=choices, usage=NS(prompt_tokens=10, completion_tokens=1))


@sgl.function
def character(s):
    s += HEADER
    s += "Name:" + sgl.gen("name", max_tokens=16, stop="\n")
    s += "\nBirthday:" + sgl.gen("birthday", max_tokens=16, stop="\n")
    s += "\nJob:" + sgl.gen("job", max_tokens=16, stop="\n") + "\n"


def test_completion_speculative_execution_saves_calls_and_tokens():
    plain_client, spec_client = FakeClient(), FakeClient()
    plain = OpenAI("gpt-3.5-turbo-instruct", client=plain_client)
    spec = OpenAI("gpt-3.5-turbo-instruct", client=spec_client)
    assert not plain.is_chat_model

    a = character.run(backend=plain)
    speculative = sgl.function(character.func, num_api_spec_tokens=64)
    b = speculative.run(backend=spec)
    for name, value in (("name", " Bill Gates"), ("birthday", " October 28, 1955"), ("job", " Microsoft founder")):
        assert a[name] == b[name] == value
    assert a.text() == b.text()
    assert len(plain_client.calls) == 3 and len(spec_client.calls) == 1
    assert spec_client.calls[0]["stop"] is None and spec_client.calls[0]["max_tokens"] == 64
    assert spec.token_usage.prompt_tokens < plain.token_usage.prompt_tokens
    spec.token_usage.reset()
    assert spec.token_usage.prompt_tokens == 0


def test_speculation_is_dropped_when_the_program_diverges():
    client = FakeClient()

    @sgl.function(num_api_spec_tokens=64)
    def diverging(s):
        s += HEADER + "Name:" + sgl.gen("name", stop="\n")
        s += "\nBirthday:" + sgl.gen("birthday", stop="\n")

    state = diverging.run(backend=OpenAI("gpt-3.5-turbo-instruct", client=client))
    assert state["birthday"] == " October 28, 1955" and len(client.calls) == 1
    client.calls.clear()

    @sgl.function(num_api_spec_tokens=64)
    def other(s):
        s += HEADER + "Name:" + sgl.gen("name", stop="\n")
        s += "\nBirthday: October 28, 1955\nJob:" + sgl.gen("job", stop="\n")  # matches the surplus: no call

    assert other.run(backend=OpenAI("gpt-3.5-turbo-instruct", client=client))["job"] == " Microsoft founder"
    assert len(client.calls) == 1


def test_chat_speculative_execution_one_call_per_turn():
    client = FakeClient(chat_answers=["Garbage that does not fit",
                                      "Name: Bill Gates\nBirthday: October 28, 1955\nJob: Microsoft founder"])
    backend = OpenAI("gpt-4o-mini", client=client)
    assert backend.is_chat_model

    @sgl.function(num_api_spec_tokens=128)
    def chat_character(s):
        s += sgl.system("You are a helpful assistant.")
        s += sgl.user("Construct a character: Name, Birthday, Job, one per line.")
        s += sgl.assistant("Name:" + sgl.gen("name", stop="\n") + "\nBirthday:" + sgl.gen("birthday", stop="\n")
                           + "\nJob:" + sgl.gen("job", stop="\n"))

    state = chat_character.run(backend=backend)
    expected = (" Bill Gates", " October 28, 1955", " Microsoft founder")
    assert (state["name"], state["birthday"], state["job"]) == expected
    assert len(client.calls) == 2  # the first answer did not fit the pattern: one retry
    assert client.calls[0]["max_tokens"] == 128 and client.calls[0]["stop"] is None
    assert [m["role"] for m in client.calls[0]["messages"]] == ["system", "user"]
    assert state.messages()[-1]["content"] == "Name: Bill Gates\nBirthday: October 28, 1955\nJob: Microsoft founder"


def test_chat_gen_must_follow_assistant_without_speculation():
    backend = OpenAI("gpt-4o-mini", client=FakeClient(chat_answers=["Paris"]))

    @sgl.function
    def ok(s):
        s += sgl.user("Capital of France?")
        s += sgl.assistant(sgl.gen("answer", max_tokens=5))

    assert ok.run(backend=backend)["answer"] == "Paris"

    @sgl.function
    def bad(s):
        s += sgl.user("Capital of France?")
        s += sgl.assistant("The answer is " + sgl.gen("answer"))

    with pytest.raises(ProgramError, match="right after sgl.assistant"):
        bad.run(backend=backend).text()


def test_match_spec_pattern():
    pieces = ["Name:", SpecGen("name", ["\n"], None), "\nAge:", SpecGen("age", ["\n"], None)]
    assert match_spec_pattern(pieces, "Name: Ada\nAge: 36\nextra") == [" Ada", " 36"]
    assert match_spec_pattern(pieces, "  Name: Ada\n Age: 36") == [" Ada", " 36"]  # whitespace forgiven
    assert match_spec_pattern(pieces, "Who: Ada") is None
    no_stop = ["A=", SpecGen("a", [], None), ";B=", SpecGen("b", [], None)]
    assert match_spec_pattern(no_stop, "A=1;B=2") == ["1", "2"]


def test_request_mapping_and_extensions():
    client = FakeClient(chat_answers=["{}"])
    backend = OpenAI("gpt-4o-mini", client=client, sglang_extensions=True)

    @sgl.function
    def prog(s):
        s += sgl.user("Give JSON")
        s += sgl.assistant(sgl.gen("j", max_tokens=20, temperature=0.3, top_k=5, min_tokens=2,
                                   json_schema='{"type": "object"}'))

    prog.run(backend=backend).sync()
    call = client.calls[0]
    assert call["max_tokens"] == 20 and call["temperature"] == 0.3 and call["stop"] is None
    assert call["extra_body"] == {"top_k": 5, "min_tokens": 2}
    assert call["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert "extra_body" not in OpenAI("gpt-4o-mini", client=client)._sampling_kwargs(
        sgl.lang.params.GenParams().replace(top_k=5))


def test_completion_select_by_echoed_logprobs():
    client = FakeClient(choice_logprob={" yes": -0.2, " no": -2.0, " perhaps": -0.5})
    backend = OpenAI("gpt-3.5-turbo-instruct", client=client)

    @sgl.function
    def prog(s):
        s += "Is the sky blue? Answer:" + sgl.select("answer", choices=["yes", "no", "perhaps"])

    # Choices are appended without a space here, so the word tokens " Answer:yes" etc. carry them.
    state = prog.run(backend=backend)
    assert state["answer"] in ("yes", "no", "perhaps")

    @sgl.function
    def spaced(s):
        s += "Is the sky blue? Answer:" + sgl.select("answer", choices=[" yes", " no", " perhaps"])

    state = spaced.run(backend=backend)
    assert state["answer"] == " yes"
    meta = state.get_meta_info("answer")
    assert meta["input_token_logprobs"][1] == [[-2.0, None, " no"]]  # only the choice's own tokens
    assert client.calls[-1]["echo"] is True


def test_streaming_through_openai():
    client = FakeClient(chat_answers=["Streaming answer here"])
    backend = OpenAI("gpt-4o-mini", client=client)

    @sgl.function
    def prog(s):
        s += sgl.user("Say something")
        s += sgl.assistant(sgl.gen("a"))

    state = prog.run(backend=backend, stream=True)
    assert "".join(state.text_iter("a")) == "Streaming answer here"
    assert backend.token_usage.completion_tokens == count_tokens("Streaming answer here")
    with pytest.raises(ValueError):
        sgl.function(prog.func, num_api_spec_tokens=8).run(backend=backend, stream=True)


def test_token_usage_adds_cached_tokens_when_reported():
    from plait.lang.backend.openai import TokenUsage

    usage = TokenUsage()
    usage.add(NS(prompt_tokens=10, completion_tokens=2))  # a server that does not report them
    assert usage.cached_tokens is None
    usage.add(NS(prompt_tokens=30, completion_tokens=1, prompt_tokens_details=NS(cached_tokens=24)))
    usage.add(NS(prompt_tokens=5, completion_tokens=1, prompt_tokens_details=None))
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (45, 4, 24)
    usage.reset()
    assert usage.cached_tokens is None and usage.prompt_tokens == 0
