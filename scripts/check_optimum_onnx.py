"""Does optimum's ORTStableDiffusionPipeline run a folder written by fastdiff's ONNX export?

    python scripts/check_optimum_onnx.py --optimum-path DIR

DIR holds optimum-onnx and the transformers it pins (4.57, older than fastdiff's), installed
apart so fastdiff's own environment is untouched, e.g.
``pip install --target DIR --no-deps optimum-onnx==0.1.0 optimum==2.1.0 transformers==4.57.6
huggingface_hub==0.36.2 tokenizers==0.22.2``. The script builds the tests' small random SD 1.x
pipeline (tests/sd_fixtures.py), exports it, runs it through fastdiff (Pipeline.from_onnx) here
and through optimum in a subprocess with DIR first on its path, on the same latents, prompt and
scheduler, and prints the largest pixel difference. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT, STEPS, GUIDANCE = "a corgi in a field", 5, 7.5

OPTIMUM = """
import sys, numpy as np, torch
from optimum.onnxruntime import ORTStableDiffusionPipeline
folder, latents, out = sys.argv[1:4]
pipe = ORTStableDiffusionPipeline.from_pretrained(folder, provider="CPUExecutionProvider")
images = pipe({prompt!r}, num_inference_steps={steps}, guidance_scale={guidance},
              latents=torch.from_numpy(np.load(latents)), output_type="np").images
np.save(out, np.asarray(images, dtype=np.float32))
print(type(pipe).__name__, "ran", folder)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimum-path", required=True, help="folder with optimum-onnx installed (--target)")
    args = parser.parse_args()
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    import torch

    import fastdiff
    import fastdiff.export
    from sd_fixtures import make_pipeline

    work = tempfile.mkdtemp(prefix="fastdiff_optimum_")
    src, out = os.path.join(work, "sd1"), os.path.join(work, "sd1_onnx")
    make_pipeline(src, "sd1", scheduler="DDIMScheduler")
    fastdiff.export.onnx(fastdiff.Pipeline.from_pretrained(src), out)
    onnx_pipe = fastdiff.Pipeline.from_onnx(out)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = onnx_pipe.generate(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents,
                              output_type="np", progress=False)
    np.save(os.path.join(work, "latents.npy"), latents.numpy())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([args.optimum_path] + sys.path[2:]))
    code = OPTIMUM.format(prompt=PROMPT, steps=STEPS, guidance=GUIDANCE)
    run = subprocess.run([sys.executable, "-c", code, out, os.path.join(work, "latents.npy"),
                          os.path.join(work, "optimum.npy")], env=env, capture_output=True, text=True)
    print(run.stdout.strip())
    if run.returncode:
        print("optimum failed:", "\n".join(run.stderr.strip().splitlines()[-12:]))
        return 1
    theirs = np.load(os.path.join(work, "optimum.npy"))
    ours = np.asarray(ours, dtype=np.float32).reshape(theirs.shape)
    print(f"images {theirs.shape}: largest |fastdiff from_onnx - optimum| = {np.abs(ours - theirs).max():.3g} "
          "(pixel values in [0, 1])")
    return 0


if __name__ == "__main__":
    sys.exit(main())
