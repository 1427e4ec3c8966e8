"""Every family's language model against transformers' PyTorch implementation, in float32.

For each tiny config: random weights -> save_pretrained -> our converter -> ng.load, then the same
left-padded batch of two prompts of different lengths through both. Compared over real (non-pad)
positions with `reference.relative_error` (max |ours - theirs| / max |theirs|), at every site:
logits, the residual stream after every layer, and every layer's attention probabilities.
"""

import numpy as np
import pytest
import torch

import narrowgate_jax as ng
import reference as R

TOLERANCE = 1e-4
FAMILIES = {
    "llama": R.tiny_llama,
    "llama3_rope": R.tiny_llama3,
    "mistral_sliding_window": R.tiny_mistral,  # window 5 < 12 tokens
    "qwen2_biases_tied": R.tiny_qwen2,
    "chameleon_7b_blocks": R.tiny_chameleon,
    "chameleon_34b_swin_norm": lambda: R.tiny_chameleon(swin_norm=True),
    "emu3_text": R.tiny_emu3_text,
    "janus_lm": R.tiny_janus,
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
  """(our model, transformers model, batch, transformers outputs, last layer's raw output)."""
  hf_config = FAMILIES[request.param]()
  config = getattr(hf_config, "text_config", None) or hf_config  # the language model's part
  tmp = tmp_path_factory.mktemp(request.param)
  torch_model = R.build(hf_config, tmp / "hf")
  vlm = R.convert_and_load(tmp / "hf", tmp / "ng")
  assert config.num_attention_heads // config.num_key_value_heads >= 2  # GQA is exercised
  batch = vlm.prepare(token_ids=R.two_prompts(config.vocab_size, lengths=(12, 7)))
  ids, mask, pos = R.torch_inputs(batch)
  last_layer_out = {}

  def keep_output(module, args, out):  # returns None: the output is left as it is
    last_layer_out["x"] = out[0] if isinstance(out, tuple) else out

  hook = R.decoder_layers(torch_model)[-1].register_forward_hook(keep_output)
  with torch.no_grad():
    ref = torch_model(input_ids=ids, attention_mask=mask, position_ids=pos,
                      output_hidden_states=True, output_attentions=True)
  hook.remove()
  return vlm, batch, ref, last_layer_out["x"].numpy()


def _real(batch):
  return np.asarray(batch.attention_mask)


def test_logits(pair):
  vlm, batch, ref, _ = pair
  ours = np.asarray(vlm.forward(batch).logits)  # fused attention path
  theirs = ref.logits.numpy()
  suppressed = theirs <= np.finfo(np.float32).min  # Chameleon's image-token logits
  np.testing.assert_array_equal(ours <= np.finfo(np.float32).min, suppressed)
  keep = _real(batch)[..., None] & ~suppressed
  assert R.relative_error(ours, theirs, keep) < TOLERANCE


def test_residual_stream_every_layer(pair):
  vlm, batch, ref, last_layer_out = pair
  out = vlm.forward(batch, capture=ng.Capture(resid=True))
  resid = np.asarray(out.resid)
  num_layers = vlm.num_layers
  assert resid.shape[0] == num_layers + 1
  # transformers' hidden_states: embeddings, outputs of layers 0..L-2, then the final-normed
  # output; ours stays before the final norm, so the last layer is compared with a hook's capture.
  for layer in range(num_layers):
    theirs = ref.hidden_states[layer].numpy()
    assert R.relative_error(resid[layer], theirs, _real(batch)) < TOLERANCE, f"resid[{layer}]"
  assert R.relative_error(resid[num_layers], last_layer_out, _real(batch)) < TOLERANCE
  np.testing.assert_allclose(out.logits, vlm.forward(batch).logits, rtol=1e-5, atol=1e-5)


def test_attention_probabilities_every_layer(pair):
  vlm, batch, ref, _ = pair
  attn = np.asarray(vlm.forward(batch, capture=ng.Capture(attn=True)).attn)
  assert attn.shape[0] == vlm.num_layers
  real_queries = np.broadcast_to(_real(batch)[:, None, :, None], attn.shape[1:])
  for layer in range(vlm.num_layers):
    theirs = ref.attentions[layer].numpy()
    assert R.relative_error(attn[layer], theirs, real_queries) < TOLERANCE, f"attn[{layer}]"


def test_attention_subset_of_layers(pair):
  vlm, batch, ref, _ = pair
  attn = np.asarray(vlm.forward(batch, capture=ng.Capture(attn=True, attn_layers=[2, 0])).attn)
  real_queries = np.broadcast_to(_real(batch)[:, None, :, None], attn.shape[1:])
  for slot, layer in enumerate([2, 0]):
    assert R.relative_error(attn[slot], ref.attentions[layer].numpy(), real_queries) < TOLERANCE
