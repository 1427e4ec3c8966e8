"""Any converted checkpoint on disk: set its path (`--config.model.path=DIR`); plain prompts."""

from configs.models import model


def get_config():
  config = model("local", "", "", chat=False, eoi="the family's end-of-image token(s)",
                 dtype="float32")
  config.path = ""
  return config
