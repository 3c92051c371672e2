"""The HTTP server: SGLang's native API and the OpenAI-compatible API over a scheduler process.

    python -m plait.launch_server --model-path PATH [--port 30000] ...   (or `plait serve ...`)

Two processes talk over ZMQ with the typed messages of `plait.runtime.frontend.messages`: the
HTTP process (FastAPI + uvicorn: the front end that `plait.Engine` uses too, streaming, OpenAI
shapes, metrics) and the scheduler process (`plait.runtime.frontend.scheduler_process`: the model,
the prefix cache, the scheduler loop, detokenization).
"""
