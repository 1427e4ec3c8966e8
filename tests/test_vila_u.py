"""VILA-U against a PyTorch statement of the authors' computation, on tiny checkpoints built in
the released layout (config.json; llm/, vision_tower/, mm_projector/ with their own config.json
and safetensors under the names VILAUMetaModel.save_pretrained writes), converted with our
converter and loaded with ng.load.

The reference is written here from mit-han-lab/vila-u's definitions (its package is not
installable offline), each part independent of our code:
  trunk       transformers' SiglipVisionModel, hidden_states[-2] (RQVAESiglipModel.encode_image
              stops after encoder layer L-2, before post_layernorm)
  quantiser   RQBottleneck.forward (quantizations.py): to_code_shape, `depth` rounds of
              VQEmbedding's addmm distance and argmin on the residual, the straight-through sum
  projector   MultimodalProjector "mlp2x_gelu": Linear, nn.GELU(), Linear
  LM          transformers' LlamaForCausalLM on inputs_embeds, the projected features spliced in
              where prepare_inputs_labels_for_multimodal splices them (at the -200 marker)
  pixels      mm_utils.process_image("resize"): PIL resize to the crop size, then the tower's
              CLIPImageProcessor (mean = std = 0.5)
  prompt      tokenizer_image_token (chunks between images tokenized apart, each without its
              BOS) after the Narrow Gate study's "<image>" -> "<im_start><image><im_end>";
              conversation.py's conv_vicuna_v1.get_prompt for chat=True (on a word-level
              tokenizer, where chunked and whole-prompt tokenization agree; see models.vila_u)
Two checkpoints: a shared codebook on 1 x 1 code blocks (the released models' shape), and
per-round codebooks on 2 x 2 blocks (to_code_shape / to_latent_shape do work). Errors are
relative (max |ours - theirs| / max |theirs|) over real positions, float32, ≤ 1e-4.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

import narrowgate_jax as ng
import reference as R
from checkpoints_convert import vila_u as convert_vila_u
from configs.models import VQA_CHAT, get
from narrowgate_jax.models import vila_u
from narrowgate_jax.processing.roles import Role, select

TOLERANCE = 1e-4
GRID, WIDTH, K = 4, 32, 24  # 32 px images in 8 px patches: a 4 x 4 latent grid of width 32
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=WIDTH, intermediate_size=48,
              num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8)
CASES = {"shared": dict(code_shape=[GRID, GRID, 3], shared_codebook=True),
         "per_round_blocks": dict(code_shape=[GRID // 2, GRID // 2, 3], shared_codebook=False)}
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<im_start>", "<im_end>", "<vi_start>", "<vi_end>")
CHAT_WORDS = tuple(("A chat between curious user and artificial intelligence assistant The gives "
                    "helpful , detailed polite answers to ' s questions USER ASSISTANT").split())
PROMPTS = ["<image>what is in the picture ? answer :", "a red cat <image> this animal is a"]
IMAGE_TOKEN_INDEX = -200  # vila_u/constants.py


# ------------------------------------------------------------------------- the checkpoint


def _tokenizer():
  words = list(dict.fromkeys(SPECIALS + R.WORDS + CHAT_WORDS))
  return R.word_tokenizer({t: i for i, t in enumerate(words)}, SPECIALS, add_bos=True)


def _save(tensors: dict, directory) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"),
            metadata={"format": "pt"})


def _write_json(path, value) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(value, indent=2))


def _build(root, case: dict, seed: int = 0) -> SimpleNamespace:
  """The torch parts (random, float32) and a checkpoint dir holding them in the released layout."""
  torch.manual_seed(seed)
  hf = root / "hf"
  tokenizer = _tokenizer()
  llm_config = R.tiny_llama(vocab_size=128)
  llm = R.build(llm_config, hf / "llm", seed=seed)
  tokenizer.save_pretrained(hf / "llm")

  tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SIGLIP)).float().eval()
  gen = torch.Generator().manual_seed(seed + 2)
  with torch.no_grad():  # norms at 1 and biases at 0 would hide a scale / bias mix-up
    for name, p in tower.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.2 * torch.randn(p.shape, generator=gen))
  depth, blocks = case["code_shape"][2], (GRID // case["code_shape"][0]) ** 2
  embed_dim = blocks * WIDTH
  count = 1 if case["shared_codebook"] else depth
  codebooks = [torch.randn(K + 1, embed_dim, generator=gen) for _ in range(count)]
  siglip_prefix = "rqvaesiglip.siglip_model.vision_model."
  state = {siglip_prefix + k: v for k, v in tower.state_dict().items()}
  for i in range(depth):  # a shared codebook is listed under every round's index
    book = codebooks[0 if case["shared_codebook"] else i]
    state[f"rqvaesiglip.quantizer.codebooks.{i}.weight"] = book.clone()
    state[f"rqvaesiglip.quantizer.codebooks.{i}.cluster_size_ema"] = torch.ones(K)
    state[f"rqvaesiglip.quantizer.codebooks.{i}.embed_ema"] = book[:-1].clone()
  # Parts the understanding path never reads (SigLIP's text side, the RQ-VAE decoder, the depth
  # transformer): present, as in the released files, and left unconverted.
  state["rqvaesiglip.siglip_model.text_model.embeddings.token_embedding.weight"] = torch.randn(8, 4)
  state["rqvaesiglip.post_quant_conv.weight"] = torch.randn(4, WIDTH, 1, 1)
  state["rqtransformer.head_transformer.0.weight"] = torch.randn(4, 4)
  _save(state, hf / "vision_tower")

  siglip_dir = root / "siglip-tiny"  # what rqvaesiglip.pretrained_model names (a SiglipConfig)
  siglip_config = transformers.SiglipConfig(vision_config=SIGLIP)
  _write_json(siglip_dir / "config.json", siglip_config.to_dict())
  rq = dict(architectures=["RQVAESiglipModel"], model_type="rqvaesiglip_model",
            embed_dim=WIDTH, n_embed=K, latent_shape=[GRID, GRID, WIDTH],
            code_shape=case["code_shape"], shared_codebook=case["shared_codebook"],
            restart_unused_codes=True, decay=0.99, latent_loss_weight=0.25,
            pretrained_model=str(siglip_dir),
            ddconfig=dict(double_z=False, z_channels=WIDTH, resolution=32, in_channels=3,
                          out_ch=3, ch=16, ch_mult=[1, 1], num_res_blocks=1,
                          attn_resolutions=[], dropout=0.0))
  tower_cfg = dict(architectures=["RQVAESIGLIPTransformer"],
                   model_type="rqvaesigliptransformer_model", hidden_size=WIDTH, rqvaesiglip=rq,
                   rqtransformer=dict(model_type="rqtransformer_model", block_size=[GRID, GRID, 3],
                                      embed_dim=16, vocab_size=K))
  _write_json(hf / "vision_tower" / "config.json", tower_cfg)
  processor = dict(image_processor_type="CLIPImageProcessor", do_resize=True,
                   size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                   do_center_crop=True, do_rescale=True, rescale_factor=1 / 255,
                   do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3,
                   do_convert_rgb=True)
  _write_json(hf / "vision_tower" / "preprocessor_config.json", processor)

  hidden = llm_config.hidden_size
  projector = torch.nn.Sequential(torch.nn.Linear(WIDTH, hidden), torch.nn.GELU(),
                                  torch.nn.Linear(hidden, hidden)).float().eval()
  _save({f"layers.{k}": v for k, v in projector.state_dict().items()}, hf / "mm_projector")
  projector_cfg = dict(architectures=["MultimodalProjector"], model_type="v2l_projector",
                       mm_projector_type="mlp2x_gelu")
  _write_json(hf / "mm_projector" / "config.json", projector_cfg)

  llm_cfg = {**llm_config.to_dict(), "architectures": ["LlamaForCausalLM"]}
  _write_json(hf / "config.json", dict(
      architectures=["VILAULlamaModel"], model_type="vila_u", llm_cfg=llm_cfg,
      vision_tower_cfg=tower_cfg, mm_projector_cfg=projector_cfg, hidden_size=hidden,
      mm_hidden_size=WIDTH, image_aspect_ratio="resize", mm_use_im_start_end=False,
      mm_use_vi_start_end=False, mm_use_im_patch_token=False, model_dtype="torch.bfloat16",
      num_video_frames=8))
  return SimpleNamespace(hf=hf, llm=llm, tower=tower, codebooks=codebooks, projector=projector,
                         tokenizer=tokenizer, processor=processor, case=case)


# ------------------------------------------------------------------------- the reference


def _reference_pixels(images, processor: dict) -> torch.Tensor:
  """mm_utils.process_image with image_aspect_ratio "resize", then the CLIPImageProcessor."""
  crop = processor["crop_size"]
  resized = [image.resize((crop["height"], crop["width"])) for image in images]
  clip = transformers.CLIPImageProcessorPil(
      size=processor["size"], crop_size=crop, image_mean=processor["image_mean"],
      image_std=processor["image_std"], resample=processor["resample"])
  return clip(resized, return_tensors="pt")["pixel_values"]


def _reference_quantizer(x: torch.Tensor, codebooks, code_shape, shared: bool):
  """RQBottleneck.forward on x [B, H, W, D] -> (straight-through features [B, H, W, D], codes
  [B, h, w, depth], residuals [depth+1, B, h, w, E])."""
  b, h, w, d = x.shape
  rh, rw = h // code_shape[0], w // code_shape[1]
  coded = x.reshape(b, h // rh, rh, w // rw, rw, d).permute(0, 1, 3, 2, 4, 5)
  coded = coded.reshape(b, h // rh, w // rw, -1)
  residual = coded.detach().clone()
  aggregated = torch.zeros_like(coded)
  codes, residuals = [], [residual.clone()]
  for i in range(code_shape[2]):
    weight = codebooks[0 if shared else i]
    flat = residual.reshape(-1, weight.shape[1])
    codebook_t = weight[:-1, :].t()
    distances = torch.addmm(flat.pow(2.0).sum(1, keepdim=True)
                            + codebook_t.pow(2.0).sum(0, keepdim=True), flat, codebook_t,
                            alpha=-2.0)
    code = distances.argmin(dim=-1).reshape(residual.shape[:-1])
    quant = torch.nn.functional.embedding(code, weight)
    residual.sub_(quant)
    aggregated.add_(quant)
    codes.append(code)
    residuals.append(residual.clone())
  latent = aggregated.reshape(b, h // rh, w // rw, rh, rw, d).permute(0, 1, 3, 2, 4, 5)
  latent = latent.reshape(b, h, w, d)
  return x + (latent - x).detach(), torch.stack(codes, -1), torch.stack(residuals)


def _reference_encoder(parts, pixels: torch.Tensor) -> dict:
  with torch.no_grad():
    hidden = parts.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    b, length, d = hidden.shape
    side = int(length ** 0.5)
    quantized, codes, residuals = _reference_quantizer(
        hidden.reshape(b, side, side, d), parts.codebooks, parts.case["code_shape"],
        parts.case["shared_codebook"])
    quantized = quantized.reshape(b, side * side, d)  # RQVAESIGLIPTransformerVisionTower.forward
    return dict(hidden=hidden, codes=codes.reshape(b, -1, codes.shape[-1]),
                residuals=residuals.reshape(residuals.shape[0], b, -1, residuals.shape[-1]),
                quantized=quantized, embeddings=parts.projector(quantized))


def _tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
  """mm_utils.tokenizer_image_token: BOS, then each chunk without its own BOS, -200 per image."""
  ids = [tokenizer.bos_token_id]
  for chunk in re.split("(<image>)", prompt):
    ids += [IMAGE_TOKEN_INDEX] if chunk == "<image>" else tokenizer(chunk).input_ids[1:]
  return ids


def _vicuna_v1(user_message: str) -> str:
  """conv_vicuna_v1.get_prompt (SeparatorStyle.TWO) of one stripped user turn plus the empty
  assistant turn tokenize_conversation adds for add_generation_prompt."""
  system, seps = vila_u.SYSTEM, [" ", "</s>"]
  ret = system + seps[0]
  for i, (role, message) in enumerate([("USER", user_message.strip()), ("ASSISTANT", None)]):
    ret += role + ": " + message + seps[i % 2] if message else role + ":"
  return ret


def _images(seed: int = 3):
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
          for h, w in ((30, 44), (52, 20))]


@pytest.fixture(scope="module", params=sorted(CASES))
def model(request, tmp_path_factory):
  parts = _build(tmp_path_factory.mktemp(request.param), CASES[request.param])
  vlm = R.convert_and_load(parts.hf, parts.hf.parent / "ng")
  images = _images()
  batch = vlm.prepare(images=images, prompts=PROMPTS)
  ours = {k: np.asarray(v) for k, v in vlm.images.encode(images).items()}
  theirs = _reference_encoder(parts, _reference_pixels(images, parts.processor))
  return SimpleNamespace(name=request.param, parts=parts, vlm=vlm, images=images, batch=batch,
                         ours=ours, theirs={k: v.numpy() for k, v in theirs.items()},
                         out_dir=parts.hf.parent / "ng")


def _reference_embeds(parts, batch, image_embeddings: np.ndarray) -> torch.Tensor:
  """prepare_inputs_labels_for_multimodal: token embeddings (the marker read as id 0), the
  projected features of each image spliced in at its marker, in order."""
  ids = torch.as_tensor(np.asarray(batch.input_ids), dtype=torch.long)
  mask = torch.as_tensor(np.asarray(batch.feature_mask))
  with torch.no_grad():
    embeds = parts.llm.model.embed_tokens(torch.where(mask, 0, ids))
  embeds[mask] = torch.as_tensor(image_embeddings.reshape(-1, embeds.shape[-1]))
  return embeds


def _reference_forward(model):
  batch = model.batch
  embeds = _reference_embeds(model.parts, batch, model.theirs["embeddings"])
  with torch.no_grad():
    return model.parts.llm(
        inputs_embeds=embeds,
        attention_mask=torch.as_tensor(np.asarray(batch.attention_mask), dtype=torch.long),
        position_ids=torch.as_tensor(np.asarray(batch.positions), dtype=torch.long),
        output_hidden_states=True)


# ---------------------------------------------------------------------------------- tests


def test_pixels_equal_process_images(model):
  theirs = _reference_pixels(model.images, model.parts.processor).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(model.vlm.images.pixels(model.images), theirs, atol=1e-6)


def test_trunk_features_equal_siglip_hidden_state_minus_two(model):
  assert R.relative_error(model.ours["hidden"], model.theirs["hidden"]) < TOLERANCE


def test_codes_residuals_and_quantised_features_equal_rq_bottleneck(model):
  """The same code in every round (so the residuals are the same vectors), and the
  straight-through features; every round picks more than one entry (the test has teeth)."""
  np.testing.assert_array_equal(model.ours["codes"], model.theirs["codes"])
  assert all(len(np.unique(model.ours["codes"][..., i])) > 1
             for i in range(model.ours["codes"].shape[-1]))
  assert R.relative_error(model.ours["residuals"], model.theirs["residuals"]) < TOLERANCE
  assert R.relative_error(model.ours["quantized"], model.theirs["quantized"]) < TOLERANCE


def test_projected_features_are_the_image_embeddings(model):
  assert R.relative_error(model.ours["embeddings"], model.theirs["embeddings"]) < TOLERANCE
  mask = np.asarray(model.batch.feature_mask)
  placed = np.asarray(model.batch.features)[mask].reshape(model.ours["embeddings"].shape)
  assert R.relative_error(placed, model.theirs["embeddings"]) < TOLERANCE


def test_logits_and_every_residual(model):
  reference = _reference_forward(model)
  out = model.vlm.forward(model.batch, capture=ng.Capture(resid=True))
  real = np.asarray(model.batch.attention_mask)
  assert R.relative_error(out.logits, reference.logits.numpy(), real) < TOLERANCE
  for layer in range(model.vlm.num_layers):  # hidden_states[-1] is after the final norm
    assert R.relative_error(out.resid[layer], reference.hidden_states[layer].numpy(),
                            real) < TOLERANCE, f"resid[{layer}]"


def test_greedy_generation_equals_llm_generate(model):
  """VILAUMetaForCausalLM.generate: llm.generate on the spliced inputs_embeds."""
  batch = model.batch
  embeds = _reference_embeds(model.parts, batch, model.theirs["embeddings"])
  with torch.no_grad():
    theirs = model.parts.llm.generate(
        inputs_embeds=embeds,
        attention_mask=torch.as_tensor(np.asarray(batch.attention_mask), dtype=torch.long),
        max_new_tokens=6, do_sample=False, num_beams=1, pad_token_id=0).numpy()
  ours = model.vlm.generate(batch, max_new_tokens=6).tokens
  np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)


def _collapsed_ids(batch, example: int) -> list[int]:
  """Our ids of one example without padding, each image's run of features as one -200."""
  real = np.asarray(batch.attention_mask)[example]
  ids = np.asarray(batch.input_ids)[example][real]
  features = np.asarray(batch.feature_mask)[example][real]
  out = []
  for i, (token, is_feature) in enumerate(zip(ids.tolist(), features.tolist())):
    if not is_feature:
      out.append(token)
    elif i == 0 or not features[i - 1]:
      out.append(IMAGE_TOKEN_INDEX)
  return out


