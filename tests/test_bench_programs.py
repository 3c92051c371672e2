"""The paper's workloads (plait.bench.programs): each program on a scripted backend makes exactly
the calls it claims; the suite runs end to end on a tiny model (every workload at the quick size,
both modes, two ablations) and writes its records and figures; the helpers that make engines
comparable (exact lengths, regexes for vLLM and llama-server) do what they say.

No timing is asserted: the figures come from running the suite (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import re

import pytest

import plait as sgl
from plait.bench.programs import WORKLOADS
from plait.bench.programs.gbnf import regex_to_gbnf
from plait.bench.programs.measure import MeasuredBackend
from plait.bench.programs.targets import PeerOpenAI
from plait.bench.programs.workload import SIZES
from plait.lang.backend.scripted import ScriptedBackend
from plait.lang.params import GenOverrides, GenParams


@pytest.fixture
def scripted():
    """A counting wrapper over a scripted backend, also the default backend (sub-programs use it)."""
    saved = sgl.global_config.default_backend
    measured = MeasuredBackend(ScriptedBackend())
    sgl.set_default_backend(measured)
    yield measured
    sgl.global_config.default_backend = saved


@pytest.mark.parametrize("size", ["quick", "cpu", "paper"])
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_each_program_makes_the_calls_it_claims(scripted, name, size):
    workload = WORKLOADS[name]
    shape = workload.shape(size)
    args = workload.make_args(shape, seed=3)
    assert len(args) >= shape.latency_programs >= 1
    for a in args[:3]:  # programs of one run differ (react's trajectories): check several
        scripted.take_counts()
        state = workload.program.run(**a, backend=scripted)
        state.sync()
        assert state.error() is None
        counts = scripted.take_counts()
        claim = workload.structure(shape, a)
        assert {k: counts.get(k, 0) for k in claim._fields} == claim._asdict()
        assert counts["gens"] + counts["selects"] >= 1


def test_the_claims_are_the_papers_shapes():
    s = WORKLOADS["tree_of_thought"].shapes["paper"]
    assert WORKLOADS["tree_of_thought"].structure(s, {}) == (30, 0, 15, 30)  # 2 + 4 + 8 + 16 generations
    judge = WORKLOADS["llm_judge"]
    assert judge.structure(judge.shapes["paper"], {}) == (7, 0, 1, 6)  # six branches, then the merge
    assert WORKLOADS["hellaswag"].structure(None, {}) == (0, 1, 0, 0)
    assert WORKLOADS["skeleton_of_thought"].structure(WORKLOADS["skeleton_of_thought"].shapes["paper"], {}).gens == 10


def test_workloads_share_what_the_paper_shares(scripted):
    """MMLU: questions of a subject share its five-shot block; HellaSwag: one block for all and
    four endings scored on one prompt; tree of thought: every branch's prompt is its own."""
    mmlu = WORKLOADS["mmlu"]
    args = mmlu.make_args(mmlu.shape("cpu"), seed=1)
    blocks = [a["examples"] for a in args]
    assert len(set(blocks)) == mmlu.shape("cpu").subjects and all(blocks.count(b) == 16 for b in blocks)
    assert "Answer: " in blocks[0] and blocks[0].count("\nA. ") == 5
    hs = WORKLOADS["hellaswag"]
    args = hs.make_args(hs.shape("cpu"), seed=1)
    assert len({a["shots"] for a in args}) == 1 and all(len(a["endings"]) == 4 for a in args)
    tot = WORKLOADS["tree_of_thought"]
    shape = tot.shape("cpu")
    backend = scripted.inner
    tot.program.run(**tot.make_args(shape, seed=1)[0], backend=scripted).sync()
    prompts = [p for kind, p, _ in backend.calls if kind == "generate"]
    assert len(prompts) == 30 == len(set(prompts))
    # Seeds give disjoint text: a run never finds an earlier run's prompts cached.
    one, two = (mmlu.make_args(mmlu.shape("cpu"), seed=s)[0]["examples"] for s in (0, 1))
    assert one[100:200] not in two


