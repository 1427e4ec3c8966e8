"""The vision towers (CLIP, SigLIP, Janus), LLaVA's projector and Janus's aligner against
transformers, on tiny random models built in code.

The towers are built inside their VLMs (LlavaForConditionalGeneration with a CLIP or a SigLIP
tower, JanusForConditionalGeneration) and written with save_pretrained, so the parameters are
read from real checkpoint files, under the prefixes those files have, through the same
`vit_tensor_sources` / `*_tensor_sources` tables the converter uses. LayerNorm weights and every
bias are randomised (they start at 1 and 0, which would hide a swapped scale/bias or a missing
bias).

Every comparison is float32, relative error ≤ 1e-4 (max |ours - theirs| / max |theirs|).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from narrowgate_jax.models import projectors as pj
from narrowgate_jax.models import layers, vit
from narrowgate_jax.models.families import iter_layer_keys, params_from_state

TOL = 1e-4  # relative: max |ours - theirs| / max |theirs|
TEXT = dict(model_type="llama", vocab_size=64, hidden_size=48, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# 3 layers, so layer -2 is a middle one; 28 px in 7 px patches: a 4 x 4 grid (16 patches)
TOWER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=28,
             patch_size=7)
CLIP = dict(model_type="clip_vision_model", intermediate_size=48, projection_dim=16, **TOWER)
SIGLIP = dict(model_type="siglip_vision_model", intermediate_size=48, **TOWER)
JANUS_VISION = dict(mlp_ratio=1.5, projection_dim=48, depth=3, **TOWER)  # aligner of 3 linears
JANUS_VQ = dict(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1, 1],
                latent_channels=8, resolution=32, num_res_blocks=1, attn_resolutions=[],
                projection_dim=48, image_token_embed_dim=48)
# Checkpoint keys no table reads, on purpose: SigLIP's attention-pooling head (no VLM uses it).
SKIPPED = {"siglip_vision_model": ("head.",)}


def relative_error(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs| (tests/reference.py's norm; kept here so this file
  imports only the modules it tests)."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


def _randomise(model: torch.nn.Module, seed: int) -> None:
  """Norm weights start at exactly 1 and biases at 0, which would hide a scale/bias mix-up or a
  dropped bias: perturb them all. Linear weights are redrawn with std 1/sqrt(fan_in) (torch's
  inits use ~0.02), so pre-activations are of order 1, where the activation's form (quick_gelu,
  exact or tanh GELU) changes the output."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.Linear):
        module.weight.normal_(0.0, module.in_features**-0.5, generator=gen)
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.2 * torch.randn(p.shape, generator=gen))


def _pixels(seed: int, side: int = 28) -> np.ndarray:
  """Two images [2, 3, R, R] (channels-first, as transformers takes them)."""
  return np.random.default_rng(seed).normal(size=(2, 3, side, side)).astype(np.float32)


def _nhwc(pixels: np.ndarray) -> jax.Array:
  return jnp.asarray(pixels.transpose(0, 2, 3, 1))


def _saved(model, directory) -> tuple[dict, dict]:
  """save_pretrained -> (the file's tensors as numpy, config.json as a dict)."""
  model.save_pretrained(directory)
  with open(directory / "config.json") as f:
    return load_file(str(directory / "model.safetensors")), json.load(f)


def _llava(vision: dict, tmp_path_factory, seed: int, **kw):
  config = transformers.LlavaConfig(vision_config=vision, text_config=TEXT, **kw)
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.LlavaForConditionalGeneration(config).float().eval()
  _randomise(model, seed + 1)
  state, config_json = _saved(model, tmp_path_factory.mktemp("llava") / "hf")
  return model, state, config_json


@pytest.fixture(scope="module")
def clip_llava(tmp_path_factory):
  """LLaVA-1.5 style: CLIP tower, feature layer -2 with the CLS token dropped."""
  return _llava(CLIP, tmp_path_factory, seed=0, vision_feature_layer=-2,
                vision_feature_select_strategy="default")