def test_token_ids_equal_tokenizer_image_token_of_the_wrapped_prompt(model):
  """The study's "<im_start><image><im_end>" wrapping through tokenizer_image_token; one image is
  GRID² features."""
  tokenizer = model.parts.tokenizer
  for i, prompt in enumerate(PROMPTS):
    wrapped = prompt.replace("<image>", "<im_start><image><im_end>")
    assert _collapsed_ids(model.batch, i) == _tokenizer_image_token(wrapped, tokenizer)
  assert (np.asarray(model.batch.feature_mask).sum(1) == GRID * GRID).all()


def test_roles_make_im_end_the_gate(model):
  roles, ids = np.asarray(model.batch.roles), np.asarray(model.batch.input_ids)
  tok = model.parts.tokenizer.convert_tokens_to_ids
  assert (ids[select("eoi", roles)] == tok("<im_end>")).all()
  assert (ids[select("image_start", roles)] == tok("<im_start>")).all()
  assert select("eoi", roles).sum(1).tolist() == [1, 1]
  image = select("image", roles)
  assert (image == np.asarray(model.batch.feature_mask)).all()
  for b in range(2):  # <im_start>, the features, <im_end>: contiguous
    span = np.flatnonzero(np.isin(roles[b], (Role.IMAGE_START, Role.IMAGE, Role.IMAGE_END)))
    assert span.tolist() == list(range(span[0], span[0] + GRID * GRID + 2))
  coords = np.asarray(model.batch.image_coords)[0][image[0]]
  rows, cols = np.divmod(np.arange(GRID * GRID), GRID)
  np.testing.assert_array_equal(coords, np.stack([0 * rows, 0 * rows, rows, cols], 1))


