"""LLM safety fine-tuners: the shared LM plumbing (``common``) and LM-PPO machinery (``rlhf_ppo``), SFT,
the reward and cost models, Safe-RLHF PPO-Lagrangian, RePO, and the end-to-end pipeline."""
