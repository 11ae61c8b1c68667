"""Reproducibility and exact resume: after load_state_dict the loader yields exactly the uninterrupted batches."""

import copy

import pytest
import torch

from of_ds.data import build_train_data

from .corpus import build_corpus
from .helpers import IMAGE_SPEC, RUNTIME, make_spec


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def _spec(corpus, laion_workers, mmc4_workers, seed=7):
    # laion: 4 batches/epoch (rounded to its workers); mmc4: 3 -> an epoch is 3 steps, so with 2 laion workers the
    # last round of the epoch is uneven
    return make_spec(
        dict(name="laion", kind="laion", shards=corpus["laion"], batch_size=3, samples_per_epoch=10,
             workers=laion_workers, flip_prob=0.5),
        dict(name="mmc4", kind="mmc4", shards=corpus["mmc4"], batch_size=2, samples_per_epoch=6,
             workers=mmc4_workers, flip_prob=0.5, single_image_drop_prob=0.5, resampled=True),
        seed=seed,
    )


def _run(data, epochs, stop_after=None):
    """[(epoch, batches...)] flattened; stops after `stop_after` batches and returns the state then."""
    out = []
    for epoch in epochs:
        data.set_epoch(epoch)
        for batch in data:
            out.append(batch)
            if stop_after is not None and len(out) == stop_after:
                return out, copy.deepcopy(data.state_dict())
    return out, copy.deepcopy(data.state_dict())


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for name in x:
            for key in x[name]:
                assert torch.equal(x[name][key], y[name][key]), (name, key)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [(0, 0), (2, 0), (1, 2)], ids=["workers0", "workers2", "workers1-2"])
def test_resume_mid_epoch_and_at_epoch_boundary_gives_the_uninterrupted_batches(corpus, tokenizer, workers):
    spec = _spec(corpus, *workers)
    reference, final_state = _run(build_train_data(spec, tokenizer, IMAGE_SPEC, RUNTIME), [0, 1])
    steps = build_train_data(spec, tokenizer, IMAGE_SPEC, RUNTIME).steps_per_epoch
    assert steps == (4 if workers == (1, 2) else 3) and len(reference) == 2 * steps
    for stop in (1, steps, steps + 2):  # mid-epoch (worker 1 next), end of epoch 0, mid-epoch 1
        first, state = _run(build_train_data(spec, tokenizer, IMAGE_SPEC, RUNTIME), [0, 1], stop_after=stop)
        resumed = build_train_data(spec, tokenizer, IMAGE_SPEC, RUNTIME)
        resumed.load_state_dict(state)
        rest, end_state = _run(resumed, [state["epoch"], 1] if state["epoch"] == 0 else [1])
        _assert_same(first + rest, reference)
        assert resumed.drop_counts() == build_drop_counts(final_state)
        assert end_state["datasets"] == final_state["datasets"]


def build_drop_counts(state):
    return {name: dict(sorted(d["drops"].items())) for name, d in state["datasets"].items()}


def test_runs_are_reproducible_and_the_seed_changes_the_order(corpus, tokenizer):
    a, _ = _run(build_train_data(_spec(corpus, 0, 0), tokenizer, IMAGE_SPEC, RUNTIME), [0])
    b, _ = _run(build_train_data(_spec(corpus, 0, 0), tokenizer, IMAGE_SPEC, RUNTIME), [0])
    _assert_same(a, b)
    c, _ = _run(build_train_data(_spec(corpus, 0, 0, seed=8), tokenizer, IMAGE_SPEC, RUNTIME), [0])
    assert not torch.equal(a[0]["laion"]["input_ids"], c[0]["laion"]["input_ids"])


@pytest.mark.slow
def test_workers_process_results_match_the_main_process_worker_streams(corpus, tokenizer):
    """W DataLoader processes give the same batches as running their W logical streams in order (round-robin)."""
    from of_ds.data import build_stream_plan
    from of_ds.data.stream import worker_batches

    spec = _spec(corpus, 2, 2)
    got, _ = _run(build_train_data(spec, tokenizer, IMAGE_SPEC, RUNTIME), [0])
    plan = build_stream_plan(spec.dataset("laion"), spec.run.seed, tokenizer, IMAGE_SPEC, RUNTIME)
    streams = [list(worker_batches(plan, w, 0, 0, 2)) for w in range(2)]
    expected = [streams[0][0], streams[1][0], streams[0][1], streams[1][1]]
    for step, batch in enumerate(got):
        assert torch.equal(batch["laion"]["pixel_values"], expected[step]["pixel_values"])
        assert torch.equal(batch["laion"]["input_ids"], expected[step]["input_ids"])


@pytest.mark.slow
@pytest.mark.parametrize("workers,samples,steps", [(1, 40, 10), (2, 24, 6)])
def test_split_by_rank_gives_every_rank_the_same_steps(corpus, tokenizer, workers, samples, steps):
    """Non-resampled, 3 shards of 10: every rank yields steps_per_epoch batches even with more slots than shards
    (B12). With 2 slots, an epoch of 20 samples per rank spans 2 shards each and the ranks start on different ones."""
    import types

    spec = make_spec(dict(name="laion", kind="laion", shards=corpus["laion"], batch_size=2, samples_per_epoch=samples,
                          workers=workers, shuffle_buffer=0, shuffle_initial=0))
    seen = []
    for rank in (0, 1):
        runtime = types.SimpleNamespace(rank=rank, world_size=2, local_rank=rank)
        data = build_train_data(spec, tokenizer, IMAGE_SPEC, runtime)
        batches, _ = _run(data, [0])
        assert data.steps_per_epoch == steps and len(batches) == steps
        texts = [tokenizer.decode(ids) for b in batches for ids in b["laion"]["input_ids"]]
        seen.append([int(t.split("number ")[1].split("<")[0]) for t in texts])
    if workers == 1:  # rank 0 reads shards p0[0], p0[2]; rank 1 reads p0[1], p1[0]: the first shard of each differs
        assert not set(seen[0][:10]) & set(seen[1][:10])
        assert all(len(set(s)) == 20 for s in seen)
