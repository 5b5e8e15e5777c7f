"""Packaging: our import names collide with nobody's, the wheel carries what the C++ build and the
handler read, and our kernels work beside Hugging Face's `kernels` package in one process, from any
working directory, editable and installed from the wheel."""
from __future__ import annotations

import configparser
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter whose working directory is outside the repository: Hugging Face's
# `kernels` (through transformers) and ours in one process, then one model step through our kernels.
PROBE = r"""
import json, sys
import kernels, paged_kernels
import transformers.integrations.hub_kernels
from paged import LLM, SamplingParams
with LLM(sys.argv[1], num_kv_blocks=64, max_num_seqs=4, dtype="float32") as llm:
    out = llm.generate(["def f(x):"], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    info = llm.engine.performance_info()
print(json.dumps({"hf_kernels": kernels.__file__, "paged_kernels": paged_kernels.__file__,
                  "has_hub_api": hasattr(kernels, "get_kernel"), "tokens": out[0].outputs[0].token_ids,
                  "attention": info["attention"]}))
"""


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(REPO_ROOT / "setup.cfg")
    return parser


def listed(parser: configparser.ConfigParser, key: str) -> list[str]:
    return [line.strip() for line in parser["options"][key].strip().splitlines() if line.strip()]


def run_probe(python: str, model_dir: Path, cwd: Path) -> dict:
    result = subprocess.run([python, "-c", PROBE, str(model_dir)], cwd=cwd, capture_output=True, text=True,
                            timeout=600, env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_hugging_faces_kernels(result: dict) -> None:
    """`import kernels` gave Hugging Face's installed package (it has the hub API), not a folder of ours."""
    assert Path(result["hf_kernels"]).parent.parent.name == "site-packages"
    assert result["has_hub_api"]


def test_no_folder_of_ours_is_importable_as_kernels_or_handler():
    assert not (REPO_ROOT / "kernels" / "__init__.py").exists()
    assert not (REPO_ROOT / "handler" / "__init__.py").exists()


def test_top_level_regular_packages_have_names_of_our_own():
    regular = {path.parent.name for path in REPO_ROOT.glob("*/__init__.py")}
    assert regular == {"paged", "paged_tools"}


def test_setup_cfg_lists_every_package_of_the_product():
    parser = setup_cfg()
    roots = {"paged": REPO_ROOT / "paged"}
    for line in listed(parser, "package_dir"):
        name, _, folder = (part.strip() for part in line.partition("="))
        roots[name] = REPO_ROOT / folder
    found = set()
    for name, root in roots.items():
        for init in root.rglob("__init__.py"):
            found.add(".".join([name, *init.parent.relative_to(root).parts]))
    assert set(listed(parser, "packages")) == found


@pytest.mark.smoke
def test_hugging_face_kernels_and_ours_work_in_one_process(tiny_llama_dir, tmp_path):
    result = run_probe(sys.executable, tiny_llama_dir, tmp_path)
    assert_hugging_faces_kernels(result)
    assert Path(result["paged_kernels"]).parent == REPO_ROOT / "kernels" / "paged_kernels"
    assert len(result["tokens"]) == 4
    assert result["attention"] == "compiled"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(REPO_ROOT)], check=True, capture_output=True, timeout=600)
    (found,) = out.glob("paged_serve-*.whl")
    return found


def test_wheel_carries_every_file_the_cpu_build_and_the_handler_read(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    csrc = REPO_ROOT / "kernels" / "paged_kernels" / "csrc"
    for source in [*csrc.glob("*.cpp"), *csrc.glob("*.h")]:
        assert f"paged_kernels/csrc/{source.name}" in names
    assert "paged_handler/metrics.yaml" in names
    assert not any(name.startswith(("kernels/", "handler/", "tests/", "paged_tools/")) for name in names)


def test_wheel_in_a_fresh_venv_outside_the_repository_loads_the_compiled_kernels(wheel, tiny_llama_dir, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = venv.glob("lib/python*/site-packages")
    # Our wheel alone in the fresh venv; its dependencies come from the test venv's site-packages,
    # added as a plain path (so that venv's editable finder for our packages is not loaded).
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    dependencies = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
    (site / "dependencies.pth").write_text(f"{dependencies}\n")
    result = run_probe(str(venv / "bin" / "python"), tiny_llama_dir, tmp_path)
    assert Path(result["paged_kernels"]).parent == site / "paged_kernels"
    assert_hugging_faces_kernels(result)
    assert result["attention"] == "compiled"
