"""Every supported checkpoint by name: where its converted copy lives, its family, and how the
studies prompted it. An experiment config takes a model by name (`configs.models.get`); any
field can be overridden on the command line (`--config.model.path=...`).

Fields:
  name            our name for it
  hf_id           the Hugging Face id the studies used (what to download and convert)
  family          the converter's family (`model_type`)
  path            the converted checkpoint (default checkpoints/<name>; convert with
                  `python -m checkpoints_convert.convert --hf_dir=... --out_dir=...`)
  dtype           compute dtype ("bfloat16" for the released sizes, "float32" for parity)
  chat            whether prompts go through the checkpoint's chat template (`prepare(chat=)`)
  vqa_prompt      the study's short-answer prompt ({question} filled in)
  caption_prompt  the study's captioning prompt
  eoi             what the "eoi" selector picks for this family (documentation)
"""

from __future__ import annotations

import importlib

import ml_collections

VQA_NATIVE = "<image>{question}\nAnswer the question using a single word or phrase. Answer:"
VQA_CHAT = "<image>\n{question} \nAnswer the question using a single word or phrase."
CAPTION = "<image>Provide a one-sentence caption for the provided image."


def model(name: str, hf_id: str, family: str, *, chat: bool, eoi: str,
          vqa_prompt: str = VQA_CHAT, caption_prompt: str = CAPTION,
          dtype: str = "bfloat16") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name=name, hf_id=hf_id, family=family, path=f"checkpoints/{name}", dtype=dtype, chat=chat,
      vqa_prompt=vqa_prompt, caption_prompt=caption_prompt, eoi=eoi))


def get(name: str) -> ml_collections.ConfigDict:
  """The model config of `name` (a module of this package: configs/models/<name>.py)."""
  try:
    module = importlib.import_module(f"configs.models.{name}")
  except ModuleNotFoundError:
    import pkgutil

    known = sorted(m.name for m in pkgutil.iter_modules(__path__))
    raise ValueError(f"unknown model {name!r}; known: {', '.join(known)}") from None
  return module.get_config()
