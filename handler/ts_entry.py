"""The handler file packed into the .mar: a thin shim over the installed ``handler`` package.

TorchServe's loader wants exactly one class defined in this module; it subclasses the adapter.
"""
try:
    from paged_handler.ts_adapter import TorchServeHandler as _TorchServeHandler
except ImportError as exc:  # pragma: no cover - a clear message in the worker log
    raise ImportError(
        "cannot import the 'paged_handler' package of paged-serve in the TorchServe worker: install the "
        "project into the Python that runs torchserve (make install) or put the repository root on "
        f"PYTHONPATH ({exc})") from exc


class PagedLLMHandler(_TorchServeHandler):
    pass
