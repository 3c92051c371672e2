"""The data-parallel router: one address in front of several Plait (or SGLang) servers, sending each
request to the worker whose prefix cache most probably holds its prompt (`plait router --worker-urls
URL ...`, or `python -m plait.router`). The policies (`policy.py`) also spread requests over the
replicas of one server started with `--dp-size`."""
