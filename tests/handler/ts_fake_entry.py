"""A .mar handler file for tests: the real TorchServe adapter over the fake engine (ts_fake_engine.py,
packed next to this file), whose steps take 50 ms so that requests stay in flight for a while."""
from paged_handler.ts_adapter import TorchServeHandler
from ts_fake_engine import FakeEngine


def _slow_fake_engine(config):
    return FakeEngine(config, step_sleep_s=0.05)


class FakeEngineHandler(TorchServeHandler):
    engine_factory = staticmethod(_slow_fake_engine)