def test_synthetic_vocabulary():
    """Dummy-weight runs tokenize with a word-level vocabulary of w0, w1, ...: the text must use it."""
    from plait.bench.programs import text

    try:
        text.use_vocabulary("synthetic")
        words = text.words(text.rng_for(0), 40).replace(".", "").split()
        assert len(words) == 40 and all(re.fullmatch(r"w[0-9]+", w) for w in words)
    finally:
        text.use_vocabulary("english")
    assert text.words(text.rng_for(0), 5)[0].isupper()
    with pytest.raises(ValueError):
        text.use_vocabulary("klingon")


def test_exact_lengths_policy():
    measured = MeasuredBackend(ScriptedBackend())
    base = GenParams.program_defaults(GenOverrides.from_kwargs({"temperature": 0.7}))
    plain = base.resolve(GenOverrides.from_kwargs({"max_tokens": 12, "stop": ["\n"]}), extra_stop=["<|im_end|>"])
    out = measured.policy(plain).sampling
    assert (out.max_new_tokens, out.min_new_tokens, out.stop, out.ignore_eos, out.temperature) == (12, 12, [], True, 0)
    regex = base.resolve(GenOverrides.from_kwargs({"max_tokens": 12, "regex": "[0-9]+", "stop": ["\n"]}))
    out = measured.policy(regex).sampling
    assert out.stop == ["\n"] and not out.ignore_eos and out.min_new_tokens == 0 and out.temperature == 0
    natural = MeasuredBackend(ScriptedBackend(), exact_lengths=False).policy(plain).sampling
    assert natural.stop == ["\n", "<|im_end|>"] and not natural.ignore_eos and natural.temperature == 0


def test_regex_to_gbnf():
    assert regex_to_gbnf(r'"[\w ]{1,16}"') == r'root ::= "\"" [a-zA-Z0-9_ ]{1,16} "\""'
    assert regex_to_gbnf(r"-?[0-9]{1,2}\.[0-9]+") == r'root ::= "-"? [0-9]{1,2} "." [0-9]+'
    assert regex_to_gbnf(r"(yes|no)\s*[^a-c]") == r'root ::= (("yes" | "no")) [ \t\n\r\x0B\x0C]* [^a-c]'
    assert regex_to_gbnf(r"^(ab){2}$") == r'root ::= ("ab"){2}'
    with pytest.raises(ValueError):
        regex_to_gbnf(r"(?=a)b")


@pytest.mark.parametrize("server, key, value", [
    ("vllm", "structured_outputs", {"regex": "[0-9]+"}),
    ("llama.cpp", "grammar", "root ::= [0-9]+"),
    ("plait", "regex", "[0-9]+"),
])
def test_peer_openai_spells_regex_for_each_server(server, key, value):
    backend = PeerOpenAI("m", server=server, client=object(), chat_template="chatml")
    params = GenParams().replace(regex="[0-9]+", max_new_tokens=5, ignore_eos=True)
    extra = backend._sampling_kwargs(params)["extra_body"]
    assert extra[key] == value and extra["ignore_eos"] is True
    assert ("regex" in extra) == (key == "regex")


