"""ImageNet-style class folders, for the Narrow Gate study's probes on ImageNet images
(PROTOCOLS.md §2 (b), (c), (e): ~100 classes x 100 images, prompt "<image> This animal is a").

  <root>/<class folder>/*.JPEG      (any of `ng_common.IMAGE_EXTENSIONS`, any case)

Class folders are usually WordNet ids (n01440764); their names come from a mapping file:

  LOC_synset_mapping.txt / synset_words.txt   "n01440764 tench, Tinca tinca" per line
  a JSON object {folder: "tench, Tinca tinca"} or {folder: ["tench", "Tinca tinca"]}
  a JSON object {"0": ["n01440764", "tench"], ...} (Keras' imagenet_class_index.json; its
      underscores become spaces)
  a JSON list of [folder, names] pairs, or of names alone (one per class folder, in sorted
      folder order)

`mapping=None` looks for one of `MAPPING_FILES` in root, then in its parent; when there is none
and no folder is named like a WordNet id, the folder names are the class names ("golden_retriever"
-> "golden retriever"). Names separated by commas are synonyms.

Labels are class indices in the mapping's order (the file order; the standard 0-999 for the
LOC/synset_words files; sorted folder order without a mapping file), so they stay the same
whichever classes are chosen. Selection (`ng_common.select_per_class`, seeded): `classes` of the
non-empty class folders, then `per_class` images of each (all of a class that has fewer);
None takes all. Examples come class by class in label order, images in file name order.

Each image becomes an `Example`: id "<folder>/<file stem>", the prompt from `template` (the
study's `IMAGENET_PROMPT`), no question, label = class index, answer = the first class name,
answers = all its synonyms, meta {"folder", "class_names", "file"}.

Errors: no class folders or no images at all, no mapping file where one is needed (naming the
files looked for), a class folder the mapping lacks, a malformed mapping line (`path:line:`).
An empty class folder (no image files) is skipped and counted under "empty_class" in
`NgDataset.skipped` (its path in `skip_log`) with on_empty="skip" (the default), or raises
naming the folder with on_empty="raise".
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional, Sequence

from narrowgate_jax.data.examples import Example
from narrowgate_jax.data.ng_common import (IMAGE_EXTENSIONS, IMAGENET_PROMPT, NgDataset, Skips,
                                           check_folder, check_template, count_or_none,
                                           read_json, select_per_class, split_names)

MAPPING_FILES = ("LOC_synset_mapping.txt", "synset_words.txt", "imagenet_class_index.json",
                 "classes.json")
ON_EMPTY = ("skip", "raise")
WNID = re.compile(r"^n\d{8}$")

ClassNames = dict[str, tuple[str, ...]]  # class folder -> synonyms, in label order


def _read_text_mapping(path: str) -> ClassNames:
  names: ClassNames = {}
  lines: dict[str, int] = {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      parts = line.strip().split(None, 1)
      synonyms = split_names(parts[1]) if len(parts) == 2 else ()
      if not synonyms:
        raise ValueError(f"{path}:{lineno}: expected '<folder> <name>[, <name> ...]', got "
                         f"{line.strip()!r}")
      if parts[0] in names:
        raise ValueError(f"{path}:{lineno}: class {parts[0]!r} already on line {lines[parts[0]]}")
      names[parts[0]], lines[parts[0]] = synonyms, lineno
  return names


def _synonyms(value: Any, where: str) -> tuple[str, ...]:
  if isinstance(value, str):
    synonyms = split_names(value)
  elif isinstance(value, list) and all(isinstance(v, str) for v in value):
    synonyms = tuple(v.strip() for v in value if v.strip())
  else:
    synonyms = ()
  if not synonyms:
    raise ValueError(f"{where}: expected a class name or a list of names, got {value!r}")
  return synonyms


def _is_keras_index(data: dict) -> bool:
  return bool(data) and all(
      k.isdigit() and isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)
      and WNID.match(v[0]) for k, v in data.items())


def _read_json_mapping(path: str, folders: Sequence[str]) -> ClassNames:
  data = read_json(path, "class-name mapping")
  if isinstance(data, dict) and _is_keras_index(data):
    pairs = [data[k] for k in sorted(data, key=int)]
    return {wnid: (name.replace("_", " "),) for wnid, name in pairs}
  if isinstance(data, dict):
    return {str(k): _synonyms(v, f"{path}: class {k!r}") for k, v in data.items()}
  if not isinstance(data, list) or not data:
    raise ValueError(f"{path}: expected a JSON object {{folder: name}} or a non-empty list")
  if all(isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) for v in data):
    return {k: _synonyms(v, f"{path}: item {i}") for i, (k, v) in enumerate(data)}
  if len(data) != len(folders):
    raise ValueError(f"{path}: a list of {len(data)} names, but there are {len(folders)} class "
                     "folders (a list of names alone must have one per folder, in sorted order)")
  return {f: _synonyms(v, f"{path}: item {i}") for i, (f, v) in enumerate(zip(folders, data))}


def read_class_mapping(path: str | os.PathLike, folders: Sequence[str] = ()) -> ClassNames:
  """folder -> class synonyms, in label order, from a mapping file (see the module docstring).

  folders: the sorted class folders (used only by a JSON list of names alone).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"class-name mapping file {path!r} does not exist")
  if path.lower().endswith(".json"):
    return _read_json_mapping(path, folders)
  return _read_text_mapping(path)


