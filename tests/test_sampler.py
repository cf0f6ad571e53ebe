import pytest

from megatune.data.sampler import EpochShuffler


def consume(shuffler, steps):
    return [shuffler.next_global_batch() for _ in range(steps)]


def test_same_seed_same_order_new_epoch_new_order():
    a = consume(EpochShuffler(10, global_batch_size=4, seed=1), 4)
    b = consume(EpochShuffler(10, global_batch_size=4, seed=1), 4)
    assert a == b
    # 2 full steps per epoch (ragged tail dropped); epochs 0 and 1 use different permutations
    assert a[0] + a[1] != a[2] + a[3]
    assert len(set(a[0] + a[1])) == 8
    assert a[0] + a[1] != list(range(8))  # actually shuffled
    assert consume(EpochShuffler(10, 4, seed=2), 1) != a[:1]


def test_resume_continues_exactly():
    straight = consume(EpochShuffler(13, 3, seed=5), 9)
    first = EpochShuffler(13, 3, seed=5)
    head = consume(first, 5)
    resumed = EpochShuffler(13, 3, seed=5)
    resumed.load_state_dict(first.state_dict())
    assert head + consume(resumed, 4) == straight


def test_resume_refuses_different_data():
    state = EpochShuffler(13, 3, seed=5).state_dict()
    with pytest.raises(ValueError, match="made with 13 samples and seed 5, this run has 14 and 5"):
        EpochShuffler(14, 3, seed=5).load_state_dict(state)


def test_rank_slices_partition_the_global_batch():
    batch = list(range(12))
    parts = [EpochShuffler.rank_slice(batch, r, 3) for r in range(3)]
    assert sum(parts, []) == batch


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochShuffler(3, 4, seed=0)
