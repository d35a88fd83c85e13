"""The experiment harness: what runs the paper's experiments and benchmarks on the library.

It is the library's first user, not part of it: every module here uses only ``import mixprec as mp``
(and the recipes), and ``import mixprec`` imports none of them. See docs/architecture.md.

* `training`: the reference training loop (`train`, `compare`), on one process or under torchrun;
* `run_state`: one run's state and its phases (set-up and resume, steps, evaluation, checkpoints);
* `checkpoints`: run folders and checkpoint files (checksummed, atomically replaced, the newest kept);
* `determinism`: RNG states, seeding one run, torch's thread count;
* `faults`: fault injection (NaN gradients, crashes, damaged checkpoints) for the reliability tests;
* `processes`: one process or a torchrun group, and each rank's share of the data;
* `benchmark`: what ``mixprec bench`` measures (throughput and memory per policy, side by side);
* `bench_runs`: what it runs: torch's baselines and mixprec policies, one `Run` each.
"""
