"""synth: config-driven image synthesis on diffusers pipelines."""
