"""Benchmark evaluation: the paper's tables (MathVision, MathVista, MathVerse, WeMath; Geometry3K
and the training parquet) from our sampler's greedy responses. `python -m pr1_jax.evaluate` is
the command; `python -m pr1_jax.evaluation.audit` is the perception audit.

Modules, one job each:
  benchmarks    the benchmarks' files as downloaded -> `Problem`s, with the reference's question text
  generation    problems -> HF-exact prompt batches -> greedy responses (our sampler, length buckets)
  scoring       response -> correct or not, with no model (option letter / text, math-verify)
  answer_judge  the reference's LLM answer judge ("true" / "false"), read from logits in our judge
  report        overall and per-category accuracy, WeMath's four-dimensional metrics, the table
  audit         per-annotation judge verdicts on two checkpoints' responses, McNemar between them
  mcnemar       the exact McNemar test between two result files (`python -m pr1_jax.mcnemar`)

Nothing is imported here: the reward workers import `scoring` in fresh processes, without JAX.
"""
