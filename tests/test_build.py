"""The extension, the dispatch layer and the fallback to the twins."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastdiff
from fastdiff.ops import _library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    full_env = dict(os.environ, **env)
    full_env.pop("FASTDIFF_BACKEND", None) if "FASTDIFF_BACKEND" not in env else None
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=300)


def test_extension_is_built_and_serves_cpu():
    # CI builds the extension first; a silent fallback to the twins would hide a broken build.
    assert _library.extension_loaded(), f"fastdiff._C failed to load: {_library.extension_error()}"
    info = fastdiff.backend_info()
    assert info["ops"]["guided_step"]["cpu"] == "C++ (OpenMP)"
    assert info["extension"]["loaded"] is True


def test_python_schemas_match_the_compiled_ones():
    for name, schema in _library.SCHEMAS.items():
        compiled = str(getattr(torch.ops.fastdiff, name).default._schema)
        assert compiled == "fastdiff::" + schema, (compiled, schema)


def test_backend_env_switches_every_op_to_the_twin():
    r = _run("""
        import warnings, fastdiff
        print(fastdiff.backend_info()["ops"]["guided_step"])
    """, FASTDIFF_BACKEND="reference")
    assert r.returncode == 0, r.stderr
    assert "'cpu': 'reference'" in r.stdout and "'cuda': 'reference'" in r.stdout


def test_unknown_backend_lists_the_valid_ones():
    # refused where the kernel layer loads: `import fastdiff` alone loads no torch (its names are lazy)
    r = _run("import fastdiff; fastdiff.backend_info()", FASTDIFF_BACKEND="fastest")
    assert r.returncode != 0 and "valid backends: auto, reference, triton" in r.stderr
    with pytest.raises(ValueError, match="valid backends"):
        fastdiff.set_backend("fastest")


def test_without_extension_everything_runs_on_the_twins_with_one_warning():
    # Hide the compiled library: loading the kernel layer must still work, warn once, and sample.
    r = _run("""
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "fastdiff._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastdiff.ops
        msgs = [str(w.message) for w in caught if "fastdiff._C" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "pip install --no-build-isolation -e ." in msgs[0]
        import torch
        from fastdiff.sampling import sample
        info = fastdiff.backend_info()
        assert info["ops"]["guided_step"]["cpu"] == "reference", info
        x = sample("dpmpp_2m", lambda x, t: 0.1 * x, torch.randn(1, 3, 8, 8), None, 5, progress=False)
        assert torch.isfinite(x).all()
        # torch.ops.fastdiff.guided_step exists (schema defined from Python) for compile/opcheck
        from fastdiff.ops import coeffs as C
        out, _ = torch.ops.fastdiff.guided_step(x, x, None, None, torch.zeros(1, C.NUM_FIXED), None, [],
                                                None, False, False)
        print("ok")
    """)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout
