"""Experiment runners over the training core and the simulator: centralised/local training, compare,
the model benchmark and throughput benchmarks. The CLI calls these and prints what they return."""
