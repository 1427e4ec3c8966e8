"""liuhaotian/llava-v1.6-vicuna-7b."""

from configs.models import VQA_CHAT, model


def get_config():
  return model("llava_v1_6_vicuna_7b", "liuhaotian/llava-v1.6-vicuna-7b",
               "llava_next", chat=True,
               vqa_prompt=VQA_CHAT,
               eoi="none (newlines are image_break)")
