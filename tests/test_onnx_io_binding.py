"""ONNX pipelines' I/O binding (fastdiff/loaders/onnx_folder.py _Graph._run_bound): with
CUDAExecutionProvider first, the graphs read torch's GPU memory in place and hand their
outputs back through DLPack, and the pipeline's tensors (latents, the sampler step) stay on
the GPU.

The bound path is the same ONNX Runtime session on the same inputs as the plain one, so on
the CPU (where the tests can run it) its outputs must be bit-identical; on a GPU
(scripts/gpu_check.sh runs this file) the pipeline is held to the CPU's images.
"""
from __future__ import annotations

import pytest
import torch

from deps import require
from sd_fixtures import make_pipeline

require("diffusers")
require("onnx")
ort = require("onnxruntime")
require("onnxscript")
import fastdiff  # noqa: E402
import fastdiff.export  # noqa: E402
from fastdiff.loaders.onnx_folder import onnx_device  # noqa: E402

PROMPT = "a red circle"
HAS_CUDA = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd1"))
    make_pipeline(folder, "sd1")
    out = str(tmp_path_factory.mktemp("sd1_onnx"))
    fastdiff.export.onnx(fastdiff.Pipeline.from_pretrained(folder), out)
    return out


def _graphs(pipe):
    return [pipe.unet, pipe.text_encoder, pipe.vae.encoder, pipe.vae.decoder]


def test_the_bound_path_gives_the_plain_outputs_bit_for_bit(exported):
    pipe = fastdiff.Pipeline.from_onnx(exported)
    assert pipe.device == torch.device("cpu") and not any(g.bound for g in _graphs(pipe))
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 12, generator=g)
    context = torch.randn(2, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size, generator=g)
    timestep = torch.tensor([37])  # int64: the bound path casts it to the graph's float, as the plain one
    plain = pipe.unet.run(sample=sample, timestep=timestep.float(), encoder_hidden_states=context)
    pipe.unet.bound = True
    strided = context.transpose(0, 1).contiguous().transpose(0, 1)  # the same values, not contiguous
    bound = pipe.unet.run(sample=sample, timestep=timestep, encoder_hidden_states=strided)
    assert len(bound) == len(plain) == 1 and bound[0].dtype == torch.float32
    assert torch.equal(bound[0], plain[0])
    # a whole generate() with every graph bound: the same images
    kw = dict(num_inference_steps=3, seed=0, output_type="pt", progress=False)
    want = fastdiff.Pipeline.from_onnx(exported).generate(PROMPT, **kw)
    for graph in _graphs(pipe):
        graph.bound = True
    assert torch.equal(pipe.generate(PROMPT, **kw), want)


def test_the_device_follows_the_providers():
    assert onnx_device(["CPUExecutionProvider"]) == torch.device("cpu")
    assert onnx_device(["CUDAExecutionProvider", "CPUExecutionProvider"]).type == ("cuda" if torch.cuda.is_available()
                                                                                 else "cpu")
    from fastdiff.pipelines.onnx import OnnxStableDiffusionPipeline

    with pytest.raises(ValueError, match="device follows its providers"):  # checked before the folder is read
        OnnxStableDiffusionPipeline.load_components("unused", device="cuda", providers=["CPUExecutionProvider"])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and onnxruntime-gpu's CUDAExecutionProvider")
def test_on_cuda_the_pipeline_stays_on_the_gpu(exported):
    pipe = fastdiff.Pipeline.from_onnx(exported, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert pipe.device.type == "cuda" and all(g.bound for g in _graphs(pipe))
    sample = torch.randn(2, 4, 8, 8, device="cuda")
    context = torch.randn(2, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size, device="cuda")
    out = pipe.unet(sample, torch.tensor([500], device="cuda"), encoder_hidden_states=context)
    assert out.device.type == "cuda"
    cpu = fastdiff.Pipeline.from_onnx(exported)
    want = cpu.unet(sample.cpu(), torch.tensor([500]), encoder_hidden_states=context.cpu())
    # cuDNN may take TF32 (a 10-bit mantissa, u = 2^-11) for float32 convolutions: 1e-2 of the
    # output's scale bounds sqrt(terms) * u for the few hundred terms of these small sums
    assert (out.cpu() - want).abs().max().item() <= 1e-2 * max(1.0, want.abs().max().item())
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=3, output_type="pt", progress=False, latents=latents)
    images = pipe.generate(PROMPT, **kw)
    assert (images.cpu() - cpu.generate(PROMPT, **kw)).abs().max().item() <= 1e-2
