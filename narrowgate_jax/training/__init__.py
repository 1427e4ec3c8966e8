"""Training: a resumable, deterministic optimisation loop (`loop.train`) and LoRA adapters on the
decoder's stacked kernels (`lora`). Import the submodules themselves; nothing is imported here, so
one submodule never needs another to load."""
