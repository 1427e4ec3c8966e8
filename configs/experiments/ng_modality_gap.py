"""Narrow Gate Fig. 2: the modality gap in the residual stream, on captioned images.

  --config=configs/experiments/ng_modality_gap.py:<model> \
      --config.data.path=<dataset_flickr30k.json> --config.data.images=<flickr30k-images>
"""

import ml_collections

from configs.experiments import run_config


def get_config(model: str = "chameleon_7b") -> ml_collections.ConfigDict:
  config = run_config("ng_modality_gap", model)
  config.data = ml_collections.ConfigDict(dict(
      format="karpathy", path="data/karpathy/dataset_flickr30k.json", images="data/flickr30k",
      split="test", first=0, prompt="", limit=0))
  config.experiment_config = ml_collections.ConfigDict(dict(
      absolute=True,  # |cos| as the later code; False: the first version's signed cosine
      resize=256,  # images resized to resize x resize (bilinear) first; 0: as they are
      # ADP homogeneity (analysis.adp, DADApy's pipeline): cosine kNN up to maxk neighbours
      # (needs more than maxk points per layer: 2 x examples), GRIDE intrinsic dimension at
      # ranks up to gride_range_max (<= maxk) and scale gride_scale (2^i-th vs 2^(i+1)-th
      # neighbour), kNN density with density_k neighbours, peaks merged at confidence z.
      maxk=128, gride_range_max=128, gride_scale=3, density_k=16, z=1.65,
  ))
  config.batch_size = 4  # examples per batch; each is two rows (image first, captions first)
  return config
