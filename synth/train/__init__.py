"""LoRA training with Lightning: `from synth.train import train; train(cfg)` is what `python train.py` runs."""


def train(cfg):
    """Train a LoRA as cfg says (see synth.train.run.train); imported lazily so input checks stay light."""
    from synth.train.run import train as run

    return run(cfg)
