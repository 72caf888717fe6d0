"""The Serve actors that run no model start without importing torch or transformers.

A new replica's actor only fetches weights and spawns the engine process (which imports
torch itself); importing torch there too cost seconds of every scale-up.
"""

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "triton")


@pytest.mark.parametrize("module", ["pagedserve.replicas.deployment", "pagedserve.cluster.router",
                                    "pagedserve.replicas.parallel.workers", "pagedserve"])
def test_module_imports_no_torch(module):
    code = (f"import sys, {module}\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"{module} imports {out.stdout.strip()}"


def test_llm_is_still_importable_from_the_package():
    from pagedserve import LLM
    from pagedserve.llm import LLM as direct

    assert LLM is direct



COMPILER_MODULES = ("sympy", "torch._dynamo", "torch.fx.experimental.symbolic_shapes")


def test_loading_a_model_imports_no_compiler_machinery(tiny_llama):
    """The weight load creates the model on the meta device, then gives it storage. Through
    `to_empty` and the default `nn.Embedding` init this ran torch's Python references, whose
    first use imported sympy, torch.fx's symbolic shapes and torch._dynamo: 1.3 s on a CPU,
    seconds on a GPU machine, in every new engine process."""
    code = ("import sys, torch\n"
            "from pagedserve.replicas.models.model_files import load_model_files\n"
            "from pagedserve.replicas.models.loader import load_model\n"
            f"files = load_model_files({str(tiny_llama)!r}, progress=False)\n"
            "load_model(files.spec, files.model_dir, torch.float32, torch.device('cpu'),\n"
            "           progress=False)\n"
            f"print(sorted(m for m in {COMPILER_MODULES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"loading a model imports {out.stdout.strip()}"
