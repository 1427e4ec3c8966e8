"""facebook/chameleon-30b."""

from configs.models import VQA_NATIVE, model


def get_config():
  return model("chameleon_30b", "facebook/chameleon-30b",
               "chameleon", chat=False,
               vqa_prompt=VQA_NATIVE,
               eoi="<eoss>")
