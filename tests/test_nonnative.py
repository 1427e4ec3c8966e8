"""Non-native VLMs end to end, against transformers: pixels -> `vlm.prepare` -> logits, residuals,
attention and greedy generation, for tiny LLaVA-1.5, LLaVA-NeXT (Llama-3 rope), LLaVA-OneVision,
LLaVA with a Pixtral tower, and Janus, built in code (model, tokenizer and image processor saved as
a user's checkpoint would be); and a checkpoint in the original LLaVA repository's layout.

Each family runs a batch of two prompts with two images of different sizes. The reference is the
transformers model on its own image processor's pixels and the placeholder ids (the processor's
own ids where its processor builds offline: LLaVA, LLaVA-NeXT, Janus; the expansion rules of the
others are tested in test_anyres / test_pixtral_vit), with our rotary positions as position_ids.
Errors are `reference.relative_error` over real (non-pad) positions.
"""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

import narrowgate_jax as ng
import reference as R
from narrowgate_jax.processing.roles import Role, select

TOLERANCE = 1e-4
PROMPTS = ["<image>what is in the picture ? answer :", "a red cat <image> this animal is a"]
SIZES = ((30, 44), (52, 20))  # (height, width): one wide, one tall

CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7,
            projection_dim=32)
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7)
PIXTRAL = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, image_size=64, patch_size=8, head_dim=16)
PINPOINTS = [[28, 56], [56, 28], [56, 56]]
# A 112 x 112 grid of 4 x 4 tiles has more patches than anyres_max_9 allows: interpolated.
OV_PINPOINTS = PINPOINTS + [[112, 112]]
CLIP_SIZE = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})


def _images(sizes=SIZES, seed=7):
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _tokenizer(specials, **special_tokens):
  vmap = {t: i for i, t in enumerate(specials + R.WORDS)}
  return vmap, R.word_tokenizer(vmap, specials, add_bos=True, **special_tokens)


LLAVA_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")


def _llava():
  vmap, tokenizer = _tokenizer(LLAVA_SPECIALS, extra_special_tokens={"image_token": "<image>"})
  config = transformers.LlavaConfig(vision_config=CLIP, text_config=R.tiny_llama(),
                                    image_token_index=vmap["<image>"])
  image_processor = transformers.LlavaImageProcessorPil(do_pad=True, **CLIP_SIZE)
  processor = transformers.LlavaProcessor(image_processor, tokenizer, patch_size=7,
                                          vision_feature_select_strategy="default",
                                          num_additional_image_tokens=1)
  return config, tokenizer, image_processor, processor


def _llava_next():
  vmap, tokenizer = _tokenizer(LLAVA_SPECIALS, extra_special_tokens={"image_token": "<image>"})
  config = transformers.LlavaNextConfig(vision_config=CLIP, text_config=R.tiny_llama3(),
                                        image_grid_pinpoints=PINPOINTS,
                                        image_token_index=vmap["<image>"])
  image_processor = transformers.LlavaNextImageProcessorPil(image_grid_pinpoints=PINPOINTS,
                                                            **CLIP_SIZE)
  processor = transformers.LlavaNextProcessor(image_processor, tokenizer, patch_size=7,
                                              vision_feature_select_strategy="default",
                                              num_additional_image_tokens=1)
  return config, tokenizer, image_processor, processor


def _onevision():
  specials = LLAVA_SPECIALS + ("<|im_start|>", "<|im_end|>")
  vmap, tokenizer = _tokenizer(specials, extra_special_tokens={"image_token": "<image>"})
  config = transformers.LlavaOnevisionConfig(vision_config=SIGLIP, text_config=R.tiny_qwen2(),
                                             image_grid_pinpoints=OV_PINPOINTS,
                                             image_token_index=vmap["<image>"])
  image_processor = transformers.LlavaOnevisionImageProcessorPil(
      size={"height": 28, "width": 28}, image_grid_pinpoints=OV_PINPOINTS)
  return config, tokenizer, image_processor, None


def _pixtral():
  specials = ("<pad>", "<s>", "</s>", "<unk>", "[IMG]", "[IMG_BREAK]", "[IMG_END]")
  vmap, tokenizer = _tokenizer(specials, extra_special_tokens={"image_token": "[IMG]"})
  config = transformers.LlavaConfig(vision_config=PIXTRAL, text_config=R.tiny_mistral(),
                                    image_token_index=vmap["[IMG]"], vision_feature_layer=-1,
                                    vision_feature_select_strategy="full")
  image_processor = transformers.PixtralImageProcessorPil(size={"longest_edge": 48},
                                                          patch_size={"height": 8, "width": 8})
  return config, tokenizer, image_processor, None


