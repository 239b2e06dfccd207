"""The procedural scene grammar: wordings, places, the held-out split and the training mix."""
import argparse
import random

import pytest
import torch

from fastdiff.data.scenes import (PLACES, RELATION_PLACES, RELATIONS, SceneDataset, canonical, is_heldout,
                                  parse_caption, random_scene, render, sample_scenes, vocabulary)
from fastdiff.train.cli import add_train_parser, config_from_args
from fastdiff.train.config import ProceduralData, TrainConfig, preset, with_section
from fastdiff.train.data import ProceduralScenes

MIX = dict(place_prob=0.8, placed_pair_prob=0.3)  # the presets' mix, which trained the shipped model


def centre_of(scene, index, size=64):
    """(cx, cy) in [0, 1] of the pixels object `index` alone covers, from the render."""
    background = render(type(scene)((), None, scene.background), size)
    alone = render(type(scene)((scene.objects[index],), None, scene.background), size)
    mask = (alone != background).any(0)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return (xs.float().mean().item() + 0.5) / size, (ys.float().mean().item() + 0.5) / size


def in_place(centre, place):
    cx, cy = centre
    return {"top": cy < 0.35, "bottom": cy > 0.65, "left": cx < 0.35, "right": cx > 0.65}[place]


def test_default_mix_draws_the_stream_earlier_versions_drew():
    # the first scenes of seed 0 before place wordings existed (the shipped model's first run read these)
    assert [s.caption for s in sample_scenes(3, seed=0)] == [
        "a purple square", "a purple circle", "a blue triangle to the left of a purple circle"]
    assert all(s.places is None for s in sample_scenes(300, seed=1))


def test_every_wording_parses_back_to_its_scene():
    seen = set()
    for scene in sample_scenes(400, seed=2, **MIX):
        parsed = parse_caption(scene.caption)
        assert parsed.caption == scene.caption
        assert canonical(parsed) == canonical(scene)
        assert parsed.places == scene.places and parsed.relation == scene.relation
        seen.add((len(scene.objects), scene.places is not None))
    assert seen == {(1, False), (1, True), (2, False), (2, True)}


def test_place_words_say_where_the_objects_are_drawn():
    rng = random.Random(7)
    checked = {1: 0, 2: 0}
    while min(checked.values()) < 40:
        scene = random_scene(rng, place_prob=1.0, placed_pair_prob=1.0)
        assert scene.places is not None
        for index, place in enumerate(scene.places):
            assert in_place(centre_of(scene, index), place), (scene.caption, centre_of(scene, index))
        if len(scene.objects) == 2:  # the place wording agrees with the relation it stands for
            assert scene.places == RELATION_PLACES[scene.relation]
        checked[len(scene.objects)] += 1


def test_relation_captions_put_the_first_object_where_the_relation_says():
    for scene in sample_scenes(200, seed=3, split="heldout"):
        first_place, second_place = RELATION_PLACES[scene.relation]
        assert in_place(centre_of(scene, 0), first_place) and in_place(centre_of(scene, 1), second_place)


def test_placed_pairs_keep_the_heldout_split_unseen():
    train = sample_scenes(3000, seed=4, place_prob=1.0, placed_pair_prob=1.0)
    pairs = [s for s in train if len(s.objects) == 2]
    assert pairs and all(s.places is not None for s in pairs)
    for s in pairs:
        a, b = s.objects
        assert not is_heldout((a.color, a.shape), s.relation, (b.color, b.shape))
    heldout = sample_scenes(200, seed=4, split="heldout", **MIX)
    assert all(s.places is None and s.relation in RELATIONS for s in heldout)


def test_mix_shares_are_the_asked_ones():
    scenes = sample_scenes(4000, seed=5, two_object_prob=0.75, **MIX)
    singles = [s for s in scenes if len(s.objects) == 1]
    pairs = [s for s in scenes if len(s.objects) == 2]
    assert abs(len(singles) / len(scenes) - 0.25) < 0.03
    assert abs(sum(s.places is not None for s in singles) / len(singles) - 0.8) < 0.04
    assert abs(sum(s.places is not None for s in pairs) / len(pairs) - 0.3) < 0.03
    assert {s.places[0] for s in singles if s.places} == set(PLACES)


def test_bad_captions_and_mixes_are_refused():
    for caption in ("a red circle at the top and a blue square at the top",
                    "a red circle at the top and a blue square on the right",
                    "a red circle at the top and a blue square",
                    "a red circle on the left and a blue square on the right and a red square at the top",
                    "a red hexagon on the left", "at the top"):
        with pytest.raises(ValueError, match="not a scene caption"):
            parse_caption(caption)
    for name in ("two_object_prob", "place_prob", "placed_pair_prob"):
        with pytest.raises(ValueError, match=name):
            random_scene(random.Random(0), **{name: 1.5})


def test_vocabulary_holds_every_word_of_every_wording():
    words = set(vocabulary())
    for scene in sample_scenes(500, seed=6, **MIX):
        assert set(scene.caption.split()) <= words
    assert {"top", "bottom", "on", "at", "and"} <= words


def test_training_stream_follows_the_configured_mix():
    stream = ProceduralScenes(16, seed=8, **MIX)
    images, captions = stream.next_batch(6)
    for (image, caption), got_image, got_caption in zip(SceneDataset(size=16, seed=8, **MIX), images, captions):
        assert caption == got_caption and torch.equal(image, got_image)
    captions = stream.next_batch(200)[1]
    assert any(" and " in c for c in captions) and any(c.endswith(("left", "right", "top", "bottom"))
                                                        and " and " not in c for c in captions)


def test_train_config_carries_the_mix():
    assert preset("default").procedural == preset("tiny").procedural == ProceduralData(**MIX)
    cfg = with_section(preset("tiny"), "procedural", place_prob=0.5, placed_pair_prob=0.2)
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again.procedural == cfg.procedural
    old = cfg.to_dict()
    del old["procedural"]  # a config saved before the mix was a setting: its run drew relation captions only
    assert TrainConfig.from_dict(old).procedural == ProceduralData(place_prob=0.0, placed_pair_prob=0.0)
    with pytest.raises(ValueError, match="procedural.place_prob"):
        with_section(preset("tiny"), "procedural", place_prob=2.0)
    parser = argparse.ArgumentParser(prog="fastdiff")
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "-o", "x", "--place-prob", "0.8", "--placed-pair-prob", "0.3"])
    assert config_from_args(args).procedural.place_prob == 0.8
    assert config_from_args(args).procedural.placed_pair_prob == 0.3
