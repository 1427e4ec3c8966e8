"""lmms-lab/llama3-llava-next-8b."""

from configs.models import VQA_CHAT, model


def get_config():
  return model("llama3_llava_next_8b", "lmms-lab/llama3-llava-next-8b",
               "llava_next", chat=True,
               vqa_prompt=VQA_CHAT,
               eoi="none (newlines are image_break)")
