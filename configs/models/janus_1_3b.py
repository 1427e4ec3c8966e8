"""deepseek-ai/Janus-1.3B."""

from configs.models import VQA_CHAT, model


def get_config():
  return model("janus_1_3b", "deepseek-ai/Janus-1.3B",
               "janus", chat=True,
               vqa_prompt=VQA_CHAT,
               eoi="<end_of_image>")
