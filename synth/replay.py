"""`replay=image.png`: the config stored in a synth PNG, with the command line's other overrides on top."""

from __future__ import annotations

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from synth.images import read_config


def replay_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The stored config of cfg.replay, with every key the other overrides touched taken from cfg.

    cfg is the config Hydra composed from the same command line, so a group override (model=sd3) or a
    key override (seed=5, model.t5=false) already holds its composed value there; copying those values
    over the stored, fully resolved config regenerates the image exactly unless something was changed.
    """
    stored = read_config(cfg.replay)
    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith(("replay=", "+replay="))])
    with open_dict(stored):
        for override in parsed:
            key = override.key_or_group
            if key.startswith("hydra.") or key == "hydra":
                continue
            if override.is_delete():
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(stored, parent) if parent else stored
                if node is not None and leaf in node:
                    del node[leaf]
                continue
            OmegaConf.update(stored, key, OmegaConf.select(cfg, key), merge=False, force_add=True)
        stored.output_dir = cfg.output_dir
        stored.replay = None
    return stored
