"""First-token knockout (experiments/first_token.py): p(answer's first token) at the last prompt
position, clean and with attention from the last position (or the whole text) to the image, the
end-of-image token and the question knocked out.

  python -m experiments.run --config=configs/experiments/first_token_knockout.py:llava_1_5_7b \
      --config.data.path=data/gqa_subset --workdir=results/first_token_llava
"""

import ml_collections

from configs.experiments import run_config


def get_config(model: str = "local") -> ml_collections.ConfigDict:
  config = run_config("first_token_knockout", model)
  config.experiment_config.conditions = dict(
      image_to_last=dict(keys="image", queries="last", layers="all", mode="pre_softmax"),
      question_to_last=dict(keys="question", queries="last", layers="all", mode="pre_softmax"),
      image_to_text_post=dict(keys=["image", "image_break"], queries="text_after_image",
                              layers="all", mode="post_softmax"),
  )
  return config
