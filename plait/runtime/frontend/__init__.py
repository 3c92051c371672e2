"""The runtime's one front end, shared by `plait.Engine` and the HTTP server.

    messages.py         every message between the front end and the scheduler, both directions
    inputs.py           the `/generate` input model (strict pydantic), read from JSON and from Engine kwargs
    normalize.py        input -> one GenerateRequest per sequence (batch, n > 1), tokenized
    validate.py         Limits and validate(request, limits): the front end's check and the scheduler's
    tracker.py          requests in flight: results, groups, rids and aborts by exact rid
    front_end.py        FrontEnd: prepare, submit, abort, queries, and the messages coming back
    transport.py        the transport interface and the in-process transport (Engine)
    zmq_transport.py    the ZMQ transport to the scheduler process (HTTP server)
    driver.py           the one scheduler driver loop (a thread or the scheduler process)
    scheduler_process.py  the scheduler process: model, driver over ZMQ, exit with its parent
    server_info.py      the server-info shape (Engine.get_server_info and /get_server_info)
    errors.py           the errors a request ends in, with their HTTP status

This package's `__init__` imports nothing, so the scheduler can import `messages` alone.
"""
