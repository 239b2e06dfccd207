"""The scene judge and the attribute-accuracy evaluation built on it (CPU, about half a minute)."""
import argparse
import dataclasses
import json
import os

import pytest
import torch

from fastdiff.data.scenes import COLORS, SHAPES, canonical, render, sample_scenes
from fastdiff.eval.attributes import attribute_scores, evaluate, format_table, image_grid, score_one
from fastdiff.eval.cli import add_eval_parser
from fastdiff.eval.judge import LAYOUTS, Judge, measure_judge, train_judge


@pytest.fixture(scope="module")
def trained_judge():
    # 300 steps of 32 scenes: about 15 s on two CPU cores, and already well past chance.
    return train_judge(steps=300, batch_size=32, seed=7, progress=False)


def swap_positions(scene):
    """The same two objects, each drawn where the other should be: right attributes, wrong order."""
    first, second = scene.objects
    moved_first = dataclasses.replace(first, cx=second.cx, cy=second.cy)
    moved_second = dataclasses.replace(second, cx=first.cx, cy=first.cy)
    return dataclasses.replace(scene, objects=(moved_first, moved_second))


class RenderingPipeline:
    """Stands in for a text-to-image pipeline: returns the ground-truth render of each caption's scene
    (in [0, 1], at `size`), or the render with the objects' places exchanged at `swap_at_scale`."""

    def __init__(self, scenes, size=64, swap_at_scale=None):
        self.scenes = {scene.caption: scene for scene in scenes}
        self.size, self.swap_at_scale, self.calls = size, swap_at_scale, []

    def generate(self, captions, guidance_scale, num_inference_steps, seed, output_type, **options):
        self.calls.append(dict(n=len(captions), guidance_scale=guidance_scale, steps=num_inference_steps, seed=seed,
                               output_type=output_type, **options))
        scenes = [self.scenes[caption] for caption in captions]
        if guidance_scale == self.swap_at_scale:
            scenes = [swap_positions(scene) for scene in scenes]
        return (torch.stack([render(scene, self.size) for scene in scenes]) + 1) / 2


class LookupJudge:
    """Reads a rendered image exactly, by looking it up: checks evaluate's wiring with exact numbers.
    Keys are the image times 100, rounded: every palette value is a multiple of 0.01."""

    def __init__(self, scenes):
        self.table = {}
        for scene in scenes:
            target = canonical(scene)
            self.table[self.key(render(scene))] = target
            swapped = dict(target, objects=target["objects"][::-1])
            self.table[self.key(render(swap_positions(scene)))] = swapped

    @staticmethod
    def key(image):
        return (image * 100).round().to(torch.int16).numpy().tobytes()

    def predict(self, images):
        return [self.table[self.key(image)] for image in images]


def test_judge_predicts_well_formed_canonical_dicts():
    judge = train_judge(steps=3, batch_size=8, progress=False)
    scenes = sample_scenes(6, seed=3, split="train")
    images = torch.stack([render(scene) for scene in scenes])
    for batch in (images, torch.nn.functional.interpolate(images, size=(48, 48))):  # other sizes are resized
        predictions = judge.predict(batch)
        assert len(predictions) == len(scenes)
        for prediction in predictions:
            assert set(prediction) == {"layout", "objects"}
            assert prediction["layout"] in LAYOUTS
            assert len(prediction["objects"]) == (1 if prediction["layout"] == "single" else 2)
            for shape, color in prediction["objects"]:
                assert shape in SHAPES and color in COLORS
    with pytest.raises(ValueError, match="expected images"):
        judge.predict(images[:, :1])


def test_short_trained_judge_reads_real_scenes_well_above_chance(trained_judge):
    # Chance is 1/3 for layout and shape and 1/5 for colour; the packaged judge (1500 steps) reaches >= 99%.
    for split, seed in (("train", 101), ("heldout", 102)):
        accuracy = measure_judge(trained_judge, n=300, seed=seed, split=split)
        assert min(accuracy.values()) > 0.85, (split, accuracy)


def test_save_load_round_trip_gives_identical_predictions(trained_judge, tmp_path):
    trained_judge.save(str(tmp_path))
    loaded = Judge.load(str(tmp_path))
    images = torch.stack([render(scene) for scene in sample_scenes(32, seed=5, split="heldout")])
    with torch.no_grad():
        want, got = trained_judge.eval()(images), loaded(images)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert loaded.predict(images) == trained_judge.predict(images)
    assert os.path.getsize(tmp_path / "judge.safetensors") < 2_000_000
    assert json.loads((tmp_path / "judge.json").read_text())["training"]["steps"] == 300


def test_load_refuses_a_judge_trained_for_another_vocabulary(trained_judge, tmp_path):
    trained_judge.save(str(tmp_path))
    config = json.loads((tmp_path / "judge.json").read_text())
    config["shapes"] = list(reversed(config["shapes"]))
    (tmp_path / "judge.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="retrain"):
        Judge.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="judge.json"):
        Judge.load(str(tmp_path / "missing"))


