"""`SglFunction`: what `@plait.function` makes of a Python function, and how it runs.

`run` keyword arguments that name a `SamplingParams` field (or a logprob option) become the
program's default sampling parameters, which every `gen` inherits; all other arguments go to the
function. A name the function itself declares always goes to the function.
"""

from __future__ import annotations

import collections
import inspect
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

from plait.lang.backend.base import as_backend
from plait.lang.global_config import global_config
from plait.lang.interpreter import run_program
from plait.lang.params import GenOverrides, GenParams, LogprobOptions
from plait.lang.program_state import ProgramState
from plait.sampling_params import SamplingParams

_SAMPLING_NAMES = frozenset(SamplingParams.field_names()) | frozenset(LogprobOptions.field_names()) | {"dtype"}


class SglFunction:
    """A program: a Python function whose first parameter is the program state `s`."""

    def __init__(self, func: Callable[..., Any], num_api_spec_tokens: int | None = None,
                 bind_arguments: dict[str, Any] | None = None):
        self.func = func
        self.num_api_spec_tokens = num_api_spec_tokens
        self.bind_arguments = dict(bind_arguments or {})
        self.pin_prefix_rid = None
        spec = inspect.getfullargspec(func)
        if not spec.args or spec.args[0] != "s":
            raise ValueError(f"the first parameter of a plait function must be named `s`, got {spec.args[:1]}")
        self.arg_names = spec.args[1:] + spec.kwonlyargs
        defaults = spec.defaults or ()
        self.arg_defaults = dict(zip(spec.args[len(spec.args) - len(defaults):], defaults))
        self.arg_defaults.update(spec.kwonlydefaults or {})
        self.__name__ = getattr(func, "__name__", "program")
        self.__doc__ = func.__doc__

    def __repr__(self) -> str:
        return f"SglFunction({self.__name__})"

    # ---- running ------------------------------------------------------------------------------
    def _split_kwargs(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(program arguments, sampling defaults)."""
        program, sampling = {}, {}
        for k, v in kwargs.items():
            (sampling if k in _SAMPLING_NAMES and k not in self.arg_names else program)[k] = v
        return {**self.bind_arguments, **program}, sampling

    def run(self, *args: Any, stream: bool = False, backend: Any = None, use_thread: bool = True,
            **kwargs: Any) -> ProgramState:
        """Run once. Non-streaming: returns when the function body returns (reads wait for values).
        Streaming: returns at once; follow it with `state.text_iter()`."""
        program_kwargs, sampling = self._split_kwargs(kwargs)
        defaults = GenParams.program_defaults(GenOverrides.from_kwargs(sampling))
        return run_program(self, _backend(backend), args, program_kwargs, defaults, stream=stream,
                           use_thread=use_thread)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from plait.lang.tracer import TracingScope

        scope = TracingScope.current()
        if scope is not None:
            return self.trace(backend=scope.backend, **kwargs)
        return self.run(*args, **kwargs)

    def run_batch(self, batch_kwargs: list[dict[str, Any]] | list[list[Any]], *, backend: Any = None,
                  num_threads: int | str = "auto", progress_bar: bool = False, generator_style: bool = False,
                  precache: bool | None = None, **sampling: Any) -> list[ProgramState] | Iterator[ProgramState]:
        """Run once per item (a dict of arguments, or a list of positional ones) on a thread pool;
        states come back in input order. `generator_style` yields them as they complete, in order.
        `precache` (default: global_config) first sends the program's constant prefix."""
        if not isinstance(batch_kwargs, (list, tuple)):
            raise TypeError("batch_kwargs must be a list of dicts (or of argument lists)")
        if not batch_kwargs:
            return iter([]) if generator_style else []
        items = [self._item_kwargs(x) for x in batch_kwargs]
        unknown = sorted(set(sampling) - _SAMPLING_NAMES)
        if unknown:
            raise TypeError(f"unknown run_batch argument(s): {', '.join(unknown)}")
        backend = _backend(backend)
        defaults = GenParams.program_defaults(GenOverrides.from_kwargs(sampling))
        if precache is None:
            precache = global_config.enable_precache_with_tracing
        if precache and len(items) > 1:
            self._precache(backend)
        if num_threads == "auto":
            num_threads = max(96, (os.cpu_count() or 1) * 16)
        num_threads = max(1, min(int(num_threads), len(items)))

        def run_one(kw: dict[str, Any]) -> ProgramState:
            state = run_program(self, backend, (), {**self.bind_arguments, **kw}, defaults, stream=False)
            state.sync()  # a pool slot stays busy until its program is done: num_threads bounds the load
            return state

        if generator_style:
            return _ordered_pool(run_one, items, num_threads, progress_bar)
        return list(_ordered_pool(run_one, items, num_threads, progress_bar))

    def _item_kwargs(self, item: Any) -> dict[str, Any]:
        if isinstance(item, dict):
            return item
        if isinstance(item, (list, tuple)):
            free = [n for n in self.arg_names if n not in self.bind_arguments]
            if len(item) > len(free) or len(item) < len([n for n in free if n not in self.arg_defaults]):
                raise ValueError(f"Given arguments mismatch the SGL function signature: {item!r} for {free}")
            return dict(zip(free, item))
        raise TypeError(f"a run_batch item must be a dict or a list, got {type(item).__name__}")

    def _precache(self, backend: Any) -> None:
        try:
            self.cache(backend)
        except Exception:  # a hint only: a program the tracer cannot follow simply is not precached
            pass

    def bind(self, **kwargs: Any) -> SglFunction:
        """A copy with some arguments fixed."""
        unknown = [k for k in kwargs if k not in self.arg_names]
        if unknown:
            raise TypeError(f"{self.__name__} has no argument(s) {', '.join(unknown)}")
        return SglFunction(self.func, num_api_spec_tokens=self.num_api_spec_tokens,
                           bind_arguments={**self.bind_arguments, **kwargs})

    # ---- tracing and compilation --------------------------------------------------------------
    def trace(self, *, backend: Any = None, **kwargs: Any) -> Any:
        """Run the function symbolically (no model): arguments not given become placeholders.
        Returns the tracer state; `state.last_node.print_graph_dfs()` shows the graph."""
        from plait.lang.tracer import trace_program

        return trace_program(self, kwargs, backend)

    def cache(self, backend: Any = None) -> str | None:
        """Send the program's constant prefix to the backend's prefix cache; returns it (None if
        shorter than `global_config.precache_min_chars`, not worth a request)."""
        from plait.lang.tracer import extract_prefix_by_tracing

        backend = _backend(backend)
        prefix = extract_prefix_by_tracing(self, backend)
        if len(prefix) < global_config.precache_min_chars:
            return None
        backend.cache_prefix(prefix)
        return prefix

    def compile(self, *, backend: Any = None) -> Any:
        from plait.lang.compiler import compile_func

        return compile_func(self, backend)


def _backend(backend: Any) -> Any:
    backend = backend if backend is not None else global_config.default_backend
    if backend is None:
        raise ValueError("no backend: call plait.set_default_backend(...) or pass backend=")
    return as_backend(backend)


def _ordered_pool(fn: Callable[[Any], Any], items: list[Any], num_threads: int, progress_bar: bool) -> Iterator[Any]:
    """Apply `fn` on a thread pool, yielding results in input order as soon as each is ready;
    at most 2 x num_threads items are in flight, so a generator consumer applies backpressure."""
    bar = None
    if progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=len(items))
    if num_threads == 1:
        for item in items:
            yield fn(item)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return
    window: collections.deque = collections.deque()
    with ThreadPoolExecutor(num_threads) as pool:
        it = iter(items)

        def submit_more() -> None:
            for item in it:
                fut = pool.submit(fn, item)
                if bar is not None:
                    fut.add_done_callback(lambda _: bar.update(1))
                window.append(fut)
                if len(window) >= 2 * num_threads:
                    return

        submit_more()
        try:
            while window:
                result = window.popleft().result()
                submit_more()
                yield result
        finally:
            for fut in window:
                fut.cancel()
            if bar is not None:
                bar.close()


__all__ = ["SglFunction"]
