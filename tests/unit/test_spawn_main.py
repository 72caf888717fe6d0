"""A spawned engine process does not re-run the parent's main script."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_child_skips_the_parent_script_only_inside_the_block(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, sys, time
        if __name__ == "__mp_main__":  # the parent's script, re-run in a child
            with open({str(tmp_path / "reran")!r}, "a") as f:
                f.write("x")
        if __name__ == "__main__":
            from pagedserve.replicas.engine.spawn_main import without_parent_main
            ctx = multiprocessing.get_context("spawn")
            if sys.argv[1] == "inside":
                with without_parent_main():
                    child = ctx.Process(target=time.sleep, args=(0,))
                    child.start()
            else:
                child = ctx.Process(target=time.sleep, args=(0,))
                child.start()
            child.join(30)
            print(child.exitcode, sys.modules["__main__"].__spec__)
    """))
    reran = tmp_path / "reran"
    for where, reruns in (("outside", True), ("inside", False)):
        reran.unlink(missing_ok=True)
        out = subprocess.run([sys.executable, str(script), where], capture_output=True, text=True,
                             check=True, timeout=60)
        assert out.stdout.split() == ["0", "None"], out  # the child ran; the spec is restored
        assert reran.exists() == reruns, where