def test_scores_follow_their_definitions():
    target = {"layout": "vertical", "objects": [("circle", "red"), ("square", "blue")]}

    def scores(layout, objects):
        return score_one({"layout": layout, "objects": objects}, target)

    assert scores("vertical", [("circle", "red"), ("square", "blue")]) == dict(
        shape=1, colour=1, layout=1, position=1, all=1, bound=1)
    assert scores("vertical", [("square", "blue"), ("circle", "red")]) == dict(  # right objects, swapped
        shape=0, colour=0, layout=1, position=0, all=0, bound=1)
    assert scores("horizontal", [("circle", "red"), ("square", "blue")]) == dict(
        shape=1, colour=1, layout=0, position=0, all=0, bound=1)
    assert scores("vertical", [("circle", "red"), ("square", "green")]) == dict(  # one wrong colour, order kept
        shape=1, colour=0.5, layout=1, position=1, all=0, bound=0)
    assert scores("vertical", [("square", "red"), ("circle", "blue")])["position"] == 0  # a tie is not an order
    assert scores("vertical", [("square", "red"), ("circle", "blue")])["bound"] == 0  # colours on the wrong shapes
    assert scores("single", [("circle", "red")]) == dict(shape=0.5, colour=0.5, layout=0, position=0, all=0,
                                                         bound=0)
    assert attribute_scores([target, target], [target, target])["all"] == 1


def test_evaluate_wiring_gives_exact_scores_with_a_lookup_judge():
    n, scales = 12, (1, 3, 8)
    scenes = sample_scenes(n, seed=4, split="heldout")
    pipe = RenderingPipeline(scenes, swap_at_scale=8.0)
    results = evaluate(pipe, LookupJudge(scenes), n=n, guidance_scales=scales, steps=3, seed=4, batch_size=5,
                       progress=False, keep_images=2)
    assert results["captions"] == [scene.caption for scene in scenes]
    assert results["real"] == results["scales"][1.0] == results["scales"][3.0] == dict(
        shape=1, colour=1, layout=1, position=1, all=1, bound=1)
    # At scale 8 every image has its objects exchanged: layout right, order wrong, and a slot's shape or
    # colour right only where the two objects happen to share it.
    targets = [canonical(scene)["objects"] for scene in scenes]
    same_shape = sum(a[0] == b[0] for a, b in targets) / n
    same_colour = sum(a[1] == b[1] for a, b in targets) / n
    assert results["scales"][8.0] == pytest.approx(dict(shape=same_shape, colour=same_colour, layout=1,
                                                        position=0, all=0, bound=1))
    # Batches of 5, 5 and 2 at each scale; a batch's seed is the same at every scale.
    assert [call["n"] for call in pipe.calls] == [5, 5, 2] * 3
    assert [call["seed"] for call in pipe.calls] == [4, 9, 14] * 3
    assert {(c["guidance_scale"], c["steps"], c["output_type"], c["progress"]) for c in pipe.calls} == {
        (1.0, 3, "pt", False), (3.0, 3, "pt", False), (8.0, 3, "pt", False)}
    assert [tuple(v.shape) for v in results["samples"].values()] == [(2, 3, 64, 64)] * 4


def test_evaluate_with_a_trained_judge_on_rendered_images(trained_judge):
    n = 40
    scenes = sample_scenes(n, seed=9, split="heldout")
    pipe = RenderingPipeline(scenes, size=96)  # not 64: evaluate resizes for the judge
    results = evaluate(pipe, trained_judge, n=n, guidance_scales=(2, 5), steps=1, seed=9, sampler="ddim",
                       batch_size=16, progress=False)
    assert all(call["sampler"] == "ddim" for call in pipe.calls)
    for metrics in [results["real"], *results["scales"].values()]:
        assert min(metrics.values()) > 0.8, metrics
    table = format_table(results)
    lines = table.splitlines()
    assert lines[0].startswith("| guidance scale |") and "all correct" in lines[0]
    assert len(lines) == 2 + 1 + 2
    assert lines[2].startswith("| real images (judge) |")
    assert lines[3].startswith("| 2 |") and lines[4].startswith("| 5 |")


def test_image_grid_lays_out_tiles_with_captions():
    images = torch.rand(3, 3, 64, 64)
    grid = image_grid(images, ["a red circle above a blue square", "a green triangle", "x"], columns=2)
    assert grid.mode == "RGB"
    assert grid.width > 2 * 128 and grid.height > 2 * 128  # two rows of 2x-upscaled tiles plus captions
    with pytest.raises(ValueError, match="one caption per image"):
        image_grid(images, ["only one"])


def parse_eval(argv):
    parser = argparse.ArgumentParser(prog="fastdiff")
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


def test_eval_cli_parses_and_fails_clearly_without_a_model(tmp_path, capsys, monkeypatch):
    import fastdiff

    args = parse_eval(["--n", "5", "--scales", "1", "4", "--judge", str(tmp_path / "judge")])
    assert args.model is None and args.scales == [1.0, 4.0] and args.n == 5 and args.steps == 30

    class NoDefaultModel:
        def __init__(self):
            raise RuntimeError("no default model is bundled")

    monkeypatch.setattr(fastdiff, "Pipeline", NoDefaultModel)
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "built-in default model" in err and "no default model is bundled" in err
    assert not (tmp_path / "judge").exists()  # the model is loaded first: no judge trained for nothing
    monkeypatch.undo()
    args = parse_eval(["--model", str(tmp_path / "no-such-model")])
    assert args.func(args) == 2
    assert "could not load" in capsys.readouterr().err
    args = parse_eval(["--n", "0"])
    assert args.func(args) == 2
    assert "--n must be positive" in capsys.readouterr().err
