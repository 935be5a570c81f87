"""A seeded, randomized fault-injection checker for rtmanager (in the spirit of Jepsen's queue checker).

One run (``python -m tests.chaos --seed N --minutes M``, or ``tests/chaos/test_chaos.py``):

* **services of its own** (runner.py): a Postgres cluster (initdb), a redis-server with
  ``appendfsync always`` and a private dockerd (tests.support.PrivateDockerd) behind a socket
  proxy that can cut the Docker event streams; one or two ``rtmanager run`` replicas;
* **a workload** (plan.py) drawn from the seed: start and stop entries on the job streams, REST
  start / stop / restart / patch / cleanup sent to whichever replica leads, and bad shapes, over a
  few games, with gaps and bursts;
* **a fault schedule** drawn from the same seed: kill -9 of a controller, a second replica and a
  leader change, SIGSTOP of the leader past its lease, Postgres and Redis stopped for 1-20 s, the
  private dockerd restarted, the Docker event streams cut, a container killed or removed; and,
  with ``--faults``, kinds that are off by default (plan.EXTRA_OPTIONS): backlogs past one read cut
  mid-round, Redis refusing writes, hostile engine answers, a database restored from an older
  dump, engines that ignore SIGTERM during daemon restarts;
* **a checker** (checker.py, pure functions over the recorded history and the final
  observations), run once the faults are healed and the system is quiet.

A failure prints the seed, the schedule and the first violated invariant with its evidence.
"""