def _janus():
  specials = LLAVA_SPECIALS + ("<image_placeholder>", "<begin_of_image>", "<end_of_image>")
  extra = {"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
           "eoi_token": "<end_of_image>"}
  vmap, tokenizer = _tokenizer(specials, extra_special_tokens=extra)
  config = R.tiny_janus()
  config.image_token_id = vmap["<image_placeholder>"]
  image_processor = transformers.JanusImageProcessorPil(size={"height": 32, "width": 32})
  processor = transformers.JanusProcessor(image_processor, tokenizer, num_image_tokens=16,
                                          use_default_system_prompt=False)
  return config, tokenizer, image_processor, processor


FAMILIES = {"llava": _llava, "llava_next": _llava_next, "llava_onevision": _onevision,
            "pixtral": _pixtral, "janus": _janus}


def _torch_pixels(name, image_processor, images) -> dict:
  out = image_processor(images=images, return_tensors="pt")
  return {k: v for k, v in out.items() if k in ("pixel_values", "image_sizes")}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  config, tokenizer, image_processor, processor = FAMILIES[request.param]()
  tokenizer.padding_side = "left"
  hf_dir = tmp_path_factory.mktemp(request.param) / "hf"
  torch_model = R.build(config, hf_dir)
  tokenizer.save_pretrained(hf_dir)
  image_processor.save_pretrained(hf_dir)
  vlm = R.convert_and_load(hf_dir, hf_dir.parent / "ng")
  images = _images()
  batch = vlm.prepare(images=images, prompts=PROMPTS)
  placeholder = config.image_token_id
  ids = np.where(np.asarray(batch.feature_mask), placeholder, np.asarray(batch.input_ids))
  inputs = _torch_pixels(request.param, image_processor, images)
  inputs["input_ids"] = torch.as_tensor(ids, dtype=torch.long)
  inputs["attention_mask"] = torch.as_tensor(np.asarray(batch.attention_mask), dtype=torch.long)
  return SimpleNamespace(name=request.param, vlm=vlm, torch=torch_model, batch=batch,
                         inputs=inputs, tokenizer=tokenizer, config=config, processor=processor,
                         torch_image_processor=image_processor, hf_dir=hf_dir)


@pytest.fixture(scope="module")
def reference_out(family):
  pos = torch.as_tensor(np.asarray(family.batch.positions), dtype=torch.long)
  with torch.no_grad():
    return family.torch(**family.inputs, position_ids=pos, output_hidden_states=True,
                        output_attentions=True)


def test_token_ids_equal_the_processor(family):
  """Where the processor builds offline, its ids are ours with the image features' positions
  holding the placeholder id (the others' expansion rules: test_anyres, test_pixtral_vit)."""
  if family.processor is None:
    pytest.skip(f"{family.name}'s processor needs torchvision")
  text = [p.replace("<image>", family.tokenizer.image_token) for p in PROMPTS]
  theirs = family.processor(images=_images(), text=text, padding=True, return_tensors="np")
  np.testing.assert_array_equal(family.inputs["input_ids"].numpy(), theirs["input_ids"])


def test_roles_and_coordinates(family):
  """Image tokens are IMAGE (newlines / row breaks IMAGE_BREAK), boundary tokens IMAGE_START /
  IMAGE_END, and every image token has its (image, view, row, col)."""
  roles, coords = np.asarray(family.batch.roles), np.asarray(family.batch.image_coords)
  image = select("image", roles)
  assert (coords[image] >= 0).all() and (coords[~image & (roles != Role.IMAGE_BREAK)] == -1).all()
  if family.name in ("llava_next", "llava_onevision"):
    assert select("image_break", roles).sum() > 0 and not (roles == Role.IMAGE_END).any()
  if family.name == "pixtral":
    ids = np.asarray(family.batch.input_ids)
    end = family.tokenizer.convert_tokens_to_ids("[IMG_END]")
    assert (ids[select("eoi", roles)] == end).all() and select("eoi", roles).sum(1).tolist() == [1, 1]
    brk = family.tokenizer.convert_tokens_to_ids("[IMG_BREAK]")
    assert (ids[select("image_break", roles)] == brk).all()
  if family.name == "janus":
    ids = np.asarray(family.batch.input_ids)
    assert (ids[select("eoi", roles)] == family.tokenizer.convert_tokens_to_ids("<end_of_image>")).all()
    assert (image.sum(1) == 16).all()


