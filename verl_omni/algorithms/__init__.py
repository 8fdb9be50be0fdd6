"""RL math with no model code: FlowGRPO advantages, the clipped policy loss and the KL term."""