def test_chat_template_equals_conv_vicuna_v1(model):
  """chat=True: the converted checkpoint's chat_template.jinja gives conv_vicuna_v1's prompt
  (then the same wrapping and tokenizer_image_token)."""
  question = "what is in the picture ?"
  prompt = VQA_CHAT.replace("{question}", question)
  batch = model.vlm.prepare(images=[model.images[0]], prompts=[prompt], chat=True,
                            questions=[question])
  expected = _vicuna_v1(prompt).replace("<image>", "<im_start><image><im_end>")
  assert _collapsed_ids(batch, 0) == _tokenizer_image_token(expected, model.parts.tokenizer)
  words = model.parts.tokenizer.decode(np.asarray(batch.input_ids)[0][select("question",
                                                                            batch.roles)[0]])
  assert words == question
  assert (model.out_dir / "chat_template.jinja").read_text() == vila_u.CHAT_TEMPLATE


def test_region_selects_latent_positions(model):
  """A box over the top-left quarter of a square image is the top-left 2 x 2 latent positions."""
  image = _images()[0].resize((40, 40))
  batch = model.vlm.prepare(images=[image], prompts=["<image>a cat"])
  related = model.vlm.region(batch, [image], [[[(0, 0, 19, 19)]]])[0]
  picked = sorted(map(tuple, np.asarray(batch.image_coords)[0][related, 2:].tolist()))
  assert picked == [(r, c) for r in range(2) for c in range(2)]


