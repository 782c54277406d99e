"""Task metrics of ``tools/bench_realworld.py`` on three third-party deployed models: inputs
rendered or read at bench time, each model's own pre- and post-processing, the scores."""
