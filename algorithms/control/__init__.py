"""Offline and online control learners: the offline scaffold (``offline``), what the OSRL baselines
share (``osrl``), BC-All/BC-Safe, BCQ-Lag, BEAR-Lag, CPQ, COptiDICE, CDT, SATAC (WSAC) and ATAC, the
DSRL-protocol benchmark, dataset collection, PPO-Lagrangian, and the constrained bandit."""
