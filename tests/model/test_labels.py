"""build_labels: exact layouts on hand examples, and agreement with a per-token loop of the original's rules."""

import pytest
import torch

from of_ds.model import build_labels

M, E, P = 90, 91, 92  # <image>, <|endofchunk|>, <PAD>
X = -100


def test_laion_masks_pad_and_image_only():
    ids = torch.tensor([[M, 5, 6, 7, E, 2, P, P]])
    mask = (ids != P).long()
    assert build_labels(ids, mask, "laion", M, E, P).tolist() == [[X, 5, 6, 7, E, 2, X, X]]


def test_interleaved_layout():
    ids = torch.tensor([
        [3, 4, M, 5, 6, E, 7, 8, M, 9, E, 2, P],  # text before the first image, two chunks, eos after the last eoc
        [M, 5, E, M, 6, E, E, 7, P, P, P, P, P],  # back-to-back eocs
        [3, 4, 5, 6, 7, 8, 9, 2, P, P, P, P, P],  # no image at all: nothing trained
    ])
    mask = (ids != P).long()
    assert build_labels(ids, mask, "mmc4", M, E, P).tolist() == [
        [X, X, X, 5, 6, E, X, X, X, 9, E, X, X],
        [X, 5, E, X, 6, E, X, X, X, X, X, X, X],
        [X] * 13,
    ]
    assert torch.equal(build_labels(ids, mask, "chatgpt", M, E, P), build_labels(ids, mask, "mmc4", M, E, P))


def loop_reference(ids: torch.Tensor, pad: int) -> torch.Tensor:
    """Section 2.4 of the reference, token by token (pad, pre-first-image, after-eoc-until-image, then <image>)."""
    labels = ids.clone()
    labels[labels == pad] = X
    for row in labels:
        i = 0
        while i < len(row) and row[i] != M:
            row[i] = X
            i += 1
        for e in torch.where(row == E)[0].tolist():
            j = e + 1
            while j < len(row) and row[j] != M:
                row[j] = X
                j += 1
    labels[labels == M] = X
    return labels


def test_interleaved_matches_loop_reference_on_random_rows():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (64, 40), generator=g)
    ids = torch.where(ids == 0, M, torch.where(ids == 1, E, ids))
    lengths = torch.randint(5, 41, (64,), generator=g)
    mask = (torch.arange(40)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, P)
    assert torch.equal(build_labels(ids, mask, "mmc4", M, E, P), loop_reference(ids, P))


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown kind"):
        build_labels(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), "coco", M, E, P)