def test_converted_checkpoint_records_what_it_left_out(model):
  meta = json.loads((model.out_dir / "narrowgate.json").read_text())
  assert meta["image_tokenizer"] == "vila_u"
  left = meta["unconverted_tensors"]  # grouped by their first three name components
  assert {"vision_tower.vision_tower.rqtransformer",
          "vision_tower.vision_tower.rqvaesiglip"} <= set(left)
  assert not any(k.startswith(("llm.", "mm_projector.")) for k in left)
  hf_config = json.loads((model.out_dir / "hf_config.json").read_text())
  assert hf_config["model_type"] == vila_u.VilaUConfig.model_type
  assert (model.out_dir / "tokenizer.json").exists()


def test_unknown_siglip_tower_is_refused_naming_it(tmp_path):
  parts = _build(tmp_path, CASES["shared"])
  config = json.loads((parts.hf / "vision_tower" / "config.json").read_text())
  config["rqvaesiglip"]["pretrained_model"] = "someone/siglip-unknown"
  (parts.hf / "vision_tower" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="someone/siglip-unknown"):
    convert_vila_u.equivalent_config(str(parts.hf))


def test_model_config_is_registered():
  config = get("vila_u_7b")
  assert config.family == "vila_u" and config.chat and config.hf_id == "mit-han-lab/vila-u-7b-256"
  assert "<im_end>" in config.eoi


