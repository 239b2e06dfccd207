"""Step graphs kept across runs (GraphCache) and captures on the sample's own device.

Without a GPU the capture is graphs.EagerCapture: its "replay" runs the captured body
again, and the body reads the *kept* denoiser, so a second run that forgot to refill the
kept denoiser's inputs (text conditioning, guidance scale) or the static sample would give
the first run's images — these tests compare every graphed run with the eager one.
"""
import contextlib

import pytest
import torch

import fastdiff
from fastdiff.guidance import ClassifierFreeGuidance
from fastdiff.sampling import SchedulerConfig, sample
from fastdiff.sampling import graphs as graphs_module
from fastdiff.sampling.graphs import GraphCache, module_fingerprint

from cuda_fakes import FakeCurrentDevice

CONFIG = SchedulerConfig.from_dict(dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", prediction_type="epsilon"))


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(0.5)

    def forward(self, x, t, cond):
        return self.conv(x) * 0.5 + cond.reshape(-1, 4, 1, 1) * torch.cos(t.float() / 300.0) + 0.1 * x


def run(model, cache, cond, uncond, scale, x, sampler="dpmpp_2m", steps=6):
    denoiser = ClassifierFreeGuidance(model, cond, uncond, scale)
    graphs = cache.scope("toy", model) if cache is not None else False
    return sample(sampler, denoiser, x, CONFIG, steps, progress=False, cuda_graph=graphs,
                  generator=torch.Generator().manual_seed(3))


def inputs(seed, batch=2):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, generator=gen), torch.randn(batch, 4, generator=gen),
            torch.randn(batch, 4, 5, 6, generator=gen))


def test_second_run_replays_without_capturing_and_reads_the_new_inputs(eager_capture):
    torch.manual_seed(0)
    model, cache = Toy(), GraphCache()
    cond, uncond, x = inputs(1)
    first = run(model, cache, cond, uncond, [3.0, 7.5], x)
    assert cache.captures == 2 and len(eager_capture) == 1  # DPM-Solver++(2M): first and second order
    cond2, uncond2, x2 = inputs(2)
    second = run(model, cache, cond2, uncond2, [2.0, 9.0], x2)  # new text, new per-sample scales, new start
    assert cache.captures == 2 and len(eager_capture) == 1, "the second run captured again"
    assert torch.equal(second, run(model, None, cond2, uncond2, [2.0, 9.0], x2))
    assert not torch.equal(second, first)
    # A different sampler signature adds its graphs to the same kept statics; then both replay.
    ddim = run(model, cache, cond, uncond, 5.0, x, sampler="ddim")
    assert torch.equal(ddim, run(model, None, cond, uncond, 5.0, x, sampler="ddim"))


def test_what_a_capture_bakes_in_makes_a_new_key(eager_capture):
    torch.manual_seed(0)
    model, cache = Toy(), GraphCache(capacity=8)
    cond, uncond, x = inputs(1)
    run(model, cache, cond, uncond, 5.0, x)
    base = cache.captures
    for change in ("batch", "unguided", "weights"):
        before = cache.captures
        if change == "batch":
            c, u, xx = inputs(4, batch=3)
            got, want = run(model, cache, c, u, 5.0, xx), run(model, None, c, u, 5.0, xx)
        elif change == "unguided":
            got, want = run(model, cache, cond, None, 1.0, x), run(model, None, cond, None, 1.0, x)
        else:  # new weight tensors (e.g. .to(), fused projections): the old graphs would read freed memory
            model.conv.weight = torch.nn.Parameter(model.conv.weight.detach() * 0.9)
            got, want = run(model, cache, cond, uncond, 5.0, x), run(model, None, cond, uncond, 5.0, x)
        assert cache.captures > before, change
        assert torch.equal(got, want), change
    assert cache.captures > base


def test_backend_is_part_of_the_key(eager_capture):
    torch.manual_seed(0)
    model, cache = Toy(), GraphCache()
    cond, uncond, x = inputs(1)
    run(model, cache, cond, uncond, 5.0, x)
    before = cache.captures
    fastdiff.set_backend("reference")
    try:
        run(model, cache, cond, uncond, 5.0, x)
    finally:
        fastdiff.set_backend("auto")
    assert cache.captures > before


def test_capacity_keeps_the_most_recent_runs():
    cache = GraphCache(capacity=2)
    for key in "abc":
        cache.put(key, key.upper())
    assert len(cache) == 2 and cache.get("a") is None and cache.get("b") == "B"
    cache.put("d", "D")  # "b" was used last, so "c" goes
    assert cache.get("c") is None and cache.get("b") == "B"
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError, match="capacity"):
        GraphCache(capacity=0)


def test_fingerprint_follows_the_weights_not_their_values():
    model = Toy()
    before = module_fingerprint(model)
    with torch.no_grad():
        model.conv.weight.add_(1.0)  # in place: a replay reads the new values where they are
    assert module_fingerprint(model) == before
    model.to(torch.float64)
    assert module_fingerprint(model) != before


