"""The NTM tasks build the sequences the paper describes, from a seeded generator."""

import pytest
import torch

from data import AssociativeRecall, AssociativeRecallConfig, Copy, CopyConfig, RepeatCopy, RepeatCopyConfig


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_copy_targets_are_the_inputs_after_the_delimiter():
    batch = Copy(CopyConfig()).make_batch(4, gen(), length=5)
    x, y, mask = batch["x"], batch["y"], batch["mask"]
    assert x.shape == (4, 11, 9) and y.shape == (4, 11, 8) and mask.shape == (4, 11)
    assert torch.equal(y[:, 6:], x[:, :5, :8])  # output phase repeats the input vectors
    assert (x[:, 5, 8] == 1).all() and x[:, :5, 8].sum() == 0  # one delimiter, on its own channel
    assert x[:, 6:].sum() == 0  # no input while answering
    assert torch.equal(mask[0], torch.tensor([0.0] * 6 + [1.0] * 5))


def test_the_same_seed_gives_the_same_batch_and_train_lengths_stay_in_range():
    task = Copy(CopyConfig())
    a, b = task.train_batch(8, gen(3)), task.train_batch(8, gen(3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    g = gen(1)
    lengths = {int(task.train_batch(1, g)["mask"].sum()) for _ in range(300)}
    assert lengths == set(range(1, 21))  # section 4.1: lengths 1..20
    assert list(task.eval_settings) == ["10", "20", "30", "50", "120", "val20"]  # validation last
    assert task.selection_metric == "bit_err@val20" and task.selection_minimise
    assert list(Copy(CopyConfig(validation=False)).eval_settings) == ["10", "20", "30", "50", "120"]


def test_repeat_copy_repeats_the_sequence_then_marks_the_end():
    task = RepeatCopy(RepeatCopyConfig())
    batch = task.make_batch(2, gen(), length=3, repeats=4)
    x, y, mask = batch["x"], batch["y"], batch["mask"]
    assert x.shape == (2, 3 + 2 + 12 + 1, 10) and y.shape == (2, 18, 9)
    assert (x[:, 3, 8] == 1).all() and x[:, 3, 9].abs().sum() == 0  # the delimiter step holds no count
    assert torch.allclose(x[:, 4, 9], torch.tensor((4 - 5.5) / 8.25 ** 0.5))  # the count on its own step
    assert x[:, 4, :9].abs().sum() == 0 and x[:, 5:].abs().sum() == 0
    for r in range(4):
        assert torch.equal(y[:, 5 + 3 * r: 8 + 3 * r, :8], x[:, :3, :8])
    assert (y[:, -1, 8] == 1).all() and y[:, :-1, 8].sum() == 0  # end marker only at the last step
    assert mask.sum() == 2 * 13 and mask[:, :5].sum() == 0
    assert task.eval_settings["10x20"] == {"length": 10, "repeats": 20}


def test_repeat_count_channel_has_mean_0_and_variance_1_over_training_counts():
    task = RepeatCopy(RepeatCopyConfig())
    g = gen()
    counts = []
    for _ in range(4000):
        setting = task.sample_train_setting(g)
        x = task.make_batch(1, g, **setting)["x"]
        counts.append(x[0, setting["length"] + 1, 9].item())
    counts = torch.tensor(counts)
    assert abs(counts.mean()) < 0.05 and abs(counts.var() - 1) < 0.05
    assert len(set(counts.tolist())) == 10  # ten distinct counts


def test_associative_recall_answers_with_the_item_after_the_query():
    task = AssociativeRecall(AssociativeRecallConfig())
    batch = task.make_batch(16, gen(), items=4)
    x, y = batch["x"], batch["y"]
    assert x.shape == (16, 4 * 4 + 8, 8) and y.shape == (16, 24, 6)
    for b in range(16):
        items = [x[b, 4 * i + 1: 4 * i + 4, :6] for i in range(4)]
        query = x[b, 17:20, :6]
        q = next(i for i in range(3) if torch.equal(items[i], query))
        assert torch.equal(y[b, -3:], items[q + 1])
    assert (x[:, 16, 7] == 1).all() and (x[:, 20, 7] == 1).all()  # query delimiters


def test_bit_error_counts_wrong_bits_per_sequence():
    task = Copy(CopyConfig())
    batch = task.make_batch(2, gen(), length=3)
    logits = (batch["y"] * 2 - 1) * 5  # perfect answers
    logits[0, 4, 0] *= -1  # one wrong bit in sequence 0 (a scored step)
    logits[1, 0, 0] = -logits[1, 0, 0]  # a flip outside the scored steps does not count
    m = task.metrics(logits, batch, {})
    assert m == {"bit_err": 1.0, "count": 2}


def test_bad_task_settings_are_refused():
    with pytest.raises(ValueError):
        CopyConfig(min_len=5, max_len=2)
    with pytest.raises(ValueError, match="10x20"):
        RepeatCopyConfig(eval_settings=("ten",))


def test_parity_vectors_set_a_prefix_to_plus_minus_one_and_target_the_parity_of_plus_ones():
    from data import Parity, ParityConfig
    task = Parity(ParityConfig())
    batch = task.make_batch(512, gen())
    x, y = batch["x"][:, 0], batch["y"][:, 0, 0]
    assert x.shape == (512, 64) and set(x.unique().tolist()) <= {-1.0, 0.0, 1.0}
    nonzero = (x != 0).sum(-1)
    assert nonzero.min() >= 1 and nonzero.max() <= 64
    assert torch.equal(x[torch.arange(64).expand(512, -1) >= nonzero.unsqueeze(1)], torch.zeros(int((64 - nonzero).sum())))
    assert torch.equal(y, ((x == 1).sum(-1) % 2).float())
    assert 0.4 < y.mean() < 0.6


def test_parity_error_is_a_percentage_and_ponder_is_the_mean_cost():
    from data import Parity, ParityConfig
    task = Parity(ParityConfig(input_size=4))
    batch = task.make_batch(4, gen())
    logits = (batch["y"] * 2 - 1) * 5
    logits[0] *= -1  # one of four wrong
    internals = {"ponder_cost": torch.tensor([[2.5], [3.0], [1.5], [1.0]])}
    assert task.metrics(logits, batch, internals) == {"err": 100.0, "count": 4, "ponder": 8.0}


def test_addition_inputs_are_one_hot_digits_and_targets_the_running_sum_from_step_two():
    from data import Addition, AdditionConfig
    task = Addition(AdditionConfig())
    batch = task.make_batch(64, gen())
    x, y, mask, valid = batch["x"], batch["y"], batch["mask"], batch["valid"]
    assert x.shape == (64, 5, 50) and y.shape == (64, 5, 6) and task.spec["output_size"] == 66
    assert (mask[:, 0] == 0).all() and torch.equal(mask[:, 1:], valid[:, 1:])  # no target for the first number
    blocks = x.view(64, 5, 5, 10)
    assert set(blocks.sum(-1).unique().tolist()) <= {0.0, 1.0}  # each place one-hot or empty

    def value(digit_blocks):  # one-hot places, most significant first, empty places after the end
        used = [int(b.argmax()) for b in digit_blocks if b.sum() > 0]
        return int("".join(map(str, used))) if used else 0

    def number(classes):
        return int("".join(str(int(c)) for c in classes if c < 10))

    for b in range(64):
        total = 0
        for t in range(int(valid[b].sum())):
            total += value(blocks[b, t])
            assert number(y[b, t]) == total
            assert (y[b, t] == 10).sum() == 6 - len(str(total))  # class 10 after the end


def test_addition_digit_classes_by_hand():
    from data import Addition, AdditionConfig
    digits = Addition(AdditionConfig()).digits(torch.tensor([0, 7, 123, 412345]), 6)
    assert digits.tolist() == [[0, 10, 10, 10, 10, 10], [7, 10, 10, 10, 10, 10],
                               [1, 2, 3, 10, 10, 10], [4, 1, 2, 3, 4, 5]]


def test_addition_sequence_error_counts_sequences_with_any_wrong_digit():
    from data import Addition, AdditionConfig
    task = Addition(AdditionConfig(max_numbers=3, max_digits=2))
    batch = task.make_batch(8, gen(2))
    logits = torch.nn.functional.one_hot(batch["y"], 11).float().reshape(8, 3, 33) * 10
    assert task.metrics(logits, batch, {})["seq_err"] == 0.0
    scored = int((batch["mask"].sum(1) > 0).sum())
    assert task.metrics(logits, batch, {})["count"] == scored  # one-number sequences have no target
    b = int((batch["mask"].sum(1) > 0).nonzero()[0])
    t = int(batch["mask"][b].nonzero()[0])
    logits[b, t] = logits[b, t].roll(1)  # every place of one scored step now wrong
    assert task.metrics(logits, batch, {})["seq_err"] == 100.0