@pytest.fixture(scope="module")
def siglip_llava(tmp_path_factory):
  """OneVision style: SigLIP tower, every token ("full"), here two feature layers concatenated."""
  return _llava(SIGLIP, tmp_path_factory, seed=10, vision_feature_layer=[-3, -1],
                vision_feature_select_strategy="full")


@pytest.fixture(scope="module")
def janus(tmp_path_factory):
  config = transformers.JanusConfig(text_config=transformers.LlamaConfig(
      **{k: v for k, v in TEXT.items() if k != "model_type"}), vision_config=JANUS_VISION,
      vq_config=JANUS_VQ)
  config._attn_implementation = "eager"
  torch.manual_seed(20)
  model = transformers.JanusForConditionalGeneration(config).float().eval()
  _randomise(model, 21)
  state, config_json = _saved(model, tmp_path_factory.mktemp("janus") / "hf")
  return model, state, config_json


# (fixture, where the tower sits in the file, the tower module in the torch model)
TOWERS = {
    "clip": ("clip_llava", "vision_tower.", lambda m: m.model.vision_tower),
    "siglip": ("siglip_llava", "vision_tower.", lambda m: m.model.vision_tower),
    "janus": ("janus", "model.vision_model.", lambda m: m.model.vision_model),
}


def _tower(request, name):
  fixture, prefix, module = TOWERS[name]
  model, state, config_json = request.getfixturevalue(fixture)
  tower = module(model)
  config = vit.ViTConfig.from_hf(tower.config)
  assert vit.find_prefix(state, vit.LLAVA_PREFIXES + vit.JANUS_PREFIXES) == prefix
  params = params_from_state(vit.vit_tensor_sources(config, prefix),
                                 vit.vit_param_shapes(config), state, config.num_layers)
  return model, tower, config, params, state, config_json


def test_configs_read_every_family_difference(request):
  expected = {  # class token, pre-norm, patch bias, normed last state, act, F, eps
      "clip": (True, True, False, False, "quick_gelu", 48, 1e-5),
      "siglip": (False, False, True, True, "gelu_pytorch_tanh", 48, 1e-6),
      "janus": (False, False, True, True, "gelu", 48, 1e-6),  # F = int(32 * 1.5)
  }
  for name, (fixture, _, module) in TOWERS.items():
    model, _, config_json = request.getfixturevalue(fixture)
    config = vit.ViTConfig.from_hf(module(model).config)
    assert (config.class_token, config.pre_norm, config.patch_bias, config.normed_last_state,
            config.hidden_act, config.intermediate_size, config.norm_eps) == expected[name], name
    assert config.num_patches == 16 and config.num_positions == 16 + config.class_token
    # config.json's sub-config (a dict) reads the same
    assert vit.ViTConfig.from_hf(config_json["vision_config"]) == config, name
  with pytest.raises(ValueError, match="use_qk_norm"):
    vit.ViTConfig.from_hf(transformers.JanusVisionConfig(use_qk_norm=True))
  with pytest.raises(ValueError, match="not supported"):
    vit.ViTConfig.from_hf({"model_type": "pixtral", "hidden_size": 32})


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_hidden_states_match_transformers(request, name):
  """Every hidden state (index 0 = embeddings after CLIP's pre_layrnorm), layers -2 and -1 alone,
  and last_hidden_state / pooler_output (where post_layernorm enters), on two images."""
  _, tower, config, params, _, _ = _tower(request, name)
  pixels = _pixels(seed=1)
  with torch.no_grad():
    out = tower(torch.from_numpy(pixels), output_hidden_states=True)
  theirs = [h.numpy() for h in out.hidden_states]
  assert len(theirs) == config.num_layers + 1

  ours = vit.vit_hidden_states(params, config, _nhwc(pixels))
  assert ours.shape == (config.num_layers + 1, 2, config.num_positions, config.hidden_size)
  for i, h in enumerate(theirs):
    assert relative_error(ours[i], h) <= TOL, (name, i)
  for layer in (-2, -1):
    assert relative_error(vit.vit_features(params, config, _nhwc(pixels), layer),
                          theirs[layer]) <= TOL, (name, layer)

  normed = vit.vit_features(params, config, _nhwc(pixels), -1, post_norm=True)
  if config.normed_last_state:  # SigLIP, Janus: last_hidden_state = post_layernorm(layer L)
    assert relative_error(normed, out.last_hidden_state.numpy()) <= TOL
    assert relative_error(ours[-1], out.last_hidden_state.numpy()) > 1e-2  # it is normed
  else:  # CLIP: post_layernorm only on the pooled CLS token
    assert relative_error(ours[-1], out.last_hidden_state.numpy()) <= TOL
    assert relative_error(normed[:, 0], out.pooler_output.numpy()) <= TOL