def test_logits(family, reference_out):
  ours = np.asarray(family.vlm.forward(family.batch).logits)
  keep = np.asarray(family.batch.attention_mask)
  assert R.relative_error(ours, reference_out.logits.numpy(), keep) < TOLERANCE


def test_residuals_and_attention(family, reference_out):
  out = family.vlm.forward(family.batch, capture=ng.Capture(resid=True, attn=True))
  real = np.asarray(family.batch.attention_mask)
  for layer in range(family.vlm.num_layers):
    assert R.relative_error(out.resid[layer], reference_out.hidden_states[layer].numpy(),
                            real) < TOLERANCE, f"resid[{layer}]"
    rows = np.broadcast_to(real[:, None, :, None], out.attn.shape[1:])
    assert R.relative_error(out.attn[layer], reference_out.attentions[layer].numpy(),
                            rows) < TOLERANCE, f"attn[{layer}]"


def test_greedy_generation_equals_transformers(family):
  ours = family.vlm.generate(family.batch, max_new_tokens=10).tokens
  with torch.no_grad():
    out = family.torch.generate(**family.inputs, max_new_tokens=10, do_sample=False, num_beams=1,
                                pad_token_id=0)
  theirs = out[:, family.inputs["input_ids"].shape[1]:].numpy()
  np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)


def test_onevision_wrapping_makes_im_end_the_gate(family):
  """The Narrow Gate study wraps OneVision's image as <|im_start|><image><|im_end|>: those two
  template tokens become the image's IMAGE_START and IMAGE_END (the "eoi" selector)."""
  if family.name != "llava_onevision":
    pytest.skip("OneVision only")
  batch = family.vlm.prepare(images=[_images()[0]],
                             prompts=["<|im_start|><image><|im_end|>what is in the picture ?"])
  ids, roles = np.asarray(batch.input_ids)[0], np.asarray(batch.roles)[:1]
  tok = family.tokenizer.convert_tokens_to_ids
  assert ids[select("eoi", roles)[0]].tolist() == [tok("<|im_end|>")]
  assert ids[select("image_start", roles)[0]].tolist() == [tok("<|im_start|>")]
  image = np.flatnonzero(select(["image", "image_break"], roles)[0])
  assert np.flatnonzero(select("eoi", roles)[0]).tolist() == [image[-1] + 1]


def test_box_selects_the_expected_base_and_tile_positions(family):
  """A box over the top-left quarter of a 56 x 56 image: LLaVA-NeXT tiles it 2 x 2 (28 px tiles
  of 4 x 4 patches) after a 28 px base view, so the box is the whole first tile (16 tokens) and
  the top-left 2 x 2 patches of the base view (4 tokens), and no newline."""
  if family.name != "llava_next":
    pytest.skip("the AnyRes geometry is checked on LLaVA-NeXT")
  image = _images([(56, 56)])[0]
  batch = family.vlm.prepare(images=[image], prompts=["<image>what is in the picture ?"])
  related = family.vlm.region(batch, [image], [[[(0, 0, 27, 27)]]])[0]
  coords, roles = np.asarray(batch.image_coords)[0], np.asarray(batch.roles)[0]
  assert (roles[related] == Role.IMAGE).all()
  picked = sorted(map(tuple, coords[related, 1:].tolist()))
  expected = [(0, r, c) for r in range(2) for c in range(2)]
  expected += [(1, r, c) for r in range(4) for c in range(4)]
  assert picked == expected


def test_bad_input_is_refused_clearly(family):
  """Marker / image mismatches and over-long prompts are refused as for native families. Images
  smaller than one patch are upsampled as the processors do; an aspect ratio that leaves no
  high-resolution content (AnyRes) or no pixels (Pixtral) is refused naming the image size."""
  image = _images()[0]
  with pytest.raises(ValueError, match=r"prompt 0 has 0 <image> marker\(s\) but 1 image"):
    family.vlm.prepare(images=[image], prompts=["what is in the picture ?"])
  context = family.vlm.config.max_positions
  with pytest.raises(ValueError, match=rf"prompt 0 is \d+ tokens long; the model's context is "
                                       rf"{context} positions"):
    family.vlm.prepare(images=[image], prompts=["<image>" + " a" * context])
  tiny = family.vlm.prepare(images=[_images([(1, 1)])[0]], prompts=["<image>a cat"])
  assert select("image", tiny.roles).sum() > 0
  extreme = _images([(3, 1000)])[0]
  if family.name in ("llava_next", "llava_onevision", "pixtral"):
    with pytest.raises(ValueError, match=r"1000"):
      family.vlm.prepare(images=[extreme], prompts=["<image>a cat"])
  else:  # one fixed-size view: the image is squashed or padded, as the processor does
    assert select("image", family.vlm.prepare(images=[extreme], prompts=["<image>a"]).roles).any()


LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>' }}"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{{ ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def test_chat_template_equals_the_processor(family, tmp_path):
  """chat=True renders each prompt as one user turn of the checkpoint's chat template, as the
  processor's apply_chat_template does, then expands the images."""
  if family.name != "llava":
    pytest.skip("checked on LLaVA, whose processor builds offline")
  vlm = family.vlm
  vlm.chat_template = LLAVA_TEMPLATE
  try:
    batch = vlm.prepare(images=_images(), prompts=PROMPTS, chat=True,
                        questions=["what is in the picture ?", "this animal is a"])
  finally:
    vlm.chat_template = None
  family.processor.chat_template = LLAVA_TEMPLATE
  texts = []
  for prompt in PROMPTS:
    head, tail = prompt.split("<image>")
    content = ([{"type": "text", "text": head}] if head else []) + [{"type": "image"}] + (
        [{"type": "text", "text": tail}] if tail else [])
    texts.append(family.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True))
  theirs = family.processor(images=_images(), text=texts, padding=True, return_tensors="np")
  ids = np.where(np.asarray(batch.feature_mask), family.config.image_token_id,
                 np.asarray(batch.input_ids))
  np.testing.assert_array_equal(ids, theirs["input_ids"])
  question = family.tokenizer.decode(np.asarray(batch.input_ids)[1][select("question",
                                                                           batch.roles)[1]])
  assert question == "this animal is a"


# ------------------------------------------------------------------- the original LLaVA layout

def _original_key(key: str) -> str:
  """transformers' LLaVA file names -> the LLaVA repository's (the inverse of the llava-hf
  conversion's key map)."""
  for theirs, original in (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                           ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                           ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
                           ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
                           ("image_newline", "model.image_newline")):
    if key.startswith(theirs):
      return original + key[len(theirs):]
  raise AssertionError(f"unmapped key {key}")


@pytest.mark.parametrize("name", ["llava", "llava_next"])
def test_original_llava_layout_converts_to_the_same_model(name, tmp_path):
  """A checkpoint in the LLaVA repository's layout (keys renamed back, config.json the language
  model's plus mm_* fields naming a local CLIP tower dir, no preprocessor_config.json) converts
  and gives the same logits as transformers on the same pixels."""
  config, tokenizer, image_processor, _ = FAMILIES[name]()
  hf_dir = tmp_path / "hf"
  model = R.build(config, hf_dir)
  original = tmp_path / "original"
  original.mkdir()
  state = load_file(str(hf_dir / "model.safetensors"))
  save_file({_original_key(k): v.contiguous() for k, v in state.items()},
            str(original / "model.safetensors"), metadata={"format": "pt"})
  tower = tmp_path / "clip-tower"
  tower.mkdir()
  (tower / "config.json").write_text(json.dumps(config.vision_config.to_dict()))
  raw = {**config.text_config.to_dict(), "architectures": ["LlavaLlamaForCausalLM"],
         "model_type": "llava", "mm_vision_tower": str(tower), "mm_projector_type": "mlp2x_gelu",
         "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
         "mm_hidden_size": CLIP["hidden_size"]}
  if name == "llava_next":
    raw.update(image_aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS,
               mm_patch_merge_type="spatial_unpad")
  else:
    raw.update(image_aspect_ratio="pad")
  (original / "config.json").write_text(json.dumps(raw))
  tokenizer.save_pretrained(original)
  vlm = R.convert_and_load(original, tmp_path / "ng")
  assert vlm.images.spec.pad_to_square == (name == "llava")
  if name == "llava":  # the original pads to square with the mean colour
    image_processor = transformers.LlavaImageProcessorPil(do_pad=True, **CLIP_SIZE)
  images = _images()
  batch = vlm.prepare(images=images, prompts=PROMPTS)
  ids = np.where(np.asarray(batch.feature_mask), config.image_token_id,
                 np.asarray(batch.input_ids))
  pos = torch.as_tensor(np.asarray(batch.positions), dtype=torch.long)
  with torch.no_grad():
    theirs = model(input_ids=torch.as_tensor(ids), position_ids=pos,
                   attention_mask=torch.as_tensor(np.asarray(batch.attention_mask), dtype=torch.long),
                   **_torch_pixels(name, image_processor, images)).logits.numpy()
  ours = np.asarray(vlm.forward(batch).logits)
  assert R.relative_error(ours, theirs, np.asarray(batch.attention_mask)) < TOLERANCE
  assert os.path.exists(tmp_path / "ng" / "preprocessor_config.json")


