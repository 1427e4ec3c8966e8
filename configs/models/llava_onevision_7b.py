"""llava-hf/llava-onevision-qwen2-7b-ov-hf."""

from configs.models import VQA_CHAT, model


def get_config():
  return model("llava_onevision_7b", "llava-hf/llava-onevision-qwen2-7b-ov-hf",
               "llava_onevision", chat=True,
               vqa_prompt=VQA_CHAT,
               eoi="<|im_end|> when the prompt wraps the image as <|im_start|><image><|im_end|>")