def test_depth_computes_a_prefix_of_the_hidden_states(request):
  """`depth` < L runs only the first layers of the stacked parameters (and 0 none)."""
  _, _, config, params, _, _ = _tower(request, "clip")
  pixels = _nhwc(_pixels(seed=2))
  full = vit.vit_hidden_states(params, config, pixels)
  for depth in (0, 1):
    part = vit.vit_hidden_states(params, config, pixels, depth)
    assert part.shape == (depth + 1,) + full.shape[1:]
    np.testing.assert_allclose(part, full[: depth + 1], rtol=0, atol=1e-5)
  assert relative_error(vit.vit_features(params, config, pixels, 0), full[0]) <= TOL
  with pytest.raises(ValueError, match="out of range"):
    vit.vit_features(params, config, pixels, config.num_layers + 1)
  with pytest.raises(ValueError, match="28, 28, 3"):
    vit.vit_features(params, config, jnp.zeros((1, 32, 32, 3)), -2)


def _llava_projector_params(config: pj.MLPProjectorConfig, state: dict) -> dict:
  sources = pj.projector_tensor_sources(pj.LLAVA_PREFIXES[0], bias=config.bias)
  return params_from_state(sources, pj.param_shapes(config), state)


def test_llava_clip_image_features_match_transformers(request, clip_llava):
  """vit_features(-2) minus CLS, projected: transformers' LlavaModel.get_image_features."""
  model, tower, config, params, state, config_json = _tower(request, "clip")
  proj_config = pj.MLPProjectorConfig.from_hf(model.config)
  assert proj_config == pj.MLPProjectorConfig.from_hf(config_json)
  assert (proj_config.in_features, proj_config.out_features, proj_config.hidden_act,
          proj_config.bias) == (32, 48, "gelu", True)
  proj_params = _llava_projector_params(proj_config, state)
  pixels = _pixels(seed=3)
  with torch.no_grad():
    theirs = model.model.get_image_features(torch.from_numpy(pixels)).pooler_output
  features = vit.vit_features(params, config, _nhwc(pixels), -2)[:, 1:]  # "default": drop CLS
  ours = pj.project(proj_params, proj_config, features)
  assert ours.shape == (2, 16, 48)
  assert relative_error(ours, torch.stack(theirs).numpy()) <= TOL


def test_llava_multi_layer_features_match_transformers(request, siglip_llava):
  """A list vision_feature_layer: hidden states concatenated on the last axis, then projected
  by a projector twice as wide."""
  model, tower, config, params, state, _ = _tower(request, "siglip")
  proj_config = pj.MLPProjectorConfig.from_hf(model.config)
  assert proj_config.in_features == 2 * config.hidden_size
  proj_params = _llava_projector_params(proj_config, state)
  pixels = _pixels(seed=4)
  with torch.no_grad():
    theirs = model.model.get_image_features(torch.from_numpy(pixels)).pooler_output
  features = vit.vit_features(params, config, _nhwc(pixels), (-3, -1))
  assert features.shape == (2, 16, 64)
  assert relative_error(pj.project(proj_params, proj_config, features),
                        torch.stack(theirs).numpy()) <= TOL