def test_onevision_prompt_with_two_images_reads_each_as_one_view(family):
  """In a prompt with several images, OneVision's processor and model give each image one
  padded view and a trailing newline (no tiles): logits as transformers with batch_num_images."""
  if family.name != "llava_onevision":
    pytest.skip("OneVision only")
  images = _images()
  batch = family.vlm.prepare(images=[images], prompts=["<image> a <image> what is in the picture ?"])
  grid = SIGLIP["image_size"] // SIGLIP["patch_size"]
  assert select("image", batch.roles).sum() == 2 * grid ** 2
  assert select("image_break", batch.roles).sum() == 2
  inputs = family.torch_image_processor(images=[images], return_tensors="pt")
  ids = np.where(np.asarray(batch.feature_mask), family.config.image_token_id,
                 np.asarray(batch.input_ids))
  with torch.no_grad():
    theirs = family.torch(input_ids=torch.as_tensor(ids), pixel_values=inputs["pixel_values"],
                          image_sizes=inputs["image_sizes"],
                          batch_num_images=inputs["batch_num_images"]).logits.numpy()
  ours = np.asarray(family.vlm.forward(batch).logits)
  assert R.relative_error(ours, theirs) < TOLERANCE


# ------------------------------------------------------------------ knockouts under generation

def _knockouts(family):
  """Post-softmax knockouts as the Narrow Gate study applies them: [EOI] where the family has
  one, image -> text, and 3 random image tokens."""
  batch, vlm = family.batch, family.vlm
  image = select("image", batch.roles)
  rng = np.random.default_rng(0)
  random = np.zeros_like(image)
  for b in range(image.shape[0]):
    random[b, rng.choice(np.flatnonzero(image[b]), 3, replace=False)] = True
  keys = [["image_start", "image"] if (np.asarray(batch.roles) == Role.IMAGE_START).any()
          else "image", random]
  if (np.asarray(batch.roles) == Role.IMAGE_END).any():
    keys.insert(0, "eoi")
  return [vlm.knockout(batch, keys=k, queries="all" if k is not keys[-2] else "text_after_image",
                       mode="post_softmax") for k in keys]


def test_knockout_generation_shares_the_prompt_prefix_exactly(family):
  """Every condition generated from one clean prefill plus its own suffix, all decoded in one
  loop, equals generating it with the whole prompt recomputed, and equals generating it alone;
  the empty knockout ("none", served by the clean prefill) equals the clean generation."""
  vlm, batch = family.vlm, family.batch
  knockouts = [ng.no_knockout(batch, mode="post_softmax")] + _knockouts(family)
  conditions = ng.stack_conditions(knockouts)
  shared = vlm.generate(batch, max_new_tokens=6, interventions=conditions, eos_id=None).tokens
  full = vlm.generate(batch, max_new_tokens=6, interventions=conditions, share_prefix=False,
                      eos_id=None).tokens
  np.testing.assert_array_equal(shared, full)
  alone = [vlm.generate(batch, max_new_tokens=6, interventions=ko, eos_id=None).tokens
           for ko in knockouts]
  np.testing.assert_array_equal(shared, np.stack(alone))
  np.testing.assert_array_equal(shared[0], vlm.generate(batch, max_new_tokens=6,
                                                        eos_id=None).tokens)


def test_eoi_knockout_generation_equals_transformers(family):
  """Post-softmax [EOI] knockout for prompt and generated tokens, against transformers' generate
  with the same edit in its attention (tests/test_native.py's registered attention function)."""
  import test_native as TN

  if not (np.asarray(family.batch.roles) == Role.IMAGE_END).any():
    pytest.skip(f"{family.name} has no end-of-image token")
  if family.vlm.config.sliding_windows:
    # transformers keeps only the window's keys in a sliding-window cache, so the reference's
    # key columns no longer line up with prompt positions; Janus covers the non-native case.
    pytest.skip("the reference hook indexes keys by prompt position (no sliding-window cache)")
  ko = family.vlm.knockout(family.batch, keys="eoi", queries="all", mode="post_softmax")
  ours = family.vlm.generate(family.batch, max_new_tokens=10, interventions=ko).tokens
  theirs = TN._torch_generate(SimpleNamespace(torch=family.torch, inputs=family.inputs),
                              blocked_keys=select("eoi", family.batch.roles))
  np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)