def test_an_empty_cache_still_refuses_user_code_inside_the_step(eager_capture):
    for graphs in (GraphCache(), GraphCache().scope("toy", Toy())):  # an empty GraphCache is falsy
        with pytest.raises(ValueError, match="cannot capture cond_fn or denoised_fn"):
            sample("ddim", lambda x, t: x, torch.randn(1, 4, 4, 4), CONFIG, 3, progress=False, cuda_graph=graphs,
                   denoised_fn=lambda x0, t: x0)


def test_plain_callables_are_not_kept(eager_capture):
    cache = GraphCache()
    x = torch.randn(1, 4, 4, 4)
    for _ in range(2):
        sample("ddim", lambda x, t: 0.1 * x, x, CONFIG, 3, progress=False, cuda_graph=cache.scope("f", Toy()))
    assert len(cache) == 0 and len(eager_capture) == 2


def test_sd_pipeline_keeps_its_graphs_across_generate_calls(sd_pipe, eager_capture):
    kw = dict(num_inference_steps=4, sampler="dpmpp_2m", output_type="pt", progress=False)
    sd_pipe.graph_cache.clear()
    sd_pipe.generate(["a cat", "a dog"], cuda_graph=True, guidance_scale=6.0, seed=1, **kw)
    captured = sd_pipe.graph_cache.captures
    again = sd_pipe.generate(["a red dog", "a blue cat"], cuda_graph=True, guidance_scale=4.0, seed=2, **kw)
    assert sd_pipe.graph_cache.captures == captured
    eager = sd_pipe.generate(["a red dog", "a blue cat"], guidance_scale=4.0, seed=2, **kw)
    assert torch.equal(again, eager)


def test_glide_keeps_base_and_upsampler_graphs(tmp_path, eager_capture):
    from glide_fixtures import tiny_options, write_checkpoint, write_glide_tokenizer

    n_vocab = write_glide_tokenizer(str(tmp_path / "tokenizer"))
    base, up = tiny_options(), tiny_options(upsampler=True)
    write_checkpoint(str(tmp_path / "base.pt"), base, n_vocab, seed=0)
    write_checkpoint(str(tmp_path / "up.pt"), up, n_vocab, seed=1)
    pipe = fastdiff.Pipeline.from_glide(str(tmp_path / "base.pt"), str(tmp_path / "up.pt"),
                                        tokenizer=str(tmp_path / "tokenizer"), options=base, upsampler_options=up)
    kw = dict(guidance_scale=3.0, num_inference_steps="4", upsample_steps="3", output_type="pt", progress=False)
    pipe.generate(["a corgi", "a red circle"], cuda_graph=True, seed=1, **kw)
    captured = pipe.graph_cache.captures
    assert len(pipe.graph_cache) == 2  # the base model's steps and the upsampler's
    again = pipe.generate(["a blue square", "a cat"], cuda_graph=True, seed=2, **kw)
    assert pipe.graph_cache.captures == captured
    assert torch.equal(again, pipe.generate(["a blue square", "a cat"], seed=2, **kw))


# ---------------------------------------------------------------------------------------
# Captures happen on the sample's device, not the current one (a mocked torch.cuda)


class FakeCuda(FakeCurrentDevice):
    """Records which device was current when each stream, pool and graph was made."""

    def __init__(self):
        super().__init__()
        self.made = []
        fake = self

        class Stream:
            def __init__(self, device=None):
                self.device = fake.current if device is None else torch.device(device).index
                fake.made.append(("stream", fake.current, self.device))

            def wait_stream(self, other):
                pass

        class CUDAGraph:
            def replay(self):
                pass

        self.Stream, self.CUDAGraph = Stream, CUDAGraph

    def graph_pool_handle(self):
        self.made.append(("pool", self.current, self.current))
        return object()

    def current_stream(self, device=None):
        stream = self.Stream.__new__(self.Stream)
        stream.device = self.current if device is None else torch.device(device).index
        return stream

    @contextlib.contextmanager
    def stream(self, stream):
        yield

    @contextlib.contextmanager
    def graph(self, graph, pool=None, stream=None):
        self.made.append(("capture", self.current, None if stream is None else stream.device))
        yield


def test_capture_runs_on_the_samples_device(monkeypatch):
    fake = FakeCuda()
    for name in ("device", "graph_pool_handle", "Stream", "current_stream", "stream", "CUDAGraph", "graph"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # forbid_host_sync's sync-debug switch

    capture = graphs_module.CUDAGraphCapture(torch.device("cuda", 1))
    seen = []
    capture(lambda: seen.append(fake.current) or (torch.zeros(1),))
    assert seen == [1, 1, 1], seen  # warm-up, guarded warm-up, capture: all with cuda:1 current
    assert fake.current == 0  # and the caller's device is current again afterwards
    # every pool, stream and the capture itself were made on cuda:1 (current device, then own device)
    assert fake.made and all(entry[1] == 1 and entry[2] == 1 for entry in fake.made), fake.made
    assert [entry[0] for entry in fake.made].count("capture") == 1