def test_projector_without_bias_matches_transformers():
  """multimodal_projector_bias=False, a non-default activation, and pre-activations of order 1
  so the activation's shape matters."""
  config = transformers.LlavaConfig(vision_config=CLIP, text_config=TEXT,
                                    vision_feature_layer=[-2, -1], multimodal_projector_bias=False,
                                    projector_hidden_act="gelu_pytorch_tanh")
  torch.manual_seed(5)
  module = transformers.models.llava.modeling_llava.LlavaMultiModalProjector(config).eval()
  with torch.no_grad():
    module.linear_1.weight.mul_(3.0)
  state = {k: v.numpy() for k, v in module.state_dict().items()}
  assert set(state) == {"linear_1.weight", "linear_2.weight"}
  proj_config = pj.MLPProjectorConfig.from_hf(config)
  assert (proj_config.in_features, proj_config.bias) == (64, False)
  params = params_from_state(pj.projector_tensor_sources("", bias=False),
                                 pj.param_shapes(proj_config), state)
  features = np.random.default_rng(6).normal(size=(2, 5, 64)).astype(np.float32)
  with torch.no_grad():
    theirs = module(torch.from_numpy(features)).numpy()
  assert relative_error(pj.project(params, proj_config, features), theirs) <= TOL


def test_janus_image_features_match_transformers(request, janus):
  """post_layernorm(last layer) through the aligner (fc1, gelu, hidden_layers.0, gelu,
  hidden_layers.1): transformers' JanusModel.get_image_features."""
  model, tower, config, params, state, config_json = _tower(request, "janus")
  aligner_config = pj.JanusAlignerConfig.from_hf(model.config)
  assert aligner_config == pj.JanusAlignerConfig.from_hf(config_json)
  assert (aligner_config.in_features, aligner_config.out_features, aligner_config.depth,
          aligner_config.hidden_act) == (32, 48, 3, "gelu")
  aligner_params = params_from_state(pj.aligner_tensor_sources(aligner_config),
                                         pj.param_shapes(aligner_config), state)
  pixels = _pixels(seed=7)
  with torch.no_grad():
    theirs = model.model.get_image_features(torch.from_numpy(pixels)).pooler_output.numpy()
    # also the aligner alone, on inputs of order 1 (where exact and tanh GELU differ)
    features = 2 * torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(8))
    aligned = model.model.aligner(features).numpy()
  ours = pj.project(aligner_params, aligner_config,
                    vit.vit_features(params, config, _nhwc(pixels), -1, post_norm=True))
  assert relative_error(ours, theirs) <= TOL
  assert relative_error(pj.project(aligner_params, aligner_config, features.numpy()),
                        aligned) <= TOL


def test_janus_without_attention_bias():
  """attention_bias=False: q/k/v have no biases (the output projection keeps its own)."""
  config = transformers.JanusVisionConfig(attention_bias=False, num_hidden_layers=2,
                                          **{k: v for k, v in JANUS_VISION.items()
                                             if k != "num_hidden_layers"})
  config._attn_implementation = "eager"
  torch.manual_seed(9)
  tower = transformers.models.janus.modeling_janus.JanusVisionModel(config).float().eval()
  _randomise(tower, 10)
  state = {k: v.numpy() for k, v in tower.state_dict().items()}
  ours_config = vit.ViTConfig.from_hf(config)
  assert not ours_config.qkv_bias
  params = vit.vit_params_from_state(ours_config, state)  # prefix "" found
  pixels = _pixels(seed=11)
  with torch.no_grad():
    theirs = tower(torch.from_numpy(pixels), output_hidden_states=True).hidden_states
  ours = vit.vit_hidden_states(params, ours_config, _nhwc(pixels))
  for i, h in enumerate(theirs):
    assert relative_error(ours[i], h.numpy()) <= TOL, i


