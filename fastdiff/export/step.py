"""The whole guided step as one ONNX graph, and a run's coefficient table beside it.

fastdiff's sampler step is one fused op over a coefficient row computed once per run
(fastdiff/ops/coeffs.py), so the step itself can be a graph: the UNet on the CFG batch of 2N
(unconditional half first, as diffusers orders it) followed by ``guided_step``'s reference
formula. With the table, a loop of a few lines in any language samples::

    x = noise * init_scale
    for each step s:  x_next, den = step(x, s.t, s.row, z (or zeros), history..., text, scale)
                      keep x / den where a later step's history names them; x = x_next

``step_<sampler>/model.onnx``: inputs ``sample``, ``timestep`` [1], ``coeffs`` [1, K],
``noise``, ``history`` [H, N, C, h, w] (zeros where a step reads fewer), ``encoder_hidden_states``
[2N, L, D] (unconditional first), ``guidance_scale`` [1]; outputs ``next_sample`` and
``denoised``. One graph per sampler, since a sampler's plan fixes its clip range and how many
history operands it reads. ``step_<sampler>/steps_<n>.json``: the table for n steps: every
step's timestep, row (padded to K), history references ("x", k) = the sample step k started
from, ("den", k) = step k's denoised), whether it adds noise, and the starting noise scale.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Sequence

import torch
from torch import nn

from .graphs import GraphRecord, export_graph, traced_latent_side, verify


class _GuidedStep(nn.Module):
    def __init__(self, unet, clip_range, num_history: int):
        super().__init__()
        self.unet, self.clip_range, self.num_history = unet, clip_range, num_history

    def forward(self, sample, timestep, coeffs, noise, history, encoder_hidden_states, guidance_scale):
        from ..ops import reference

        out = self.unet(torch.cat([sample, sample]), timestep, encoder_hidden_states=encoder_hidden_states)
        n = sample.shape[0]  # (slices, not chunk(2), whose size rule the tracer cannot prove for every n)
        uncond, cond = out[:n], out[n:]
        return reference.guided_step(sample, cond, uncond, guidance_scale, coeffs, noise,
                                     list(history.unbind(0)), self.clip_range, False, True)


def plan_table(pipe, sampler: str, num_steps: int, **options) -> dict:
    """The coefficient table of `sampler` at `num_steps` on the pipeline's scheduler config."""
    from ..ops import coeffs as C
    from ..sampling import build_plan

    plan = build_plan(sampler, pipe.scheduler_config, num_steps, **options)
    if plan.learned_variance:
        raise ValueError(f"the step graph has no learned variance; sampler {sampler!r} needs one")
    width = C.NUM_FIXED + max(len(s.history) for s in plan.steps)
    steps = []
    for s in plan.steps:
        row = [0.0] * width
        row[: len(s.row)] = [float(v) for v in s.row]
        steps.append(dict(t=float(s.t), row=row, history=[list(h) for h in s.history], noise=bool(s.noise)))
    return dict(sampler=sampler, num_steps=num_steps, options=options, init_scale=float(plan.init_scale),
                clip_range=plan.clip_range, num_history=width - C.NUM_FIXED, coeffs_width=width, steps=steps)


def export_step(pipe, out_dir: str, sampler: str, num_steps: Sequence[int], *, opset: int,
                verify_graph: bool = True) -> Dict:
    """Write step_<sampler>/model.onnx and a steps_<n>.json table per entry of num_steps."""
    tables = [plan_table(pipe, sampler, n) for n in num_steps]
    # At least one history operand, so every sampler's graph has the same inputs (a zero
    # coefficient where a step reads none).
    num_history = max(1, max(t["num_history"] for t in tables))
    from ..ops import coeffs as C

    width = C.NUM_FIXED + num_history
    clip = {t["clip_range"] for t in tables}
    if len(clip) > 1:
        raise ValueError(f"sampler {sampler!r} clips differently at different step counts: {sorted(map(str, clip))}")
    module = _GuidedStep(pipe.unet, tables[0]["clip_range"], num_history)
    channels, length = pipe.unet.config["in_channels"], pipe.tokenizer.model_max_length
    hidden = pipe.text_encoder.config.hidden_size
    g = torch.Generator().manual_seed(0)

    def inputs(n, h, w, t):
        x = torch.randn(n, channels, h, w, generator=g)
        feeds = dict(sample=x, timestep=torch.tensor([t]), coeffs=torch.rand(1, width, generator=g),
                     noise=torch.randn_like(x))
        feeds["history"] = torch.randn(num_history, *x.shape, generator=g)
        feeds.update(encoder_hidden_states=torch.randn(2 * n, length, hidden, generator=g),
                     guidance_scale=torch.tensor([7.5]))
        return feeds

    image = {0: "batch_size", 2: "height", 3: "width"}
    side = traced_latent_side(pipe.unet)
    trace = inputs(2, side, side, 500.0)
    axes = {"sample": image, "noise": image, "history": {1: "batch_size", 3: "height", 4: "width"}}
    axes["encoder_hidden_states"] = {0: "2*batch_size", 1: "sequence_length"}
    folder = os.path.join(out_dir, f"step_{sampler}")
    path = os.path.join(folder, "model.onnx")
    export_graph(module, list(trace.values()), path, input_names=list(trace),
                 output_names=["next_sample", "denoised"], dynamic_axes=axes, opset=opset)
    record = GraphRecord(f"step_{sampler}", f"step_{sampler}/model.onnx",
                         inputs={k: [axes.get(k, {}).get(i, str(n)) for i, n in enumerate(v.shape)]
                                 for k, v in trace.items()},
                         outputs={"next_sample": ["batch_size", str(channels), "height", "width"],
                                  "denoised": ["batch_size", str(channels), "height", "width"]})
    if verify_graph:
        verify(path, module, inputs(3, 2 * side, side, 37.0), ["next_sample", "denoised"], record)
    for table in tables:
        table = dict(table, coeffs_width=width, num_history=num_history)
        for s in table["steps"]:
            s["row"] = s["row"] + [0.0] * (width - len(s["row"]))
        with open(os.path.join(folder, f"steps_{table['num_steps']}.json"), "w") as fh:
            json.dump(table, fh, indent=1)
    return record.as_dict()
