"""Loading weights and configs from local paths (never from the network)."""
from .files import CheckpointError, find_weights, load_state_dict_file
from .single_file import convert_ldm_checkpoint, load_single_file, to_ldm_checkpoint

__all__ = ["CheckpointError", "find_weights", "load_state_dict_file"]
__all__ += ["convert_ldm_checkpoint", "load_single_file", "to_ldm_checkpoint"]
