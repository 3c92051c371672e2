"""What start-up imports, and where. `import torch` is seconds on a small CPU, so the processes that do
not run the model must not import it: parsing flags (every `plait` command, the server's HTTP
process before it starts the scheduler) stays free of torch, FastAPI and transformers. Checked in a
fresh interpreter, since the test process itself has imported everything."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "fastapi", "sympy")


def _imported_after(code: str) -> set[str]:
    """The heavy top-level modules a fresh interpreter has imported after running `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_flag_choices_match_the_registries():
    from plait.runtime import choices
    from plait.runtime.attention.base import ATTENTION_BACKENDS
    from plait.runtime.cache import PREFIX_CACHES
    from plait.runtime.cache.eviction import EVICTION_POLICIES
    from plait.runtime.cache.hiradix_cache import WRITE_POLICIES
    from plait.runtime.memory.host_pool import STORAGE_BACKENDS
    from plait.runtime.scheduler.policy import SCHEDULE_POLICIES

    assert list(choices.SCHEDULE_POLICIES) == list(SCHEDULE_POLICIES)
    assert list(choices.PREFIX_CACHES) == list(PREFIX_CACHES)
    assert list(choices.ATTENTION_BACKENDS) == list(ATTENTION_BACKENDS)
    assert list(choices.WRITE_POLICIES) == list(WRITE_POLICIES)
    assert list(choices.STORAGE_BACKENDS) == list(STORAGE_BACKENDS)
    assert list(choices.EVICTION_POLICIES) == list(EVICTION_POLICIES)


def test_parsing_any_command_imports_nothing_heavy():
    code = """
import argparse
from plait.cli import main
for command in (["generate", "hi"], ["serve"], ["router", "--worker-urls", "http://x"]):
    original = argparse.ArgumentParser.parse_args
    def stop(self, args=None, namespace=None, _original=original):
        _original(self, args, namespace)
        raise SystemExit(0)
    argparse.ArgumentParser.parse_args = stop
    try:
        main(command)
    except SystemExit:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
"""
    assert _imported_after(code) == set()


def test_the_server_validates_its_flags_without_torch():
    code = """
from plait.runtime.config import RuntimeConfig
from plait.runtime.server.config import configs_from_args
from plait.runtime.server.launch import build_parser
options, config = configs_from_args(build_parser().parse_args(["--port", "0"]))
RuntimeConfig.from_options(**options)
import plait.runtime.server.model_processes
"""
    assert _imported_after(code) == set()


def test_the_http_process_needs_neither_torch_nor_transformers_for_a_gguf_model(default_tokenizer, tmp_path):
    """The server's HTTP process: its app, and the default model's tokenizer as the scheduler sends it
    (pickled); the tokenizer is read the way a warm start reads it (from the saved folder)."""
    from plait.runtime import fast_tokenizer
    from plait.runtime.tokenizer import Tokenizer

    default_tokenizer.hf.save_pretrained(tmp_path)
    pickled = tmp_path / "tokenizer.pickle"
    pickled.write_bytes(__import__("pickle").dumps(Tokenizer(fast_tokenizer.load(str(tmp_path)))))
    code = f"""
import pickle
import plait.runtime.server.app, plait.runtime.server.uvicorn_server, plait.runtime.frontend.front_end
tokenizer = pickle.loads(open({str(pickled)!r}, "rb").read())
tokenizer.apply_chat_template([{{"role": "user", "content": "hi"}}])
tokenizer.decode(tokenizer.encode("hi"))
"""
    assert _imported_after(code) <= {"fastapi"}


def test_a_warm_start_reads_the_default_models_tokenizer_without_transformers(default_tokenizer):
    # default_tokenizer (resolve_model) has saved the tokenizer already, if this machine had not.
    code = """
from plait.runtime.model_loader.default_model import default_model_path
from plait.runtime.tokenizer import Tokenizer
assert type(Tokenizer.from_gguf(str(default_model_path())).backend).__name__ == "FastTokenizer"
"""
    assert _imported_after(code) == set()
