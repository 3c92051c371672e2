"""The interpreter: one `StreamExecutor` (a queue and a worker thread) per program state.

`s += expr` registers the variables `expr` will define as *pending* and queues it; the worker
executes expressions strictly in order. Reading a variable waits only until no definition of it
is pending, so a program runs ahead of the model until it needs a value. A failure in the worker
is stored, every waiter is woken, and every later read or `+=` raises `ProgramError` carrying the
failing code's traceback, so a broken program never hangs its caller.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import traceback
import uuid
from collections import Counter
from typing import Any

from plait.lang import ir
from plait.lang.chat_template import ChatTemplate
from plait.lang.global_config import global_config
from plait.lang.params import GenParams
from plait.lang.program_state import ProgramState, ProgramStateGroup, SetVar
from plait.lang.spec import SpecGen, finish_speculative_chat_turn, speculative_completion
from plait.lang.workflow import body_scope, current_workflow

logger = logging.getLogger(__name__)

__all__ = ["ProgramError", "ProgramState", "ProgramStateGroup", "StreamExecutor", "run_program"]


class ProgramError(RuntimeError):
    """A program failed. The message carries the traceback of the code that failed."""


class _Body:
    """Who runs the program's Python body: a read of a never-defined variable from that thread
    (or after the body returned) fails at once instead of waiting forever."""

    def __init__(self) -> None:
        self.ident: int | None = None
        self.running = False

    def may_still_define(self) -> bool:
        return self.running and threading.get_ident() != self.ident


def defined_names(expr: Any) -> list[Any]:
    """Variables an expression defines, in order (unnamed gens define `None`)."""
    if isinstance(expr, ir.SglExprList):
        return [n for e in expr.expr_list for n in defined_names(e)]
    if isinstance(expr, (ir.SglGen, ir.SglSelect, ir.SglVarScopeBegin, SetVar)):
        return [expr.name]
    if isinstance(expr, ir.SglSeparateReasoning):
        return [expr.gen_name, expr.name]
    return []


class StreamExecutor:
    """Executes one program state's expressions in order, on its own worker thread."""

    def __init__(self, backend: Any, arguments: dict[str, Any], default_sampling_para: GenParams,
                 chat_template: ChatTemplate | None, stream: bool, num_api_spec_tokens: int | None = None,
                 use_thread: bool = True):
        if stream and num_api_spec_tokens:
            raise ValueError("API speculative execution and streaming cannot be used together")
        self.sid = uuid.uuid4().hex
        self.backend = backend
        self.arguments = arguments
        self.default_sampling_para = default_sampling_para
        self.stream = stream
        self.chat_template = chat_template or backend.get_chat_template()
        self.num_api_spec_tokens = num_api_spec_tokens
        self.use_thread = use_thread
        self.variables: dict[Any, Any] = {}
        self.meta_info: dict[Any, Any] = {}
        self.text_ = ""
        self.messages_: list[dict[str, Any]] = []
        self.cur_role: str | None = None
        self.cur_role_begin_pos: int | None = None
        self.images_: list[tuple[Any, str]] = []
        self.cur_images: list[tuple[Any, str]] = []
        self.fork_start_text_pos: int | None = None
        self.speculated_text = ""  # completion models: surplus of the last speculative call
        self.spec_pieces: list[str | SpecGen] | None = None  # chat models: the turn being recorded
        self.error_: BaseException | None = None
        self.error_traceback = ""
        self.is_finished = False
        self.body = _Body()
        self.workflow_hint: tuple[str, str] | None = None  # (workflow_id, agent) sent with each request
        self.workflow_scope: str | None = None  # the workflow the programs this one starts belong to
        self.defined_here: dict[Any, None] = {}  # names this executor set (not copied at fork): join gathers them
        self._pending: Counter = Counter()
        self.var_text_pos: dict[Any, int] = {}  # where a gen's value starts in text_ (separate_reasoning)
        self._scope_start: dict[str, int] = {}
        self._cv = threading.Condition()
        self._ended = False
        self._children: list[StreamExecutor] = []  # fork branches: ended with this state at the latest
        if use_thread:
            self.queue: queue.Queue = queue.Queue()
            ctx = contextvars.copy_context()
            self._worker = threading.Thread(target=ctx.run, args=(self._worker_loop,), daemon=True,
                                            name=f"plait-program-{self.sid[:8]}")
            self._worker.start()

    # ---- submission and the worker ------------------------------------------------------------
    def submit(self, expr: ir.SglExpr) -> None:
        """Queue `expr`; returns at once (with `use_thread=False`: executes it now)."""
        self.raise_if_failed()
        if self._ended:
            raise RuntimeError("this program has ended; append to a state only while its function runs")
        names = defined_names(expr)
        with self._cv:
            self._pending.update(names)
        if self.use_thread:
            self.queue.put(expr)
        else:
            self._run_one(expr)
            self.raise_if_failed()

    def _worker_loop(self) -> None:
        while True:
            expr = self.queue.get()
            try:
                if expr is None:
                    return
                self._run_one(expr)
            finally:
                self.queue.task_done()
                if expr is None:
                    self._mark_finished()

    def _run_one(self, expr: ir.SglExpr) -> None:
        if self.error_ is not None:
            return  # drain what was queued after a failure
        try:
            self._execute(expr)
        except BaseException as e:  # noqa: BLE001 - every failure must reach the waiters
            self.fail(e)
        self._notify()

    def fail(self, error: BaseException) -> None:
        """Record a failure (from the worker or the program body) and wake every waiter."""
        with self._cv:
            if self.error_ is None:
                self.error_ = error
                self.error_traceback = "".join(traceback.format_exception(error))
                logger.warning("program %s failed:\n%s", self.sid[:8], self.error_traceback)
            self._cv.notify_all()

    def raise_if_failed(self) -> None:
        if self.error_ is not None:
            raise ProgramError(f"the program failed:\n{self.error_traceback}") from self.error_

    def _notify(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _mark_finished(self) -> None:
        with self._cv:
            self.is_finished = True
            self._cv.notify_all()

    def end(self, *, cascade: bool = True) -> None:
        """No more expressions will come; the worker exits after the queued ones. With `cascade`,
        the fork branches (and theirs) end too: branches never joined would otherwise keep their
        threads after the program returns."""
        if not self._ended:
            self._ended = True
            if self.use_thread:
                self.queue.put(None)
            else:
                self._mark_finished()
            self.backend.end_program(self)
        if cascade:
            children, self._children = self._children, []
            for child in children:
                child.end()

    def sync(self) -> None:
        """Wait until everything queued so far has executed (does not raise)."""
        if self.use_thread:
            self.queue.join()

    def __del__(self) -> None:
        try:
            self.end()
        except Exception:
            pass

    # ---- reading state ------------------------------------------------------------------------
    def get_var(self, name: Any, timeout: float | None = None) -> Any:
        """The variable's value once no definition of it is pending."""
        def ready() -> bool:
            if self.error_ is not None or self.is_finished:
                return True
            if self._pending[name]:
                return False
            return name in self.variables or not self.body.may_still_define()

        with self._cv:
            if not self._cv.wait_for(ready, timeout):
                raise TimeoutError(f"variable {name!r} not ready after {timeout} s")
            self.raise_if_failed()
            if self._pending[name] == 0 and name in self.variables:
                return self.variables[name]
        raise KeyError(f"the program never defined variable {name!r}")

    def get_meta_info(self, name: Any, timeout: float | None = None) -> Any:
        self.get_var(name, timeout)
        return self.meta_info.get(name)

    def set_var(self, name: Any, value: Any) -> None:
        """`s[name] = value`: queued in order while the program runs; afterwards (post-processing
        a finished state) set once everything queued has executed."""
        if self._ended:
            self.sync()
            self.define_var(name, value)
        else:
            self.submit(SetVar(name, value))

    def has_var(self, name: Any) -> bool:
        try:
            self.get_var(name)
            return True
        except KeyError:
            return False

    def text(self) -> str:
        self.sync()
        self.raise_if_failed()
        return self.text_

    def messages(self) -> list[dict[str, Any]]:
        self.sync()
        self.raise_if_failed()
        return self.messages_

    def wait_for(self, predicate: Any, timeout: float | None = None) -> bool:
        """Wait (on the executor's condition) until `predicate()` holds; used by streaming readers."""
        with self._cv:
            return self._cv.wait_for(predicate, timeout)

    # ---- fork ---------------------------------------------------------------------------------
    def fork(self, size: int = 1, position_ids_offset: Any = None) -> list[StreamExecutor]:
        """Copy this state into `size` branches. The shared prefix is committed first (a request
        with max_new_tokens=0) so every branch's first request hits the prefix cache."""
        if size < 1:
            raise ValueError("fork size must be >= 1")
        self.sync()
        if size > 1 and self.text_ and global_config.enable_fork_hint:
            self.submit(ir.SglCommitLazy())
            self.sync()
        self.raise_if_failed()
        children = []
        for _ in range(size):
            child = StreamExecutor(self.backend, self.arguments, self.default_sampling_para, self.chat_template,
                                   self.stream, use_thread=self.use_thread)
            child.variables = dict(self.variables)
            child.text_ = self.text_
            child.messages_ = [dict(m) for m in self.messages_]
            child.images_ = list(self.images_)
            child.cur_role = self.cur_role
            child.cur_role_begin_pos = self.cur_role_begin_pos
            child.fork_start_text_pos = len(self.text_)
            child.body = self.body
            child.workflow_hint = self.workflow_hint
            children.append(child)
        self._children.extend(children)
        self.backend.fork_program(self, [c.sid for c in children], position_ids_offset)
        return children

    # ---- execution ----------------------------------------------------------------------------
    def _execute(self, expr: Any) -> None:
        if isinstance(expr, str):
            expr = ir.SglConstantText(expr)
        if isinstance(expr, ir.SglExprList):
            for e in expr.expr_list:
                self._execute(e)
        elif isinstance(expr, ir.SglConstantText):
            self._fill(expr.value)
        elif isinstance(expr, ir.SglArgument):
            self._fill(str(expr.value))
        elif isinstance(expr, ir.SglGen):
            self._execute_gen(expr)
        elif isinstance(expr, ir.SglSelect):
            self._execute_select(expr)
        elif isinstance(expr, ir.SglRoleBegin):
            self._execute_role_begin(expr.role)
        elif isinstance(expr, ir.SglRoleEnd):
            self._execute_role_end(expr.role)
        elif isinstance(expr, (ir.SglImage, ir.SglVideo)):
            self._execute_media(expr)
        elif isinstance(expr, ir.SglVarScopeBegin):
            self._scope_start[expr.name] = len(self.text_)
        elif isinstance(expr, ir.SglVarScopeEnd):
            self.define_var(expr.name, self.text_[self._scope_start.pop(expr.name, len(self.text_)):])
        elif isinstance(expr, ir.SglCommitLazy):
            self.backend.commit_lazy_operations(self)
        elif isinstance(expr, ir.SglConcateAndAppend):
            self._execute_concatenate(expr.states)
        elif isinstance(expr, ir.SglSeparateReasoning):
            self._execute_separate_reasoning(expr)
        elif isinstance(expr, ir.SglVariable):
            self._fill(str(expr.source_stream_executor.get_var(expr.name)))
        elif isinstance(expr, SetVar):
            self.define_var(expr.name, expr.value)
        else:
            raise TypeError(f"cannot execute {expr!r}")

    def append_text(self, text: str) -> None:
        with self._cv:
            self.text_ += text
            self._cv.notify_all()

    def _fill(self, text: str) -> None:
        if self.spec_pieces is not None:
            self.spec_pieces.append(text)
            return
        if self.speculated_text:
            # The surplus stays useful only while the program's text agrees with it.
            ok = self.speculated_text.startswith(text)
            self.speculated_text = self.speculated_text[len(text):] if ok else ""
        self.append_text(text)

    def define_var(self, name: Any, value: Any, meta: Any = None) -> None:
        with self._cv:
            self.variables[name] = value
            if meta is not None:
                self.meta_info[name] = meta
            self.defined_here[name] = None
            if self._pending[name] > 0:
                self._pending[name] -= 1
            self._cv.notify_all()

    def _gen_params(self, expr: ir.SglGen) -> GenParams:
        return self.default_sampling_para.resolve(expr.overrides, extra_stop=self.chat_template.stop_str)

    def _execute_gen(self, expr: ir.SglGen) -> None:
        params = self._gen_params(expr)
        name = expr.name
        if self.spec_pieces is not None:
            self.spec_pieces.append(SpecGen(name, list(params.sampling.stop), params))
            return
        self.var_text_pos[name] = len(self.text_)
        if self.num_api_spec_tokens and not self.backend.is_chat_model and params.sampling.n == 1:
            value, meta = speculative_completion(self, params)
            self.append_text(value)
        elif self.stream:
            value, meta = self._stream_gen(name, params)
        else:
            value, meta = self.backend.generate(self, params)
            self.append_text(value[0] if isinstance(value, list) else value)
        self.define_var(name, value, meta)

    def _stream_gen(self, name: Any, params: GenParams) -> tuple[str, Any]:
        with self._cv:
            self.variables[name] = ""
        meta: Any = {}
        for delta, meta in self.backend.generate_stream(self, params):
            with self._cv:
                self.text_ += delta
                self.variables[name] += delta
                self.meta_info[name] = meta
                self._cv.notify_all()
        return self.variables[name], meta

    def _execute_select(self, expr: ir.SglSelect) -> None:
        if self.spec_pieces is not None:
            raise NotImplementedError("select inside a speculative chat turn is not supported")
        decision = self.backend.select(self, expr.choices, expr.temperature, expr.choices_method)
        self.var_text_pos[expr.name] = len(self.text_)
        self._fill(decision.decision)
        self.define_var(expr.name, decision.decision, decision.meta_info)

    def _execute_role_begin(self, role: str) -> None:
        if self.cur_role is not None:
            raise ValueError("Nested roles are not allowed.")
        template = self.chat_template
        if not self.messages_ and role != "system" and template.default_system_prompt is not None:
            self._execute_role_begin("system")
            self._fill(template.default_system_prompt)
            self._execute_role_end("system")
        prefix, _ = template.get_prefix_and_suffix(role, self.messages_)
        self._fill(prefix)
        self.cur_role = role
        self.cur_role_begin_pos = len(self.text_)
        self.cur_images = []
        if role == "assistant" and self.num_api_spec_tokens and self.backend.is_chat_model:
            self.spec_pieces = []

    def _execute_role_end(self, role: str) -> None:
        if self.cur_role != role:
            raise ValueError(f"role end {role!r} does not match the open role {self.cur_role!r}")
        if self.spec_pieces is not None:
            finish_speculative_chat_turn(self)
        content = self.text_[self.cur_role_begin_pos:].lstrip()
        _, suffix = self.chat_template.get_prefix_and_suffix(role, self.messages_)
        self._fill(suffix)
        if self.cur_images:
            parts: Any = [{"type": "text", "text": content}] + [
                {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{b64}"}}
                for _, b64 in self.cur_images
            ]
            self.messages_.append({"role": role, "content": parts})
        else:
            self.messages_.append({"role": role, "content": content})
        self.cur_role = None
        self.cur_role_begin_pos = None

    def _execute_media(self, expr: ir.SglImage | ir.SglVideo) -> None:
        from plait.lang.utils import encode_image_base64, encode_video_base64

        if isinstance(expr, ir.SglImage):
            b64 = encode_image_base64(expr.path)
        else:
            b64 = encode_video_base64(expr.path, expr.num_frames)
        self.images_.append((expr.path, b64))
        self.cur_images.append((expr.path, b64))
        self._fill(self.chat_template.image_token)
        self.backend.fill_image(self)

    def _execute_concatenate(self, children: list[StreamExecutor]) -> None:
        # Text concatenation: each branch's post-fork text, in branch order. (Splicing KV caches
        # needs a server endpoint modern servers lack; the prefix cache recovers most of the gain.)
        for child in children:
            child.sync()
            child.raise_if_failed()
        for child in children:
            self._fill(child.text_[child.fork_start_text_pos:])
            child.end()

    def _execute_separate_reasoning(self, expr: ir.SglSeparateReasoning) -> None:
        from plait.lang.reasoning import ReasoningParser

        gen_name = expr.gen_name
        value = self.variables.get(gen_name, "")
        reasoning, answer = ReasoningParser(expr.model_type).parse_non_stream(value)
        pos = self.var_text_pos.get(gen_name)
        # A streamed transcript was already shown to readers: leave it; only the variables change.
        if not self.stream and pos is not None and self.text_[pos:pos + len(value)] == value:
            with self._cv:
                self.text_ = self.text_[:pos] + answer + self.text_[pos + len(value):]
        self.define_var(gen_name, answer, self.meta_info.get(gen_name))
        self.define_var(expr.name, reasoning)


def run_program(program: Any, backend: Any, func_args: tuple, func_kwargs: dict[str, Any],
                default_sampling_para: GenParams, stream: bool, sync: bool = False,
                use_thread: bool = True) -> ProgramState:
    """Run `program` (an `SglFunction`) once. Streaming runs the body on its own thread and
    returns the state at once; otherwise the body runs here (its exceptions propagate)."""
    # Streaming reads the text while the worker writes it, so it always keeps the worker thread.
    use_thread = use_thread and (stream or global_config.enable_parallel_execution)
    executor = StreamExecutor(backend, func_kwargs, default_sampling_para, chat_template=None, stream=stream,
                              num_api_spec_tokens=program.num_api_spec_tokens, use_thread=use_thread)
    # Started inside another program's body (or a `workflow()` block): this run is an agent of it.
    scope = current_workflow()
    if scope is not None:
        executor.workflow_hint = (scope, getattr(program, "__name__", "program"))
    executor.workflow_scope = scope or executor.sid
    backend.begin_program(executor)
    state = ProgramState(executor)
    if stream:
        threading.Thread(target=_run_body, args=(program, state, func_args, func_kwargs, True), daemon=True,
                         name=f"plait-body-{executor.sid[:8]}").start()
        return state
    _run_body(program, state, func_args, func_kwargs, False)
    if sync or global_config.verbosity >= 2:
        state.sync()
    if global_config.verbosity >= 2:
        print(state.text())
    return state


def _run_body(program: Any, state: ProgramState, args: tuple, kwargs: dict[str, Any], capture: bool) -> None:
    executor = state.stream_executor
    executor.body.ident = threading.get_ident()
    executor.body.running = True
    try:
        with body_scope(executor.workflow_scope):
            state.ret_value = program.func(state, *args, **kwargs)
    except BaseException as e:
        if not capture:
            raise
        executor.fail(e)
    finally:
        executor.body.running = False
        executor.end()
