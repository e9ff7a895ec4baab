"""train.periodic.is_time against the schedules written out: logs every 4 steps and at the end,
evaluations every 5 steps but not at the end (the loop's final evaluation), checkpoints every 5
(10 steps in all)."""
from deepflow.train.periodic import is_time


def test_periodic_actions_fall_where_the_loop_needs_them():
  steps = range(1, 11)
  assert [s for s in steps if is_time(s, 4, 10, last=True)] == [4, 8, 10]
  assert [s for s in steps if is_time(s, 5, 10, last=False)] == [5]
  assert [s for s in steps if is_time(s, 5)] == [5, 10]
  assert not any(is_time(s, 0, 10, last=False) for s in steps)  # 0: never
  assert [s for s in steps if is_time(s, 0, 10, last=True)] == [10]
