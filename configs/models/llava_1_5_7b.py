"""liuhaotian/llava-v1.5-7b."""

from configs.models import VQA_CHAT, model


def get_config():
  return model("llava_1_5_7b", "liuhaotian/llava-v1.5-7b",
               "llava", chat=True,
               vqa_prompt=VQA_CHAT,
               eoi="none (no boundary tokens)")