def test_suite_runs_every_workload_on_a_tiny_model(tmp_path, default_tokenizer):
    """`--quick` end to end on a tiny random model: every workload in both modes, then two ablations
    (a fresh engine without the cache, and sequential frontend calls), then tables and figures."""
    pytest.importorskip("matplotlib")
    from plait.bench.programs.__main__ import main
    from tests.test_server_utils import write_tiny_model

    model = write_tiny_model(tmp_path / "tiny", default_tokenizer)
    out = tmp_path / "results.jsonl"
    common = ["--model-path", str(model), "--dtype", "float32", "--max-total-tokens", "16384",
              "--result-file", str(out), "--num-threads", "8"]
    records = main(["--quick", *common])
    assert {(r["workload"], r["mode"]) for r in records} == {(w, m) for w in WORKLOADS for m in ("batch", "latency")}
    for r in records:
        assert r["error"] is None and r["structure_ok"], r
        assert r["prompt_tokens"] > 0 and r["output_tokens"] >= 0 and r["programs_per_s"] > 0
    by = {(r["workload"], r["mode"]): r for r in records}
    assert by[("hellaswag", "batch")]["calls"]["selects"] == 3 and by[("hellaswag", "batch")]["output_tokens"] == 0
    assert by[("json_decode", "batch")]["valid"] is not None
    assert by[("tree_of_thought", "batch")]["calls"]["hints"] >= 3  # one prefix sent per fork
    # Exact lengths: chat answers are as long as asked, whatever the random model writes.
    chat = WORKLOADS["chat_short"]
    asked = sum(sum(a["answer_tokens"]) for a in chat.make_args(chat.shape("quick"), seed=0))
    assert by[("chat_short", "batch")]["output_tokens"] == asked

    ablated = main(["--quick", *common, "--workloads", "tree_of_thought,mmlu", "--modes", "batch",
                    "--ablations", "no-cache,no-parallelism", "--no-warmup"])
    runs = {(r["workload"], r["ablation"]): r for r in ablated}
    assert set(runs) == {(w, a) for w in ("tree_of_thought", "mmlu") for a in ("full", "no-cache", "no-parallelism")}
    assert runs[("tree_of_thought", "no-cache")]["hit_rate"] == 0 < runs[("tree_of_thought", "full")]["hit_rate"]
    assert runs[("tree_of_thought", "no-parallelism")]["structure_ok"]

    assert main(["--quick", *common, "--workloads", "mmlu,chat_long", "--skip-done"]) == []  # all done already

    from plait.bench.programs.__main__ import main as run_main

    figures = tmp_path / "figures"
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(records) + len(ablated)
    run_main(["--plot", str(out), "--plot-dir", str(figures)])
    assert sorted(p.name for p in figures.iterdir()) == [
        "programs_ablations.png", "programs_latency.png", "programs_throughput.png"]


def test_bad_arguments_are_clear_errors(capsys):
    from plait.bench.programs.__main__ import main

    for argv, words in ((["--workloads", "mmlu,nope"], "unknown workload"), (["--ablations", "no-tree"], "no-tree"),
                        (["--backend", "openai", "--ablations", "no-cache"],
                         "no-cache changes the runtime.*--disable-radix-cache.*--server-ablation no-cache"),
                        (["--server-ablation", "fcfs"], "names the setting of a server"),
                        (["--backend", "endpoint", "--server-ablation", "fcfs", "--ablations", "no-hints"],
                         "names the setting of a server"),
                        (["--backend", "endpoint", "--dtype", "float32"], "apply to --backend engine"),
                        (["--modes", "fast"], "--modes")):
        with pytest.raises(SystemExit):
            main(argv)
        assert re.search(words, capsys.readouterr().err)
    assert set(SIZES) == {"quick", "cpu", "paper"}


def test_runtime_ablations_name_their_server_flags():
    from plait.bench.programs.ablations import ABLATIONS

    flags = {name: a.launch_flags for name, a in ABLATIONS.items() if a.engine}
    assert flags == {"no-cache": "--disable-radix-cache", "flat-cache": "--prefix-cache flat",
                     "fcfs": "--schedule-policy fcfs", "random": "--schedule-policy random",
                     "no-jump-forward": "--disable-jump-forward"}
    from plait.runtime.server.config import configs_from_args
    from plait.runtime.server.launch import build_parser

    for a in ABLATIONS.values():  # the server reads each flag as the engine option the ablation sets
        if a.engine:
            options, _ = configs_from_args(build_parser().parse_args(a.launch_flags.split()))
            assert {k: options.get(k) for k in a.engine} == a.engine
