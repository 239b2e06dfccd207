"""Evaluation: an independent judge of scene images and the attribute-accuracy metrics built on it.

    from fastdiff.eval import Judge, evaluate, format_table
    results = evaluate(pipe, Judge.load(), n=200, guidance_scales=(1, 3, 5, 8))
    print(format_table(results))

    # batch generation for the reference studies' metrics, then the metrics (see README's Evaluation)
    sample_images(pipe, load_prompts("captions_val2014.json", n=10000), "runs/sd", batch_size=8)
    evaluate_run("runs/sd", Scorers(inception=load_inception("pt_inception-2015-12-05-6726825d.pth")),
                 reference="val2014/")

Names are resolved on first use, so `python -m fastdiff.eval.judge` runs its module once
(importing it here eagerly would load it twice and make runpy warn).
"""
from .._lazy import lazy_names

_EXPORTS = {"Judge": "judge", "train_judge": "judge", "DEFAULT_JUDGE_DIR": "judge_files",
            "evaluate": "attributes", "attribute_scores": "attributes", "format_table": "attributes",
            "image_grid": "attributes",
            "sample_images": "batch", "read_run": "batch", "image_seed": "batch", "load_prompts": "prompts",
            "Ranks": "distributed", "evaluate_run": "metrics", "Scorers": "metrics", "Settings": "metrics",
            "load_inception": "inception", "ClipScorer": "image_metrics"}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
