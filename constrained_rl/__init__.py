"""Pure-functional primitives for constrained (safe) reinforcement learning in JAX.

Modules, one topic each:
  returns      discounted returns and GAE (reward, cost and token streams)
  lagrangian   Lagrange multipliers as (init, update) rules
  penalties    rectified per-sample / per-group penalties, safety-interference statistics
  objectives   PPO surrogate, value clipping, KL estimators, entropy
  distributions  tanh-squashed Gaussian
  critics      adversarially trained (relatively pessimistic) critics, Bellman errors, projections
  config       typed-config validation shared by every algorithm
  schedules    learning-rate schedules: linear warmup, then cosine decay or constant
  plotting     the one Matplotlib setup: Agg figures, curves with a dashed limit, saving
"""
