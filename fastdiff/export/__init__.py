"""Export of fastdiff pipelines: ``fastdiff.export.onnx(pipe, out_dir)``.

Each family has an exporter module (``EXPORTERS``) that lists its graphs as GraphSpecs
(fastdiff/export/graphs.py writes, checks and records them, in the dtype and shapes the
options ask) and writes what its ONNX pipeline reads beside them:

- Stable Diffusion (stable_diffusion.py): optimum's folder layout and names, plus step graphs;
- GLIDE (glide.py): the text transformer, base and upsampler U-Nets (inpainting too);
- VQ-Diffusion (vq_diffusion.py): the CLIP text encoder, the discrete transformer, the VQ-VAE
  decoder and the learned null-text embedding.

Names are resolved on first use (PEP 562), so `fastdiff export --help` (cli.py) starts without
importing torch; they live in onnx_export.py (the entry point and its checks) and graphs.py.
"""
from .._lazy import lazy_names

_EXPORTS = {"onnx": "onnx_export", "check_options": "onnx_export", "check_out_dir": "onnx_export",
            "exporter_for": "onnx_export", "require_packages": "onnx_export", "EXPORTERS": "onnx_export",
            "MIN_OPSET": "onnx_export", "STATIC_KEYS": "onnx_export", "DEFAULT_OPSET": "graphs",
            "DTYPES": "graphs", "ExportOptions": "graphs"}

__all__ = ["onnx", "check_options", "check_out_dir", "exporter_for", "require_packages", "DEFAULT_OPSET", "EXPORTERS"]

__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
