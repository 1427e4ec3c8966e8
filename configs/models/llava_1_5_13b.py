"""liuhaotian/llava-v1.5-13b."""

from configs.models import VQA_CHAT, model


def get_config():
  return model("llava_1_5_13b", "liuhaotian/llava-v1.5-13b",
               "llava", chat=True,
               vqa_prompt=VQA_CHAT,
               eoi="none (no boundary tokens)")
