"""Loading weights and configs from local paths (never from the network).

Per family: ``loaders.stable_diffusion`` (load_folder, load_single_file), ``loaders.vq_diffusion``
(load_folder), ``loaders.glide`` (load_glide_model). ``load_single_file`` exported here is the
LDM-layout converter of ``loaders.single_file`` (state dicts and configs, no modules).
"""
from .files import CheckpointError, check_weights, find_weights, load_state_dict_file
from .quiet import quiet_loading
from .single_file import convert_ldm_checkpoint, load_single_file, to_ldm_checkpoint

__all__ = ["CheckpointError", "check_weights", "find_weights", "load_state_dict_file", "quiet_loading"]
__all__ += ["convert_ldm_checkpoint", "load_single_file", "to_ldm_checkpoint"]