def test_narrow_gate_configs_take_it_like_any_model(model, tmp_path):
  """Issue 9's last point: an experiment config runs on the converted VILA-U as on any model
  (the attention-flow experiment, whose categories need the <im_end> gate)."""
  from configs.experiments import ng_attention_flow
  from configs.models import get
  from experiments import narrow_gate  # noqa: F401
  from narrowgate_jax.data import Example, write_jsonl
  from narrowgate_jax.runs import loop

  data = tmp_path / "data"
  data.mkdir()
  for i, image in enumerate(_images()):
    image.save(data / f"{i}.png")
  write_jsonl(str(data / "examples.jsonl"),
              [Example(id=str(i), prompt="<image> what is in the picture", images=(
                  str(data / f"{i}.png"),), answer="cat", label=i) for i in range(2)])
  config = ng_attention_flow.get_config("vila_u_7b")
  assert config.model.family == "vila_u" and config.model.hf_id == "mit-han-lab/vila-u-7b-256"
  config.model = get("local")
  config.model.path = str(model.out_dir)
  config.data = __import__("ml_collections").ConfigDict(dict(format="jsonl", path=str(data),
                                                             limit=0))
  config.mesh.data, config.mesh.model = 1, 1
  metrics = loop.run(config, str(tmp_path / "w"), progress=False)
  assert {"eoi", "last_image", "other_image"} <= set(metrics["shares"])
