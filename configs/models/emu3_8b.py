"""BAAI/Emu3-Gen-hf."""

from configs.models import VQA_CHAT, model


def get_config():
  return model("emu3_8b", "BAAI/Emu3-Gen-hf",
               "emu3", chat=True,
               vqa_prompt=VQA_CHAT,
               eoi="<|extra_201|> (end of frame) and <|image end|>")
