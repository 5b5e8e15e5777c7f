"""TorchServe side of paged-serve.

``ts_adapter`` (TorchServe context and framing) -> ``service`` (the protocol-neutral stream loop)
-> ``formats`` (one response format per protocol); ``schemas`` and ``tokenization`` prepare
requests, ``lifecycle`` keeps the worker process honest. Importing this package runs no torch ops
(see paged/async_engine.py for why that matters).
"""
