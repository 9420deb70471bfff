"""Launchers and autograd / torch.library registration of each loss family."""
