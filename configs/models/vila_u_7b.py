"""mit-han-lab/vila-u-7b-256: LLaMA-2-7B with the RQ-VAE SigLIP tower, 256 image tokens.

Converted from the released llm/, vision_tower/, mm_projector/ layout
(`checkpoints_convert.vila_u`).
Each "<image>" becomes <im_start> [256 features] <im_end>, as the Narrow Gate study prompts it
(hf_config.json's wrap_image); chat=True is VILA-U's vicuna_v1 template
(`models.vila_u.CHAT_TEMPLATE`).
"""

from configs.models import VQA_CHAT, model


def get_config():
  return model("vila_u_7b", "mit-han-lab/vila-u-7b-256",
               "vila_u", chat=True,
               vqa_prompt=VQA_CHAT,
               eoi="<im_end> (the image is wrapped as <im_start> [256 tokens] <im_end>)")
