"""The HTTP server: SGLang's native API and the OpenAI-compatible API over a scheduler process.

    python -m plait.launch_server --model-path PATH [--port 30000] ...   (or `plait serve ...`)

Two processes talk over ZMQ with the typed messages of `plait.runtime.scheduler.io` and
`messages.py`: the HTTP process (FastAPI + uvicorn: validation, tokenization, streaming, metrics)
and the scheduler process (the model, the prefix cache, the scheduler loop, detokenization).
"""
