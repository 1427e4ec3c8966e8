"""mistral-community/pixtral-12b."""

from configs.models import VQA_CHAT, model


def get_config():
  return model("pixtral_12b", "mistral-community/pixtral-12b",
               "llava", chat=True,
               vqa_prompt=VQA_CHAT,
               eoi="[IMG_END]")
