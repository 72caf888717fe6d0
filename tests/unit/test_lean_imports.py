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
