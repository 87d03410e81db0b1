"""The measured thread choice, with the measurement and the clock injected (no timings asserted)."""
import pytest
import torch

from h2q.perf import ThreadPolicy

ROUNDS = 5  # ThreadPolicy's default rounds


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class FakeMachine:
    """A probe whose timings say whether another process holds a core, and a clock to move by hand."""

    def __init__(self, busy: bool):
        self.busy, self.now, self.calls = busy, 0.0, []

    def probe(self, threads: int) -> float:
        self.calls.append(threads)
        if threads == 1:
            return 1.0
        return 5.0 if self.busy else 0.6  # spinning threads collapse when a core is taken

    def clock(self) -> float:
        return self.now


def test_auto_picks_all_cores_when_idle_and_one_when_busy():
    idle = FakeMachine(busy=False)
    policy = ThreadPolicy(0, probe=idle.probe, clock=idle.clock, env={})
    assert policy.threads == policy.most == torch.get_num_threads() and policy.probes == (policy.most > 1)
    if policy.most == 1:
        pytest.skip("one core: nothing to choose")
    busy = FakeMachine(busy=True)
    assert ThreadPolicy(0, probe=busy.probe, clock=busy.clock, env={}).threads == torch.get_num_threads() == 1
    assert busy.calls == [policy.most, 1] * ROUNDS  # interleaved


def test_one_lucky_probe_does_not_decide():
    """A busy neighbour off its core for one probe makes all cores look fast once: the median decides."""
    times = iter([0.5, 1.0] + [5.0, 1.0] * (ROUNDS - 1))  # (all cores, one) per round
    policy = ThreadPolicy(0, probe=lambda t: next(times), clock=lambda: 0.0, env={})
    if policy.most == 1:
        pytest.skip("one core: nothing to choose")
    assert policy.threads == 1


def test_a_near_tie_keeps_all_cores():
    policy = ThreadPolicy(0, probe=lambda t: 1.0 if t == 1 else 1.05, clock=lambda: 0.0, env={})
    assert policy.threads == policy.most


def test_measures_again_only_when_due():
    machine = FakeMachine(busy=False)
    policy = ThreadPolicy(0, every_s=30.0, probe=machine.probe, clock=machine.clock, env={})
    if policy.most == 1:
        pytest.skip("one core: nothing to choose")
    machine.busy, machine.now = True, 10.0
    assert policy.check() == policy.most and policy.probes == 1  # not due yet
    machine.now = 31.0
    assert policy.check() == 1 and policy.probes == 2 and torch.get_num_threads() == 1
    machine.busy, machine.now = False, 70.0
    assert policy.check() == policy.most and torch.get_num_threads() == policy.most


def test_a_fixed_count_never_measures():
    calls = []
    policy = ThreadPolicy(1, probe=lambda t: calls.append(t) or 1.0, clock=lambda: 1e9)
    assert policy.check() == 1 and torch.get_num_threads() == 1 and calls == [] and "fixed" in policy.describe()


def test_omp_num_threads_counts_as_requested():
    policy = ThreadPolicy(0, probe=lambda t: 1 / 0, env={"OMP_NUM_THREADS": "1"})
    assert policy.threads == 1 and "fixed" in policy.describe()
