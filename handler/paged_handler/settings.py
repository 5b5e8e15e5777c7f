"""The ``handler:`` section of model-config.yaml: engine settings (paged.config.EngineConfig) plus
a few settings of the serving layer itself, split and validated in one place."""
from __future__ import annotations

import os

from paged.config import EngineConfig

from paged_handler.prefixes import load_prefix_entries

# TorchServe's own default max_request_size / max_response_size (bytes).
TORCHSERVE_DEFAULT_MESSAGE_SIZE = 6_553_500

HANDLER_DEFAULTS = {
    "served_model_name": None,        # name in OpenAI answers; default: the TorchServe model name
    "max_request_bytes": 1 << 20,     # keep equal to max_request_size in config.properties
    "max_response_bytes": TORCHSERVE_DEFAULT_MESSAGE_SIZE,  # keep equal to max_response_size there
    "tokenizer_threads": 2,           # prompt tokenization / chat templates run on these threads
    "max_pending_tokenizations": 64,  # more requests waiting for a tokenizer thread answer 503
    # An engine whose step fails for good is rebuilt inside the worker at most this many times
    # an hour; beyond that the worker exits and TorchServe starts a new one (docs/serving.md: why
    # not always, under TorchServe 0.12).
    "engine_restarts_per_hour": 3,
    "metrics_interval_s": 1.0,
    # A stream's first tokens go out at once, then a chunk every `stream_interval` generated
    # tokens (and at its end): fewer, larger chunks cost the frontend less per token (make
    # bench-serve prints the split). 1: a chunk every engine step.
    "stream_interval": 1,
    "load_timeout_s": 1800,
    # Prefixes computed once at load and pinned in the KV pool (docs/sharing.md): each entry is
    # inline text, {text: ...} or {file: path inside the archive}.
    "shared_prefixes": None,
}
ALIASES = {"request_timeout": "request_timeout_s"}
_POSITIVE_INTS = ("max_request_bytes", "max_response_bytes", "tokenizer_threads", "max_pending_tokenizations",
                  "stream_interval")


def parse_handler_config(section: dict | None, model_dir: str) -> tuple[EngineConfig, dict]:
    """Split the yaml section into (EngineConfig, handler settings); ValueError with a clear message."""
    section = dict(section or {})
    for alias, real in ALIASES.items():
        if alias in section:
            if real in section:
                raise ValueError(f"give {alias} or {real}, not both")
            section[real] = section.pop(alias)
    settings = dict(HANDLER_DEFAULTS)
    for key in list(section):
        if key in HANDLER_DEFAULTS:
            settings[key] = section.pop(key)
    restarts = settings["engine_restarts_per_hour"]
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
        raise ValueError(f"engine_restarts_per_hour must be an integer >= 0, got {restarts!r}")
    for key in _POSITIVE_INTS:
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    model = section.pop("model", None) or model_dir
    if not os.path.isabs(model):
        model = os.path.join(model_dir, model)
    section["model"] = model
    profile = section.get("block_size_profile")
    if isinstance(profile, str) and not os.path.isabs(profile):
        section["block_size_profile"] = os.path.join(model_dir, profile)
    if settings["shared_prefixes"] is not None:
        load_prefix_entries(settings["shared_prefixes"], model_dir)  # a bad entry fails the load now
    if section.get("request_timeout_s") is None:
        section.pop("request_timeout_s", None)
    config = EngineConfig.from_dict(section)
    if settings["shared_prefixes"] and config.kv_memory == "virtual":
        raise ValueError("shared_prefixes: pinned prefixes are KV blocks, and kv_memory 'virtual' has no blocks "
                         "to pin (use kv_memory 'paged', or drop shared_prefixes)")
    return config, settings
