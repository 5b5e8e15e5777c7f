"""paged_kernels.cpu_extension: building, caching and loading the compiled CPU kernels, and the
plain-torch fallback whenever they cannot be had (no compiler, a failed build, switched off).

Builds are faked here (a real one takes tens of seconds; the compiled_ops fixture does one per
session) except where a failing compiler is the point."""
import logging
import threading
import time

import pytest
import torch

import paged_kernels
from paged_kernels import cpu_extension
from paged_kernels.reference import reference_paged_attention, reference_write_kv_cache
from paged_cases import assert_close_to_reference, make_batch, make_cache_write


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process that has not decided yet, with its own empty build cache. The module's state is
    swapped for an empty one (and back afterwards), so what a test decides never leaks out."""
    monkeypatch.setattr(cpu_extension, "_state", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("PAGED_CPU_KERNELS", raising=False)
    return tmp_path


class FakeCompiler:
    """Stands in for cpu_extension._compile: writes a file, or fails for some flag sets."""

    def __init__(self, fail_flags=(), seconds=0.0):
        self.fail_flags, self.seconds, self.calls = fail_flags, seconds, []

    def __call__(self, cxx, flags, directory, library):
        self.calls.append(list(flags))
        time.sleep(self.seconds)
        if any(flag in self.fail_flags for flag in flags):
            return "unsupported flag"
        library.write_bytes(b"library")
        return None


def warnings_from_extension(caplog):
    return [r for r in caplog.records if r.name == cpu_extension.__name__ and r.levelno >= logging.WARNING]


def test_missing_compiler_falls_back_with_one_log_line(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CXX", str(fresh / "no-such-compiler"))
    with caplog.at_level(logging.INFO):
        assert cpu_extension.load() is None
        assert cpu_extension.load() is None  # decided once per process
    [record] = warnings_from_extension(caplog)
    assert "no C++ compiler" in record.getMessage() and "plain-torch path" in record.getMessage()


def test_failing_build_falls_back_and_keeps_its_log(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    assert cpu_extension.load() is None
    [record] = warnings_from_extension(caplog)
    assert "build failed" in record.getMessage()
    assert list(fresh.rglob("build.log"))
    assert not list(fresh.rglob("*.so"))  # nothing half-written is left to be loaded later


def test_environment_switch_turns_the_kernels_off(fresh, monkeypatch):
    monkeypatch.setenv("PAGED_CPU_KERNELS", "0")
    assert cpu_extension.load() is None


def test_fallback_serves_attention_and_writes(monkeypatch):
    monkeypatch.setattr(cpu_extension, "load", lambda: None)
    batch = make_batch([1, 5, 1], [30, 12, 1], num_heads=8, num_kv_heads=2, poison=True, seed=1)
    assert_close_to_reference(paged_kernels.paged_attention(*batch.args()), reference_paged_attention(*batch.args()))
    cache_write = make_cache_write([4, -1, 17], seed=2)
    expected = cache_write.clone_caches()
    reference_write_kv_cache(*expected.args())
    paged_kernels.write_kv_cache(*cache_write.args())
    assert torch.equal(cache_write.key_cache, expected.key_cache)
    assert torch.equal(cache_write.value_cache, expected.value_cache)


def test_a_cached_library_is_reused_without_building(fresh, monkeypatch):
    compiler = FakeCompiler()
    monkeypatch.setattr(cpu_extension, "_compile", compiler)
    first = cpu_extension._library_path()
    assert cpu_extension._library_path() == first and first.read_bytes() == b"library"
    assert len(compiler.calls) == 1


def test_another_cpu_gets_its_own_build(fresh, monkeypatch):
    monkeypatch.setattr(cpu_extension, "_compile", FakeCompiler())
    monkeypatch.setattr(cpu_extension, "_host_cpu", lambda: "cpu A")
    on_a = cpu_extension._library_path()
    monkeypatch.setattr(cpu_extension, "_host_cpu", lambda: "cpu B")
    assert cpu_extension._library_path() != on_a


def test_every_source_and_header_is_compiled_into_the_key(fresh, monkeypatch):
    # A copy of kernels/paged_kernels/csrc: editing any of its files (a header too) gives another library.
    sources = fresh / "csrc"
    sources.mkdir()
    for path in cpu_extension.SOURCE_DIR.iterdir():
        (sources / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(cpu_extension, "SOURCE_DIR", sources)
    monkeypatch.setattr(cpu_extension, "_compile", FakeCompiler())
    assert {p.name for p in cpu_extension._sources()} == {"decoder_cpu.cpp", "dense_cpu.cpp", "greedy_cpu.cpp",
                                                               "packed_linear_cpu.cpp", "paged_attention_cpu.cpp"}
    paths = {cpu_extension._library_path()}
    for name in ("vec.h", "dense_cpu.cpp"):
        (sources / name).write_text((sources / name).read_text() + "\n// edited\n")
        paths.add(cpu_extension._library_path())
    assert len(paths) == 3


def test_portable_flags_are_tried_when_native_ones_fail(fresh, monkeypatch):
    compiler = FakeCompiler(fail_flags=("-march=native",))
    monkeypatch.setattr(cpu_extension, "_compile", compiler)
    assert cpu_extension._library_path().exists()
    assert compiler.calls == [list(flags) for flags in cpu_extension.FLAG_SETS]


def test_concurrent_builders_compile_once(fresh, monkeypatch):
    # Two builders at once (threads here; processes take the same file lock): the second waits
    # for the first and then finds the library instead of compiling it again.
    compiler = FakeCompiler(seconds=0.3)
    monkeypatch.setattr(cpu_extension, "_compile", compiler)
    paths = []
    builders = [threading.Thread(target=lambda: paths.append(cpu_extension._library_path())) for _ in range(2)]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join()
    assert len(compiler.calls) == 1 and paths[0] == paths[1]


def test_prepare_cpu_kernels_reports_what_will_serve(monkeypatch):
    monkeypatch.setattr(cpu_extension, "load", lambda: None)
    assert paged_kernels.prepare_cpu_kernels() is False
    monkeypatch.setattr(cpu_extension, "load", lambda: torch.ops.aten)
    assert paged_kernels.prepare_cpu_kernels() is True
