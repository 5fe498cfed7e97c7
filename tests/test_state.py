"""largebatch.state: the training clock and the checkpointer's one dict of parts."""

import time

import torch

from largebatch import checkpoint
from largebatch.distributed import Dist
from largebatch.state import Checkpointer, TrainState, parts_of


def test_the_training_clock_accumulates_across_steps_and_pauses():
    """start_clock at every step must not restart the stretch; stop_clock pauses it (evaluation time excluded)."""
    s = TrainState(train_seconds=1.0)
    for _ in range(3):  # the loop calls start_clock at the top of every step
        s.start_clock()
        time.sleep(0.02)
    s.stop_clock()
    ran = s.train_seconds - 1.0
    assert 0.06 <= ran < 0.5
    time.sleep(0.05)  # paused: an evaluation
    assert s.seconds() == s.train_seconds
    s.start_clock()
    time.sleep(0.02)
    assert s.seconds() >= 1.0 + ran + 0.02
    assert s.state_dict()["train_seconds"] >= 1.0 + ran + 0.02  # a checkpoint mid-stretch counts the stretch


def test_what_is_saved_is_what_is_loaded(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = TrainState(train_seconds=2.5, best=0.75, first_train_loss=3.0)
    noise = torch.nn.Module()  # a stateful part with an empty state
    Checkpointer(tmp_path, parts_of(model, opt, state, noise, Dist()), Dist(), {"recipe": "x"}).save(7)
    saved = checkpoint.read(tmp_path / checkpoint.NAME)
    assert set(saved) == {"step", "config", "world_size", "model", "optimizer", "train_state", "noise_scale", "rng"}
    model2, state2 = torch.nn.Linear(3, 2), TrainState()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    step = Checkpointer(tmp_path, parts_of(model2, opt2, state2, torch.nn.Module(), Dist()), Dist(), {}).load(
        saved, tmp_path / checkpoint.NAME, steps=10)
    assert step == 7 and (state2.best, state2.first_train_loss, state2.train_seconds) == (0.75, 3.0, 2.5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    buffers = (o.state_dict()["state"][0]["momentum_buffer"] for o in (opt, opt2))
    assert torch.equal(*buffers)
