"""The frontend language: programs (`@plait.function`) over primitives (`gen`, `select`, roles,
`fork`), run by an interpreter on a backend (HTTP endpoint, in-process engine, OpenAI API).

Layout: api.py (primitives), ir.py (nodes), params.py (what a gen asks for), interpreter.py and
program_state.py (execution), function.py (run/run_batch), tracer.py and compiler.py (the program
graph), chat_template.py, choices.py, spec.py (API speculative execution), backend/.
This package imports no torch.
"""