def _find_mapping(root: str) -> Optional[str]:
  for folder in (root, os.path.dirname(os.path.abspath(root))):
    for name in MAPPING_FILES:
      if os.path.isfile(os.path.join(folder, name)):
        return os.path.join(folder, name)
  return None


def _class_names(root: str, folders: list[str], mapping: Optional[str | os.PathLike]) -> ClassNames:
  if mapping is None:
    mapping = _find_mapping(root)
  if mapping is None:
    wnids = [f for f in folders if WNID.match(f)]
    if wnids:
      raise FileNotFoundError(
          f"ImageNet folder {root!r} has class folders named by WordNet id ({wnids[0]}, ...) but "
          f"no class-name mapping file ({' or '.join(MAPPING_FILES)}) in it or its parent; pass "
          "mapping=")
    return {f: (f.replace("_", " "),) for f in folders}
  names = read_class_mapping(mapping, folders)
  for folder in folders:
    if folder not in names:
      raise ValueError(f"{os.fspath(mapping)}: has no class for folder {folder!r} "
                       f"({os.path.join(root, folder)})")
  return names


def _images(folder: str) -> list[str]:
  return sorted(n for n in os.listdir(folder)
                if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n)))


def _groups(root: str, folders: list[str], labels: dict[str, int], on_empty: str,
            skips: Skips) -> dict[int, list[tuple[str, str]]]:
  """label -> [(folder, file name)] of the non-empty class folders."""
  groups = {}
  for folder in folders:
    files = _images(os.path.join(root, folder))
    if not files:
      path = os.path.join(root, folder)
      message = f"class folder {path!r} holds no image files"
      if on_empty == "raise":
        raise ValueError(f"{message} (on_empty='skip' skips such folders)")
      skips.skip(path, "empty_class", message)
      continue
    groups[labels[folder]] = [(folder, n) for n in files]
  return groups


def load_imagenet_folders(root: str | os.PathLike, *,
                          mapping: Optional[str | os.PathLike] = None,
                          classes: Optional[int] = 100, per_class: Optional[int] = 100,
                          seed: int = 0, template: str = IMAGENET_PROMPT,
                          on_empty: str = "skip", name: Optional[str] = None) -> NgDataset:
  """`per_class` images of each of `classes` class folders, chosen with `seed`; see the module
  docstring."""
  root = check_folder(root, "ImageNet folder")
  template = check_template(template, with_question=False)
  classes, per_class = count_or_none(classes, "classes"), count_or_none(per_class, "per_class")
  if on_empty not in ON_EMPTY:
    raise ValueError(f"on_empty must be one of {ON_EMPTY}, got {on_empty!r}")
  folders = sorted(f for f in os.listdir(root)
                   if not f.startswith(".") and os.path.isdir(os.path.join(root, f)))
  if not folders:
    raise ValueError(f"ImageNet folder {root!r} has no class folders")
  names = _class_names(root, folders, mapping)
  labels = {folder: i for i, folder in enumerate(names)}
  skips = Skips()
  groups = _groups(root, folders, labels, on_empty, skips)
  if not groups:
    raise ValueError(f"ImageNet folder {root!r}: none of its {len(folders)} class folders holds "
                     "an image file")
  examples, seen = [], {}
  for label, files in select_per_class(groups, classes, per_class, seed, root):
    for folder, filename in files:
      path = os.path.abspath(os.path.join(root, folder, filename))
      ex_id, synonyms = f"{folder}/{os.path.splitext(filename)[0]}", names[folder]
      if ex_id in seen:
        raise ValueError(f"class folder {os.path.join(root, folder)!r}: {filename!r} and "
                         f"{seen[ex_id]!r} give one id {ex_id!r}; rename one")
      seen[ex_id] = filename
      examples.append(Example(
          id=ex_id, prompt=template, images=(path,),
          answer=synonyms[0], answers=synonyms, label=label,
          meta={"folder": folder, "class_names": list(synonyms),
                "file": f"{folder}/{filename}"}))
  return NgDataset(name or "imagenet", examples, skips.counts, skips.log)
