"""Token selectors resolved from roles, and left-padded batching."""

import numpy as np
import pytest

from narrowgate_jax.processing.batch import left_pad
from narrowgate_jax.processing.roles import Role, positions_of, select

R = Role
# example 0: bos, text, [image-start, image, image, break, image, eoi], text, text
# example 1 (shorter, left-padded): bos, [image-start, image, eoi], template, text
ROLES_0 = [R.BOS, R.TEXT, R.IMAGE_START, R.IMAGE, R.IMAGE, R.IMAGE_BREAK, R.IMAGE, R.IMAGE_END,
           R.TEXT, R.TEXT]
ROLES_1 = [R.BOS, R.IMAGE_START, R.IMAGE, R.IMAGE_END, R.TEMPLATE, R.TEXT]


@pytest.fixture
def batch():
  return left_pad([list(range(10, 20)), list(range(30, 36))], [ROLES_0, ROLES_1], pad_id=0)


def where(mask):
  return [np.flatnonzero(row).tolist() for row in mask]


def test_left_padding_and_positions(batch):
  assert batch.input_ids.shape == (2, 10)
  assert batch.input_ids[1, :4].tolist() == [0, 0, 0, 0]
  assert batch.positions[1].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5]
  assert batch.positions[0].tolist() == list(range(10))
  assert where(~np.asarray(batch.attention_mask)) == [[], [0, 1, 2, 3]]


@pytest.mark.parametrize("name, expected", [
    ("all", [list(range(10)), list(range(4, 10))]),
    ("text", [[0, 1, 8, 9], [4, 8, 9]]),
    ("image", [[3, 4, 6], [6]]),
    ("image_start", [[2], [5]]),
    ("eoi", [[7], [7]]),
    ("last_image", [[6], [6]]),
    ("text_after_image", [[8, 9], [8, 9]]),
    ("question", [[1, 8, 9], [9]]),
    ("last", [[9], [9]]),
    (["eoi", "last"], [[7, 9], [7, 9]]),
])
def test_named_selectors(batch, name, expected):
  assert where(select(name, batch.roles)) == expected


def test_selector_that_matches_nothing_names_the_example(batch):
  with pytest.raises(ValueError, match=r"'image_break'.*example\(s\) \[1\]"):
    select("image_break", batch.roles)


def test_unknown_selector_and_bad_arrays(batch):
  with pytest.raises(ValueError, match="unknown token selector 'eos'"):
    select("eos", batch.roles)
  with pytest.raises(ValueError, match="boolean array of shape"):
    select(np.ones((2, 3), bool), batch.roles)


def test_explicit_mask_and_positions(batch):
  mask = np.zeros((2, 10), bool)
  mask[0, [2, 5]] = True
  mask[1, 9] = True
  assert where(select(mask, batch.roles)) == [[2, 5], [9]]
  assert positions_of(mask, fill=10).tolist() == [[2, 5], [9, 10]]


def test_left_pad_refuses_mismatched_roles():
  with pytest.raises(ValueError, match="example 0: 3 tokens but 2 roles"):
    left_pad([[1, 2, 3]], [[R.BOS, R.TEXT]], pad_id=0)
