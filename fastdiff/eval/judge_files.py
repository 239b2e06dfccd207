"""Where a saved judge's files are, without torch: the CLI's defaults read them from here."""
import os

WEIGHTS_FILE, CONFIG_FILE = "judge.safetensors", "judge.json"
# The packaged judge (judge_weights/README.md): what `fastdiff eval` and Judge.load() read by default.
DEFAULT_JUDGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "judge_weights")
