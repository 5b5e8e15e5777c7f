"""TorchServe side of paged-serve: the handler, request schemas, OpenAI routes and metrics.

Importing this package runs no torch ops (see handler/llm_handler.py for why that matters).
"""
