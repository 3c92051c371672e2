"""The `plait` command's conventions: --version, and help that says what every flag does and what its
default means (the help comes from the config dataclasses' fields, one source)."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

import plait
from plait.cli import main
from plait.runtime.config import RuntimeConfig
from plait.runtime.server.config import ServerConfig


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"plait {plait.__version__}"


def _subparser(name: str) -> argparse.ArgumentParser:
    captured: dict[str, argparse.ArgumentParser] = {}
    original = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):  # stop main() at parsing and keep the parser
        captured["parser"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            main([name])
    finally:
        argparse.ArgumentParser.parse_args = original
    sub = next(a for a in captured["parser"]._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_every_flag_says_what_it_does_and_what_its_default_means(command):
    parser = _subparser(command)
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 30
    for action in flags:
        text = action.help or ""
        assert len(text) > 10, (action.option_strings, text)
        assert "default: None" not in text, action.option_strings
        if action.default is None:
            assert "default:" in text, (action.option_strings, text)  # what None means, in words
        elif not isinstance(action.default, bool):
            assert re.search(r"default: \S", text), (action.option_strings, text)


def test_help_text_lives_on_the_config_fields():
    for cls in (*RuntimeConfig.sections().values(), ServerConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_model_path_help_names_the_default_model():
    parser = _subparser("generate")
    (action,) = [a for a in parser._actions if "--model-path" in a.option_strings]
    assert "default model" in action.help and "SmolLM2" in action.help
