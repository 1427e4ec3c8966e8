"""narrowgate-jax: how vision-language models pass information from image tokens to text tokens.

  import narrowgate_jax as ng
  vlm = ng.load(path)
  batch = vlm.prepare(prompts=["The capital of France is"])
  out = vlm.forward(batch, capture=ng.Capture(resid=True, attn=True))
"""

from narrowgate_jax.capture import Capture, Output
from narrowgate_jax.distributed import make_mesh
from narrowgate_jax.generate import GenerateOutput
from narrowgate_jax.interventions import (Conditions, Interventions, Knockout, Patch, knockout,
                                          no_knockout, patch, stack_conditions, steer)
from narrowgate_jax.model import VLM, load
from narrowgate_jax.models.config import DecoderConfig
from narrowgate_jax.processing.batch import Batch
from narrowgate_jax.processing.roles import Role

__all__ = [
    "Batch", "Capture", "Conditions", "DecoderConfig", "GenerateOutput", "Interventions",
    "Knockout", "Output", "Patch", "Role", "VLM", "knockout", "load", "make_mesh", "no_knockout",
    "patch", "stack_conditions", "steer",
]
