"""facebook/chameleon-7b."""

from configs.models import VQA_NATIVE, model


def get_config():
  return model("chameleon_7b", "facebook/chameleon-7b",
               "chameleon", chat=False,
               vqa_prompt=VQA_NATIVE,
               eoi="<eoss> right after the last image token")