def _named_keys(sources, num_layers: int) -> set[str]:
  return {key for s in sources for _, key in iter_layer_keys(s, num_layers)}


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_tables_cover_every_checkpoint_key(request, name):
  """Every tensor of the tower (and of the projector / aligner) in the file is read, except the
  ones SKIPPED lists; the tables name nothing the file lacks."""
  model, _, config, _, state, _ = _tower(request, name)
  prefix = TOWERS[name][1]
  skipped = tuple(prefix + s for s in SKIPPED.get(config.model_type, ()))
  tower_keys = {k for k in state if k.startswith(prefix) and not k.startswith(skipped)}
  assert _named_keys(vit.vit_tensor_sources(config, prefix), config.num_layers) == tower_keys
  if skipped:
    assert any(k.startswith(skipped) for k in state)  # the skip list is not stale
  if name == "janus":
    head = pj.JANUS_PREFIX
    table = pj.aligner_tensor_sources(pj.JanusAlignerConfig.from_hf(model.config))
  else:
    head = pj.LLAVA_PREFIXES[0]
    table = pj.projector_tensor_sources(head)
  assert _named_keys(table, 0) == {k for k in state if k.startswith(head)}


def test_missing_key_is_named(request):
  _, _, config, _, state, _ = _tower(request, "clip")
  state = dict(state)
  del state["vision_tower.encoder.layers.1.self_attn.v_proj.bias"]
  with pytest.raises(KeyError, match=r"layers\.1\.self_attn\.v_proj\.bias.*layer 1"):
    vit.vit_params_from_state(config, state, "vision_tower.")
  proj_config = pj.MLPProjectorConfig(32, 48)
  with pytest.raises(KeyError, match="mm_projector.2.weight"):
    params_from_state(pj.projector_tensor_sources("model.mm_projector.", ("0", "2")),
                          pj.param_shapes(proj_config),
                          {"model.mm_projector.0.weight": np.zeros((48, 32)),
                           "model.mm_projector.0.bias": np.zeros(48)})


def test_in_memory_and_bare_tower_prefixes(request):
  """A loaded LLaVA's state_dict() ("model.vision_tower.") and a bare CLIPVisionModel's ("")
  give the same params as the saved file ("vision_tower.")."""
  model, tower, config, params, _, _ = _tower(request, "clip")
  for state, prefix in (({k: v.numpy() for k, v in model.state_dict().items()},
                         "model.vision_tower."),
                        ({k: v.numpy() for k, v in tower.state_dict().items()}, "")):
    assert vit.find_prefix(state, vit.LLAVA_PREFIXES + ("",)) == prefix
    other = vit.vit_params_from_state(config, state)
    jax.tree_util.tree_map(np.testing.assert_array_equal, other, params)


def test_image_size_not_a_multiple_of_the_patch(tmp_path):
  """SigLIP-so400m/14 at 384 px (LLaVA-OneVision's tower): the convolution's last partial patch
  is dropped, as torch's is. Here 30 px in 7 px patches: a 4 x 4 grid."""
  config_hf = transformers.SiglipVisionConfig(**{**{k: v for k, v in SIGLIP.items()
                                                     if k != "model_type"}, "image_size": 30})
  torch.manual_seed(3)
  tower = transformers.SiglipVisionModel(config_hf).float().eval()
  _randomise(tower, 4)
  state, _ = _saved(tower, tmp_path)
  config = vit.ViTConfig.from_hf(config_hf)
  assert config.grid_side == 4
  prefix = vit.find_prefix(state)
  params = params_from_state(vit.vit_tensor_sources(config, prefix), vit.vit_param_shapes(config),
                             state, config.num_layers)
  pixels = _pixels(5, side=30)
  with torch.no_grad():
    theirs = tower(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-1]
  ours = vit.vit_features(params, config, _nhwc(pixels), -1)
  assert relative_error(ours, theirs.numpy()) <= TOL


def test_activations_match_transformers():
  """Each name against transformers' ACT2FN, on a range where exact and tanh GELU differ."""
  from transformers.activations import ACT2FN

  x = np.linspace(-6, 6, 2001, dtype=np.float32)
  for name in layers.ACTIVATIONS:
    theirs = ACT2FN[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(layers.activation(name)(jnp.asarray(x)), theirs, rtol=0, atol=2e-6,
                               err_msg=name)
